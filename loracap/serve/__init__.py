"""`loracap serve`: an OpenAI-compatible captioning server, so one GPU box captions for many clients.

fastapi and uvicorn are imported only when the server is created (`pip install loracap[serve]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]

if TYPE_CHECKING:
    from .app import create_app, serve


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'loracap.serve' has no attribute {name!r}")
