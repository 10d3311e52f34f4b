"""loracap: caption image folders for LoRA / DreamBooth training.

    import loracap
    summary = loracap.caption_folder("my_dataset", style="tags", trigger="ohwx")
    summary = loracap.caption_folder(loracap.CaptionConfig(dir="my_dataset", model="..."))  # the same object
    captioner = loracap.Captioner(style="caption"); captioner(pil_image)
    rep = loracap.report("my_dataset", trigger="ohwx", fail_on=["truncated", "clip<20"]); rep.passed

The import is kept light: torch and transformers load only when a model is used.
"""

from __future__ import annotations

from importlib.metadata import version as _installed_version
from typing import TYPE_CHECKING, Any

__version__ = _installed_version("loracap")  # one version: pyproject.toml's, as installed
__all__ = [
    "CaptionConfig",
    "Captioner",
    "GenerationSettings",
    "PostProcess",
    "ReportConfig",
    "RunSummary",
    "ServeConfig",
    "build_report",
    "caption_folder",
    "list_styles",
    "load_backend",
    "load_style",
    "report",
]

_LAZY = {
    "CaptionConfig": "loracap.pipeline",
    "ReportConfig": "loracap.quality.report",
    "ServeConfig": "loracap.serve.config",
    "Captioner": "loracap.captioner",
    "caption_folder": "loracap.pipeline",
    "RunSummary": "loracap.pipeline",
    "PostProcess": "loracap.postprocess",
    "GenerationSettings": "loracap.backends",
    "load_backend": "loracap.backends",
    "list_styles": "loracap.styles",
    "load_style": "loracap.styles",
    "report": "loracap.quality.report",
    "build_report": "loracap.quality.report",
}

if TYPE_CHECKING:
    from .backends import GenerationSettings, load_backend
    from .captioner import Captioner
    from .pipeline import CaptionConfig, RunSummary, caption_folder
    from .postprocess import PostProcess
    from .quality.report import ReportConfig, build_report, report
    from .serve.config import ServeConfig
    from .styles import list_styles, load_style


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loracap' has no attribute {name!r}")
