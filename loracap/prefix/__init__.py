"""A small captioner you train yourself: frozen vision tower -> projector -> decoder-only LM (LoRA).

`modeling` holds the model, `batching` the text half of a training batch, `io` saving and loading the
folder that `loracap caption --model DIR` uses like any other model. Training lives in `loracap.train`.
"""
