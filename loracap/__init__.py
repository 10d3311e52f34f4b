"""loracap: caption image folders for LoRA / DreamBooth training.

    import loracap
    summary = loracap.caption_folder("my_dataset", style="tags", options=loracap.PostProcess(trigger="ohwx"))
    captioner = loracap.Captioner(style="caption"); captioner(pil_image)

The import is kept light: torch and transformers load only when a model is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Captioner", "GenerationSettings", "PostProcess", "RunSummary", "caption_folder", "load_backend"]

_LAZY = {
    "Captioner": "loracap.captioner",
    "caption_folder": "loracap.pipeline",
    "RunSummary": "loracap.pipeline",
    "PostProcess": "loracap.postprocess",
    "GenerationSettings": "loracap.backends",
    "load_backend": "loracap.backends",
}

if TYPE_CHECKING:
    from .backends import GenerationSettings, load_backend
    from .captioner import Captioner
    from .pipeline import RunSummary, caption_folder
    from .postprocess import PostProcess


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loracap' has no attribute {name!r}")
