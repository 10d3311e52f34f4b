"""An OpenAI-compatible captioning server: `POST /v1/chat/completions` with one image, get its caption.

    app = create_app(load_backend("microsoft/Florence-2-base"), mode="caption")
    serve("microsoft/Florence-2-base", host="0.0.0.0", port=8000)   # load_backend + uvicorn

The request is OpenAI's chat format: the last user message holds one `image_url` part whose URL is a
`data:` URL (base64). The server never fetches http(s) URLs: a captioning box must not be made to reach
into the network on a client's behalf. The image is decoded with loracap's own rules (format from the
content, never the declared media type; EXIF rotation; alpha on mid-grey; decompression-bomb limit).

What the text part means depends on the model:

- A model that follows instructions (`backend.instructions`, the chat VLMs) gets the text as its prompt.
  Without text, the server's `prompt` is used; without that either, the request is refused (400).
- Any other model (Florence-2, BLIP, ViT-GPT2) has fixed modes. A text that is exactly a loracap mode
  name ("tags", "caption", "detailed", ...) selects that mode, and a mode the model cannot do is a 400.
  Any other text ("Describe this image.", what generic OpenAI clients send) is ignored and the server's
  default mode is used, so stock clients work unchanged.
- The body may also carry a non-OpenAI field `"mode"` that selects the mode explicitly (it wins over
  the text).

Decoding is greedy: `temperature`, `top_p` and the like are accepted and ignored. `max_tokens` (or
`max_completion_tokens`) sets the caption's token limit. `n` must be 1 and `stream` false. `model` is
not checked: the server has one model and answers with its name. `usage` token counts are not measured
and are reported as 0.

Concurrent requests are batched: requests that arrive within `batch_wait_ms` of each other (at most
`max_batch`) and ask for the same mode and settings (and, for models without instructions, the same
prompt) share one `backend.prepare` + `backend.generate` call, run in a single model thread, so the event
loop never waits on the model. Instruction-following models get one prompt per image in that call.

Every client mistake is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`;
a 500 means a real fault of the server or the model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends.base import ANY_MODE, Backend, BackendError, GenerationSettings, check_mode
from ..inputs import ImageDecodeError, load_image_bytes
from ..postprocess import PostProcess, postprocess
from ..styles import FLORENCE_TASKS, Style

log = logging.getLogger("loracap.serve")

# Every fixed caption mode loracap knows (Florence-2's task names; BLIP and ViT-GPT2 have a subset): a
# request text equal to one of them selects that mode.
MODE_NAMES = FLORENCE_TASKS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_TOKENS_LIMIT = 4096


# --- errors -------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type


def error_response(
    status: int, message: str, *, code: str, param: str | None = None, type: str | None = None
):
    if type is None:
        type = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --- images -------------------------------------------------------------------------------------------


def decode_data_url(url: str) -> bytes:
    """The bytes in a base64 `data:` URL; ApiError(400) for anything else, http(s) URLs included."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
        what = f"{scheme} URLs are not fetched" if scheme in ("http", "https") else "not a data: URL"
        raise ApiError(
            400,
            f"image_url: {what}; only data: URLs are accepted (data:image/png;base64,...)",
            code="invalid_image_url",
            param="image_url",
        )
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ApiError(400, "image_url: malformed data: URL (no comma)", code="invalid_image_url")
    if not header.lower().endswith(";base64"):
        raise ApiError(400, "image_url: the data: URL must be base64 (';base64,')", code="invalid_image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"image_url: broken base64 data ({exc})", code="invalid_base64") from exc


# --- requests -----------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    text: str
    image_url: str
    max_tokens: int | None
    mode: str | None


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat-completions body; ApiError(400) with the reason otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", code="invalid_request", param="messages")
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise ApiError(400, "no user message in 'messages'", code="invalid_request", param="messages")
    content = user.get("content")
    texts: list[str] = []
    urls: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, "a text part needs a 'text' string", code="invalid_request")
                texts.append(part["text"])
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise ApiError(400, "image_url part without a url string", code="invalid_request")
                urls.append(url)
            else:
                raise ApiError(
                    400,
                    f"unsupported content part {kind!r}: expected 'text' or 'image_url' parts",
                    code="invalid_request",
                    param="messages",
                )
    else:
        raise ApiError(400, "the user message has no content", code="invalid_request", param="messages")
    if not urls:
        raise ApiError(
            400,
            "no image: send one image_url part with a data: URL (data:image/png;base64,...)",
            code="missing_image",
            param="messages",
        )
    if len(urls) > 1:
        raise ApiError(400, f"one image per request, got {len(urls)}", code="too_many_images")
    if body.get("stream"):
        raise ApiError(
            400, "streaming is not supported; send stream=false", code="unsupported", param="stream"
        )
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported", code="unsupported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise ApiError(
            400,
            f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}",
            code="invalid_value",
            param="max_tokens",
        )
    mode = body.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise ApiError(400, "'mode' must be a string", code="invalid_value", param="mode")
    return ChatRequest("\n".join(texts).strip(), urls[0], max_tokens, mode)


