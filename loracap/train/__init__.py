"""Training a prefix captioner on your own captions (`loracap train`) and scoring it (`loracap eval`).

Needs the `train` extra: `pip install -e ".[train]"` (peft, accelerate, pycocoevalcap, tensorboard).
"""
