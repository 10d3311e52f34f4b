"""A remote OpenAI-compatible server as a backend: `loracap serve` on a GPU box, vLLM, llama.cpp, OpenAI.

    backend = OpenAIRemoteBackend("microsoft/Florence-2-base", "http://gpu-box:8000/v1")
    caption_images(backend, images, "*", prompt="Describe the image in one sentence.")

`prepare` encodes each image (JPEG by default, shrunk to at most `max_image_side` on its longer side) as
a base64 data URL, in the pipeline's worker threads. `generate` sends one chat-completions request per
image, `concurrency` at a time, so a batching server (loracap serve, vLLM) sees them together.

Text sent with each image: its prompt if there is one (one for the batch or one per image); else the
mode name when it is not "*" (a `loracap serve` server with fixed modes reads "tags" / "detailed" as the
mode); else none, and the server does what it does with a bare image (loracap serve: its default mode).

Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential back-off (honouring
Retry-After); other 4xx are the request's fault and are not. After that a RemoteServerError names the
server URL and the status, and the pipeline records it for the file. 401, 403 and 404 mean every
request will fail (bad key, wrong --api-base or model): those raise RemoteConfigError, a BackendError,
which stops the run.

The API key is read from an environment variable (OPENAI_API_KEY by default) once, at construction, and
sent as `Authorization: Bearer ...`. It never appears in repr() or in an error message: any occurrence
in a server's error text is replaced by "***".
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import ANY_MODE, BackendError, GenerationSettings

if TYPE_CHECKING:
    from PIL import Image

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})
MAX_BACKOFF_S = 30.0
_MAX_MESSAGE = 300


class RemoteServerError(Exception):
    """A request to the remote server failed for good; the message names the server and the status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteConfigError(RemoteServerError, BackendError):
    """The server refuses every request (bad key, wrong URL or model): no point going on."""


