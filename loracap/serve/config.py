"""The settings of `loracap serve`, importable without the server's dependencies (the CLI's --help)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.base import GenerationSettings
from ..backends.registry import DEFAULT_MODEL
from ..request import StyleChoice


@dataclass
class ServeConfig:
    """Every setting of `loracap serve`: from its flags, a TOML file (`--config`) or code (see
    loracap.config). The API key itself is never a setting: `api_key_env` names the variable holding it."""

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    style_choice: StyleChoice = field(default_factory=StyleChoice)
    """The default caption style: a fixed-mode model's mode, or a chat model's instruction."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    engine: str = "local"
    """local (transformers) or vllm (a chat model on vLLM, one CUDA GPU; refused elsewhere)."""
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_image_pixels: int | None = None
    max_body_mb: float = 32.0
    max_prompt_tokens: int = 1024
    api_key_env: str | None = None
    """Require `Authorization: Bearer KEY` on /v1 routes, KEY read from this environment variable."""
    model_name: str | None = None
    """The model name clients see (default: `model`)."""
    log_level: str = "info"
