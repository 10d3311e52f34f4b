"""`loracap dreambooth` and `loracap generate`: DreamBooth-LoRA for Stable Diffusion 1.5 / SDXL (Flux next)
on a captioned dataset, and images from a base model with or without the LoRA.

    settings.py     DreamBoothConfig (no torch)        base.py         the base pipeline: family, loading
    captions.py     captions -> training prompts       data.py         sampler, dataset, collate
    families.py     per-family conditioning and loss   lora.py         adapters, trainable parameters
    optim.py        optimizer and schedule             prior.py        class images and their manifest
    checkpoints.py  output guard, run file, resume     validation.py   sample grids while training
    loop.py         the run (accelerate)               lora_files.py   kohya / diffusers LoRA files
    generate.py     `loracap generate`
"""