# --- batching -----------------------------------------------------------------------------------------

# (mode, prompt shared by the group or None when each job brings its own, settings)
_Key = tuple[str, "str | None", GenerationSettings]


@dataclass
class _Job:
    image: Image.Image
    key: _Key
    prompt: str | None
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests and captions each group with one prepare + generate call.

    One model thread runs the backend, so requests queue while it works and the next batch is whatever
    arrived meanwhile (up to max_batch). Jobs are grouped by (mode, prompt, settings); with
    `per_image_prompts` (instruction-following backends, whose prepare takes one prompt per image) the
    prompt is not part of the group, so clients with different instructions still share a batch.
    """

    def __init__(
        self, backend: Backend, *, max_batch: int, wait_s: float, per_image_prompts: bool = False
    ) -> None:
        self.backend = backend
        self.per_image_prompts = per_image_prompts
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_s)
        self.pending: list[_Job] = []
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():  # not started yet, or died (it logs why)
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loracap-model")
            self.event = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        for job in self.pending:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "the server is shutting down", code="unavailable"))
        self.pending = []
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    async def submit(
        self, image: Image.Image, mode: str, prompt: str | None, settings: GenerationSettings
    ) -> str:
        self.start()
        assert self.event is not None
        future = asyncio.get_running_loop().create_future()
        key = (mode, None if self.per_image_prompts else prompt, settings)
        self.pending.append(_Job(image, key, prompt, future))
        self.event.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.event is not None
        while True:
            await self.event.wait()
            deadline = loop.time() + self.wait_s
            while len(self.pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self.event.clear()
                try:
                    await asyncio.wait_for(self.event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            if self.pending:
                self.event.set()
            else:
                self.event.clear()
            groups: dict[_Key, list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # the client went away
                    groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                try:
                    results = await loop.run_in_executor(self.executor, self._caption, key, group)
                except Exception as exc:  # noqa: BLE001 - the executor itself failed; fail this group only
                    results = [exc] * len(group)
                for job, result in zip(group, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _caption(self, key: _Key, jobs: list[_Job]) -> list[str | BaseException]:
        """In the model thread: one call for the group; if it fails, one by one to isolate the culprit."""
        try:
            return list(self._generate(key, jobs))
        except BackendError as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001
            if len(jobs) == 1:
                return [exc]
        results: list[str | BaseException] = []
        for job in jobs:
            try:
                results.extend(self._generate(key, [job]))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def _generate(self, key: _Key, jobs: list[_Job]) -> list[str]:
        mode, prompt, settings = key
        images = [job.image for job in jobs]
        prompts: str | list[str] | None = prompt
        if self.per_image_prompts:
            distinct = {job.prompt for job in jobs}
            # One prompt for the batch when all agree (every backend takes that), else one per image.
            prompts = distinct.pop() if len(distinct) == 1 else [job.prompt or "" for job in jobs]
        captions = self.backend.generate(self.backend.prepare(images, mode, prompts), settings)
        if len(captions) != len(images):
            raise RuntimeError(f"the backend returned {len(captions)} captions for {len(images)} images")
        return captions


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching loop stopped; it restarts with the next request", exc_info=task.exception())


# --- the app ------------------------------------------------------------------------------------------


def _backend_mode(backend: Backend, mode: str) -> str:
    """The mode `backend` is asked for, once it accepts `mode`: that mode, or ANY_MODE for a model that
    takes any (a chat model)."""
    return mode if mode in backend.modes else ANY_MODE


def create_app(
    backend: Backend,
    *,
    mode: str = "caption",
    tags: bool | None = None,
    model_name: str | None = None,
    max_image_pixels: int | None = None,
    max_batch: int = 16,
    batch_wait_ms: float = 5.0,
    prompt: str | None = None,
    generation: GenerationSettings | None = None,
    options: PostProcess | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app around a loaded backend (see the module docstring for the API).

    mode: the default mode (for backends whose modes are ("*",) it becomes "*").
    tags: whether the default style's output is a tag list, so tag clean-up applies (default: `mode`
        is one of the backend's tag modes). A chat model's mode says nothing about it (it is "*"), so
        `serve` passes what the caption style says, as `loracap caption` does.
    prompt: for instruction-following backends, the instruction used when a request has no text; for
        the others, the raw prompt passed with every request (a Florence-2 task token, a BLIP prefix).
    generation: default decoding settings; a request's max_tokens overrides max_new_tokens.
    options: post-processing of every caption. Default: only model-agnostic clean-up (special tokens,
        whitespace); no boilerplate stripping, trigger or prefix, which the client can apply itself.
    max_image_pixels: decompression-bomb limit per image (default Pillow's MAX_IMAGE_PIXELS); larger
        images get 413.
    max_body_bytes: larger request bodies get 413.
    """
    check_mode(backend, mode)
    mode = _backend_mode(backend, mode)
    instructions = bool(getattr(backend, "instructions", False))
    if instructions and prompt is None and mode == ANY_MODE:
        log.info("%s follows instructions: requests without a text part will be refused", backend.name)
    name = model_name or backend.name
    default_tags = mode in backend.tag_modes if tags is None else tags
    generation = generation or GenerationSettings()
    options = options or PostProcess(strip_boilerplate=False)
    batcher = Batcher(
        backend, max_batch=max_batch, wait_s=batch_wait_ms / 1000, per_image_prompts=instructions
    )
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="loracap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param, type=exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {exc.errors()}", code="invalid_request")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unexpected error while handling %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", code="server_error")

    def resolve(request: ChatRequest) -> tuple[str, str | None, bool]:
        """The (mode, prompt, tags) a request asks for; `tags`: tag clean-up applies to its caption."""
        text_mode = request.text.lower() if request.text.lower() in MODE_NAMES else None
        wanted = request.mode or (None if instructions else text_mode)
        chosen = mode
        if wanted is not None:
            try:
                check_mode(backend, wanted, name=name)
            except BackendError as exc:
                raise ApiError(400, str(exc), code="unsupported_mode", param="mode") from exc
            chosen = _backend_mode(backend, wanted)
        if not instructions:
            # The server's default style, unless the request names a mode of its own.
            return chosen, prompt, default_tags if wanted is None else chosen in backend.tag_modes
        if request.text:
            # The client's own instruction: the server cannot tell whether it asks for tags.
            return chosen, request.text, chosen in backend.tag_modes
        if not prompt:
            raise ApiError(
                400,
                f"{name} follows instructions: add a text part saying what to write",
                code="missing_prompt",
                param="messages",
            )
        return chosen, prompt, default_tags

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length header", code="invalid_request")
            if int(declared) > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(
                415,
                f"Content-Type must be application/json, not {content_type or 'missing'!r}",
                code="bad_content_type",
            )
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
        chat = parse_chat_request(body)
        chosen_mode, chosen_prompt, tags = resolve(chat)
        settings = generation
        if chat.max_tokens is not None:
            floor = min(generation.min_new_tokens or 0, chat.max_tokens) or None
            settings = replace(generation, max_new_tokens=chat.max_tokens, min_new_tokens=floor)
        data = decode_data_url(chat.image_url)
        try:
            # The decompression-bomb limit is checked on the header, before any pixel is decoded.
            image = await run_in_threadpool(
                load_image_bytes,
                data,
                max_pixels=max_image_pixels,
                min_side=backend.image_side or None,
                label="<image_url>",  # errors name the request's part
            )
        except ImageDecodeError as exc:
            if exc.reason.startswith("decompression bomb"):
                raise ApiError(413, f"image too large: {exc.reason}", code="image_too_large") from exc
            raise ApiError(400, f"not a usable image: {exc.reason}", code="invalid_image") from exc
        try:
            raw_caption = await batcher.submit(image, chosen_mode, chosen_prompt, settings)
        except BackendError as exc:
            raise ApiError(400, str(exc), code="unsupported_request") from exc
        except ApiError:
            raise
        except Exception as exc:
            log.error("captioning failed: %s: %s", type(exc).__name__, exc)
            raise ApiError(
                500, f"the model failed: {type(exc).__name__}: {exc}", code="model_error", type="server_error"
            ) from exc
        caption = postprocess(raw_caption, options, tags=tags)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": caption}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": "loracap"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "modes": list(backend.modes), "mode": mode}

    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    offline: bool | None = None,
    log_level: str = "info",
    style: str | Path | Style = "caption",
    length: str | None = None,
    extras: Sequence[str] = (),
    name: str | None = None,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    **kw: Any,
) -> None:
    """Load `model` once and serve it until interrupted. `kw` goes to create_app.

    The caption style (as in `loracap caption`) sets the default: a fixed-mode model's mode, or the
    instruction a chat model gets when a request brings no text of its own.
    """
    import uvicorn

    from ..backends import load_backend
    from ..request import StyleChoice, resolve_request

    choice = StyleChoice(style, length, extras, name, prompt, prompt_file)
    choice.check()  # before minutes of model loading
    backend = load_backend(model, device=device, dtype=dtype, quant=quant, offline=offline)
    request = resolve_request(choice, backend)
    app = create_app(backend, mode=request.mode, tags=request.tags, prompt=request.prompt_for(), **kw)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