class _Secret:
    """Holds the API key; prints as *** so it cannot leak through repr(), vars() or a traceback."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "***" if self.value else "None"

    __str__ = __repr__


@dataclass
class RemoteInputs:
    """What `prepare` hands to `generate`: one data URL and one text (or None) per image."""

    urls: list[str]
    texts: list[str | None]

    def __repr__(self) -> str:  # the data URLs are megabytes of base64
        return f"RemoteInputs({len(self.urls)} images, texts={self.texts!r})"


class OpenAIRemoteBackend:
    modes: tuple[str, ...] = (ANY_MODE,)
    # A remote loracap server in mode "tags" returns a tag list; everything else is prose.
    tag_modes: frozenset[str] = frozenset({"tags"})
    instructions = True

    def __init__(
        self,
        model: str,
        api_base: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120,
        max_retries: int = 4,
        image_side: int = 1024,
        max_image_side: int = 2048,
        image_format: str = "jpeg",
        backoff_s: float = 0.5,
    ) -> None:
        try:
            import httpx  # noqa: F401 - fail here, with the fix, not on the first image
        except ImportError as exc:
            raise BackendError("a remote model needs httpx: pip install 'loracap[serve]'") from exc
        if not api_base.startswith(("http://", "https://")):
            raise BackendError(
                f"api_base must be an http(s) URL such as http://host:8000/v1, not {api_base!r}"
            )
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        if image_format.lower() not in ("jpeg", "jpg", "png"):
            raise ValueError(f"image_format must be 'jpeg' or 'png', not {image_format!r}")
        self.name = model
        self.model = model
        self.api_base = api_base.rstrip("/")
        self.url = f"{self.api_base}/chat/completions"
        self.api_key_env = api_key_env
        self._key = _Secret(os.environ.get(api_key_env) or None)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # The pipeline decodes images with the shorter side at least image_side; the server's model
        # resizes again, so there is no point sending more.
        self.image_side = image_side
        self.max_image_side = max_image_side
        self.image_format = "png" if image_format.lower() == "png" else "jpeg"
        self.default_batch_size = 2 * concurrency  # keeps the pool busy while the slowest request ends
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        key = "set" if self._key.value else "not set"
        where = f"model={self.model!r}, api_base={self.api_base!r}"
        return f"OpenAIRemoteBackend({where}, ${self.api_key_env} {key})"

    # --- protocol ---

    def prepare(
        self, images: list[Image.Image], mode: str, prompt: str | list[str] | None = None
    ) -> RemoteInputs:
        """`prompt`: one for the batch or one per image; without one, the mode name (unless "*")."""
        if isinstance(prompt, list):
            if len(prompt) != len(images):
                raise ValueError(f"{len(prompt)} prompts for {len(images)} images")
            texts: list[str | None] = [p or None for p in prompt]
        else:
            texts = [prompt or (mode if mode != ANY_MODE else None)] * len(images)
        return RemoteInputs([self._data_url(image) for image in images], texts)

    def generate(self, inputs: RemoteInputs, settings: GenerationSettings) -> list[str]:
        n = settings.captions_per_image
        if n > 1 and not settings.do_sample:  # the chat-completions API has no beam search
            raise BackendError(
                f"{self.name}: a remote model writes several captions by sampling; use --temperature "
                "(and --seed) instead of --num-beams"
            )
        # One request per caption, each with its own seed: `n` is not served everywhere (loracap serve,
        # Ollama), a seed is; image by image, as the local backends return them.
        bodies = [
            self._body(url, text, settings, copy)
            for url, text in zip(inputs.urls, inputs.texts, strict=True)
            for copy in range(n)
        ]
        if len(bodies) <= 1:
            return [self._post(body) for body in bodies]
        with ThreadPoolExecutor(
            min(self.concurrency, len(bodies)), thread_name_prefix="loracap-remote"
        ) as pool:
            return list(pool.map(self._post, bodies))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> OpenAIRemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ---

    def _data_url(self, image: Image.Image) -> str:
        from PIL import Image as PILImage

        from ..inputs.decode import to_rgb

        image = to_rgb(image)
        if max(image.size) > self.max_image_side:
            scale = self.max_image_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, PILImage.Resampling.LANCZOS, reducing_gap=2.0)
        buffer = io.BytesIO()
        if self.image_format == "png":
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format="JPEG", quality=95)
        return f"data:image/{self.image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"

    def _body(
        self, url: str, text: str | None, settings: GenerationSettings, copy: int = 0
    ) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if text:
            content.append({"type": "text", "text": text})
        content.append({"type": "image_url", "image_url": {"url": url}})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
        }
        if settings.max_new_tokens:
            body["max_tokens"] = settings.max_new_tokens
        if settings.do_sample:
            body.update(_sampling_fields(settings, url, copy))
        return body

    def _client_or_new(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                    limits=httpx.Limits(
                        max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                    ),
                )
            return self._client

    def _post(self, body: dict[str, Any]) -> str:
        import httpx

        client = self._client_or_new()
        headers = {"Authorization": f"Bearer {self._key.value}"} if self._key.value else {}
        failure = ""
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                response = client.post(self.url, json=body, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts
                failure, status = f"{type(exc).__name__}: {exc}", None
            else:
                status = response.status_code
                if status == 200:
                    return self._caption(response)
                failure = f"HTTP {status}: {self._server_message(response)}"
                if status in FATAL_STATUSES:
                    hint = (
                        f" (check ${self.api_key_env})"
                        if status in (401, 403)
                        else " (check the URL and model)"
                    )
                    raise RemoteConfigError(self._redact(f"{self.url}: {failure}{hint}"), status)
                if status not in RETRY_STATUSES:
                    raise RemoteServerError(self._redact(f"{self.url}: {failure}"), status)
                retry_after = _retry_after(response)
            if attempt < self.max_retries:
                delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.75, 1.0)
                time.sleep(max(delay, min(retry_after, 2 * MAX_BACKOFF_S)))
        attempts = self.max_retries + 1
        raise RemoteServerError(
            self._redact(f"{self.url}: {failure} (gave up after {attempts} attempts)"), status
        )

    def _caption(self, response: Any) -> str:
        try:
            message = response.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteServerError(
                self._redact(
                    f"{self.url}: HTTP 200 but not a chat completion: {response.text[:_MAX_MESSAGE]!r}"
                ),
                200,
            ) from exc
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content.strip() if isinstance(content, str) else ""

    def _server_message(self, response: Any) -> str:
        text = response.text
        try:
            error = json.loads(text).get("error")
            text = error.get("message", text) if isinstance(error, dict) else str(error or text)
        except (ValueError, AttributeError):
            pass
        text = " ".join(str(text).split()) or response.reason_phrase
        return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."

    def _redact(self, message: str) -> str:
        key = self._key.value
        return message.replace(key, "***") if key else message


def _retry_after(response: Any) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0  # an HTTP date: rare, and the back-off covers it


def _sampling_fields(settings: GenerationSettings, url: str, copy: int) -> dict[str, Any]:
    """The request fields that sample: OpenAI's temperature, top_p and seed (per image and caption, from
    the run's seed and the image, so a re-run asks for the same captions); top_k only when given, since
    OpenAI's API has none (vLLM and llama.cpp take it; a strict server refuses it by name)."""
    from .sampling import copy_seed

    fields: dict[str, Any] = {"temperature": settings.temperature or 1.0}
    if settings.top_p is not None:
        fields["top_p"] = settings.top_p
    if settings.top_k is not None:
        fields["top_k"] = settings.top_k
    if settings.seed is not None:
        # OpenAI-style servers take seeds that fit a signed 32-bit integer or so.
        fields["seed"] = copy_seed(settings.seed, url.encode(), copy) % (2**31)
    return fields
