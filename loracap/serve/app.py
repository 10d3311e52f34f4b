"""An OpenAI-compatible captioning server: `POST /v1/chat/completions` with one image, get its caption.

    app = create_app(load_backend("microsoft/Florence-2-base"), mode="caption")
    serve("microsoft/Florence-2-base", host="0.0.0.0", port=8000)   # load_backend + uvicorn

The request is OpenAI's chat format, validated by the pydantic models below, which `/openapi.json`
publishes: optional system messages and one user message whose content holds one `image_url` part
with a `data:` URL (base64). The server never fetches http(s) URLs: a captioning box must not be made to
reach into the network on a client's behalf. It reads no conversation: assistant messages and further
user messages are refused. The image is decoded with loracap's own rules (format from the content, never
the declared media type; EXIF rotation; alpha on mid-grey; decompression-bomb limit).

What the text means depends on the model:

- A model that follows instructions (`backend.instructions`, the chat VLMs) gets the text as its prompt
  and the system message as its chat template's system turn. Without text, the server's `prompt` is
  used; without that either, the request is refused (400).
- Any other model (Florence-2, BLIP, ViT-GPT2) has fixed modes. A text that is exactly a loracap mode
  name ("tags", "caption", "detailed", ...) selects that mode, and a mode the model cannot do is a 400.
  Any other text ("Describe this image.", what generic OpenAI clients send) and the system message are
  not instructions it can follow: the server's default mode is used, so stock clients work unchanged.
- The body may also carry a non-OpenAI field `"mode"` that selects the mode explicitly (it wins over
  the text).

The text (system and user together) is bounded by `max_prompt_tokens`, counted with the model's own
tokenizer before the image is decoded or anything is queued.

Parameters: `max_tokens` / `max_completion_tokens` (the latter wins) limit the caption, up to what the
model's decoder holds. Decoding is greedy unless `temperature` is above 0 or `top_p` below 1, which
sample; a `seed` makes sampling repeatable (a seeded request is captioned in a batch of its own). `stop`
cuts the caption at the first stop string. `n` must be 1 and `stream` false; `model` is not checked (the
server has one model and answers with its name). Any other parameter (`logprobs`, `tools`,
`response_format`, ...) is refused with a 400 that names it, rather than silently ignored.
`finish_reason` is "length" when the token limit cut the caption, else "stop"; `usage` counts the model's
own tokens (for backends that report them, loracap's local ones; otherwise it is null).

Concurrent requests are batched: requests that arrive within `batch_wait_ms` of each other (at most
`max_batch`) and ask for the same mode, settings and system message (and, for models without
instructions, the same prompt) share one `backend.prepare` + `backend.generate_detailed` (or `generate`)
call, run in a single model thread, so the event loop never waits on the model. Instruction-following
models get one prompt per image in that call.
A request whose client disconnects is dropped from the queue, and a batch whose clients have all gone
stops generating (backends with `generate_detailed`, loracap's local ones). When `serve` shuts down
(SIGTERM, Ctrl-C), waiting and running requests get 503 at once and generation stops, so the process
exits within seconds instead of after the whole queue.

With `api_key`, the /v1 routes need `Authorization: Bearer <key>` (401 otherwise; compared in constant
time, checked before the body is read, never logged). /health and /openapi.json stay open.

Every client mistake is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`;
a 500 means a real fault of the server or the model.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.metadata import version
from typing import Any

import pydantic_core
from fastapi import APIRouter, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends.base import (
    ANY_MODE,
    Backend,
    BackendError,
    Generation,
    GenerationSettings,
    check_mode,
    decoder_positions,
)
from ..config import settings_for
from ..inputs import ImageDecodeError, load_image_bytes
from ..postprocess import PostProcess, postprocess
from ..styles import FLORENCE_TASKS
from .batcher import Batcher, result_unless_disconnected
from .config import ServeConfig
from .protocol import (
    ERROR_RESPONSES,
    MAX_TOKENS_LIMIT,
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    ChatRequest,
    ModelList,
    cut_at_stop,
    decode_data_url,
    error_response,
    read_chat_request,
    validation_error,
)

log = logging.getLogger("loracap.serve")

# Every fixed caption mode loracap knows (Florence-2's task names; BLIP and ViT-GPT2 have a subset): a
# request text equal to one of them selects that mode.
MODE_NAMES = FLORENCE_TASKS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PROMPT_TOKENS = 1024
# Counting tokens takes time linear in the text, so a prompt is first counted only as far as this many
# characters per allowed token: far more than a usual text needs to go over the limit. Only a text of
# unusually long tokens (runs of one character) that stays under it there is counted whole.
HEAD_CHARS_PER_TOKEN = 16
# Seconds uvicorn gives open requests at shutdown before cancelling them: a backstop, since waiting and
# running captions are failed at once anyway.
SHUTDOWN_GRACE_S = 10


# --- the HTTP layer -----------------------------------------------------------------------------------


class _JsonRequest(Request):
    """A request whose body is read up to `app.state.max_body_bytes` (413 beyond) and parsed by pydantic's
    JSON parser, which refuses lone surrogates ("\\ud800") and deep nesting with an error where the
    standard library would decode the surrogate or raise RecursionError."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit = self.app.state.max_body_bytes
            too_large = ApiError(413, f"request body over {limit} bytes", code="request_too_large")
            declared = self.headers.get("content-length")
            if declared is not None:
                if not declared.isdigit():
                    raise ApiError(400, "invalid Content-Length header", code="invalid_request")
                if int(declared) > limit:
                    raise too_large
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = pydantic_core.from_json(await self.body(), allow_inf_nan=False)
            except ValueError as exc:
                raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from exc
        return self._json


def _check_key(request: Request, api_key: str) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the key's first wrong byte: no guessing by timing.
    if not (scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())):
        raise ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class _V1Route(APIRoute):
    """The /v1 routes: the key, the content type and the body are checked here, before FastAPI reads the
    body, so that a client without the key gets 401 whatever it sent, and a bad body one clean 4xx."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            state = request.app.state
            if state.api_key is not None:
                _check_key(request, state.api_key)
            if request.method == "POST":
                content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if content_type != "application/json":
                    raise ApiError(
                        415,
                        f"Content-Type must be application/json, not {content_type or 'missing'!r}",
                        code="bad_content_type",
                    )
                request = _JsonRequest(request.scope, request.receive)
                await request.json()  # parsed once, here; FastAPI then reads the cached value
            return await handler(request)

        return checked


def _token_counter(backend: Backend) -> Callable[[str], int]:
    """Counts a text's tokens with the backend's tokenizer (4 characters a token when it has none)."""
    tokenizer = getattr(backend, "tokenizer", None) or getattr(
        getattr(backend, "processor", None), "tokenizer", None
    )
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:
        from tokenizers import Tokenizer

        # A copy of its own: the model thread's processor reconfigures the shared tokenizer (padding,
        # truncation) while it works, and a fast tokenizer used from two threads at once fails.
        own = Tokenizer.from_str(fast.to_str())
        own.no_truncation()
        own.no_padding()
        return lambda text: len(own.encode(text, add_special_tokens=False).ids)
    if tokenizer is not None:
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    return lambda text: math.ceil(len(text) / 4)


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
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    api_key: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible app around a loaded backend (see the module docstring for the API).

    mode: the default mode (for backends whose modes are ("*",) it becomes "*").
    tags: whether the default style's output is a tag list, so tag clean-up applies (default: `mode`
        is one of the backend's tag modes). A chat model's mode says nothing about it (it is "*"), so
        `serve` passes what the caption style says, as `loracap caption` does.
    prompt: for instruction-following backends, the instruction used when a request has no text; for
        the others, the raw prompt passed with every request (a Florence-2 task token, a BLIP prefix).
    generation: default decoding settings; a request's max_tokens overrides max_new_tokens, its
        temperature / top_p choose sampling.
    options: post-processing of every caption. Default: only model-agnostic clean-up (special tokens,
        whitespace); no boilerplate stripping, trigger or prefix, which the client can apply itself.
    max_image_pixels: decompression-bomb limit per image (default Pillow's MAX_IMAGE_PIXELS); larger
        images get 413.
    max_body_bytes: larger request bodies get 413.
    max_prompt_tokens: requests whose text (system and user) has more tokens get 400.
    api_key: when set, the /v1 routes need `Authorization: Bearer <api_key>` (401 otherwise).
    """
    check_mode(backend, mode)
    mode = _backend_mode(backend, mode)
    instructions = bool(getattr(backend, "instructions", False))
    if instructions and prompt is None and mode == ANY_MODE:
        log.info("%s follows instructions: requests without a text part will be refused", backend.name)
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be 1 or more, got {max_prompt_tokens}")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    name = model_name or backend.name
    default_tags = mode in backend.tag_modes if tags is None else tags
    generation = generation or GenerationSettings()
    if generation.captions_per_image > 1:  # OpenAI's `n` above 1 is refused too
        raise ValueError("loracap serve answers one caption per request: leave out captions_per_image")
    options = options or PostProcess(strip_boilerplate=False)
    system_messages = "system" in inspect.signature(backend.prepare).parameters  # chat models take one
    count_tokens = _token_counter(backend)
    # A decoder with learned positions (BLIP, BART, GPT-2) fails past its last one: max_tokens stops
    # short of it, leaving room for the tokens the decoder starts from (BLIP's prompt among them).
    positions = decoder_positions(getattr(backend, "model", None))
    max_tokens_limit = MAX_TOKENS_LIMIT
    if positions is not None:
        reserve = 2 + (count_tokens(prompt) if prompt and not instructions else 0)
        max_tokens_limit = max(1, min(MAX_TOKENS_LIMIT, positions - reserve))
    if (generation.max_new_tokens or 0) > max_tokens_limit:
        raise ValueError(
            f"max_new_tokens {generation.max_new_tokens} is more than {name} can write ({max_tokens_limit})"
        )
    batcher = Batcher(
        backend, max_batch=max_batch, wait_s=batch_wait_ms / 1000, per_image_prompts=instructions
    )
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.closing = False  # the app may be served again after a shutdown
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="loracap",
        version=version("loracap"),
        description="OpenAI-compatible image captioning: one data: URL image per chat completion.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.batcher = batcher
    app.state.api_key = api_key
    app.state.max_body_bytes = max_body_bytes

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(
            exc.status, exc.message, code=exc.code, param=exc.param, type=exc.type, headers=exc.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, validation_error(exc.errors()))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unexpected error while handling %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", code="server_error")

    def resolve(request: ChatRequest) -> tuple[str, str | None, str | None, bool]:
        """The (mode, prompt, system, tags) a request asks for; `tags`: tag clean-up applies."""
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
            # Free text is no instruction to this model, the system message neither: the server's default
            # style, unless the request names a mode of its own.
            return chosen, prompt, None, default_tags if wanted is None else chosen in backend.tag_modes
        if request.system and not system_messages:
            raise ApiError(
                400, f"{name} takes no system message", code="unsupported_system_message", param="messages"
            )
        if request.text:
            # The client's own instruction: the server cannot tell whether it asks for tags.
            return chosen, request.text, request.system, chosen in backend.tag_modes
        if not prompt:
            raise ApiError(
                400,
                f"{name} follows instructions: add a text part saying what to write",
                code="missing_prompt",
                param="messages",
            )
        return chosen, prompt, request.system, default_tags

    def settings_for(request: ChatRequest) -> GenerationSettings:
        settings = generation
        if request.max_tokens is not None:
            if request.max_tokens > max_tokens_limit:
                raise ApiError(
                    400,
                    f"max_tokens is {request.max_tokens}; {name} writes at most {max_tokens_limit} tokens",
                    code="invalid_value",
                    param="max_tokens",
                )
            floor = min(generation.min_new_tokens or 0, request.max_tokens) or None
            settings = replace(settings, max_new_tokens=request.max_tokens, min_new_tokens=floor)
        # The request chooses greedy or sampling, whatever the server's settings say; a sampled one leaves
        # beam search (which does not mix with sampling) and the batcher seeds it (request.seed). top_p 0
        # (which OpenAI accepts) keeps only the most likely token: greedy.
        if request.temperature > 0 and request.top_p > 0:
            return replace(
                settings,
                do_sample=True,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=None,
                seed=None,
                num_beams=1,
                length_penalty=None,
            )
        return replace(settings, do_sample=False, temperature=None, top_p=None, top_k=None, seed=None)

    async def check_prompt_length(request: ChatRequest) -> None:
        text = "\n".join(t for t in (request.system, request.text) if t)
        head = text[: (max_prompt_tokens + 1) * HEAD_CHARS_PER_TOKEN]
        # In a worker thread: a long text must not hold up the event loop while it is counted.
        count = await run_in_threadpool(count_tokens, head)
        if count <= max_prompt_tokens and len(head) < len(text):
            count = await run_in_threadpool(count_tokens, text)  # very long tokens: count it all
        if count > max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt (system and user text) is over this server's limit of {max_prompt_tokens} "
                "tokens; send a shorter one",
                code="prompt_too_long",
                param="messages",
            )

    v1 = APIRouter(
        prefix="/v1",
        route_class=_V1Route,
        responses=ERROR_RESPONSES,
        # Declares the bearer scheme in /openapi.json; the key itself is checked by _V1Route, earlier.
        dependencies=[Security(HTTPBearer(auto_error=False))] if api_key is not None else [],
    )

    @v1.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        chat = read_chat_request(body)
        await check_prompt_length(chat)  # before any expensive work
        chosen_mode, chosen_prompt, system, tags = resolve(chat)
        settings = settings_for(chat)
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
        future = batcher.submit(image, chosen_mode, chosen_prompt, settings, system=system, seed=chat.seed)
        try:
            result = await result_unless_disconnected(request, future)
        except BackendError as exc:
            raise ApiError(400, str(exc), code="unsupported_request") from exc
        except ApiError:
            raise
        except Exception as exc:
            log.error("captioning failed: %s: %s", type(exc).__name__, exc)
            raise ApiError(
                500, f"the model failed: {type(exc).__name__}: {exc}", code="model_error", type="server_error"
            ) from exc
        usage = None
        if isinstance(result, Generation):
            raw, truncated = result.text, result.truncated
            usage = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
        else:  # a backend that reports no token counts
            raw, truncated = result, False
        cut = cut_at_stop(raw, chat.stop)
        caption = postprocess(raw if cut is None else cut, options, tags=tags)
        finish = "length" if truncated and cut is None else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": caption}, "finish_reason": finish}
            ],
            "usage": usage,
        }

    @v1.get("/models", response_model=ModelList)
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": "loracap"}],
        }

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "modes": list(backend.modes), "mode": mode}

    return app


def _uvicorn_server(app: FastAPI, **config: Any) -> Any:
    """A uvicorn server for `app` that stops the model's work as soon as it starts shutting down.

    uvicorn's graceful shutdown waits for every open request before it tells the app, and a queue of
    long captions could hold a SIGTERM for minutes: the batcher is closed first instead (its requests
    get 503), and requests still open after SHUTDOWN_GRACE_S are cancelled."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, *args: Any, **kwargs: Any) -> None:
            app.state.batcher.close()
            await super().shutdown(*args, **kwargs)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **config))


def serve(config: ServeConfig | str, *, api_key: str | None = None, **settings: Any) -> None:
    """Load the model once and serve it until interrupted (SIGTERM or Ctrl-C).

    `serve(ServeConfig(...))`, or the model with keyword settings as `loracap serve`'s flags name them
    (`serve("microsoft/Florence-2-base", port=8080, style="detailed")`). `api_key` is the key itself;
    without it, the one in the environment variable `api_key_env` names (ValueError when that is unset).
    The caption style sets the default: a fixed-mode model's mode, or the instruction a chat model gets
    when a request brings no text of its own.
    """
    from ..backends import load_backend
    from ..request import resolve_request

    config = settings_for(ServeConfig, config, settings, first="model", where="serve settings")
    if api_key is None and config.api_key_env:
        api_key = os.environ.get(config.api_key_env, "").strip()
        if not api_key:  # refuse to start open when a key was asked for
            raise ValueError(f"api_key_env: ${config.api_key_env} is not set or empty")
    config.style_choice.check()  # before minutes of model loading
    backend = load_backend(
        config.model, device=config.device, dtype=config.dtype, quant=config.quant, engine=config.engine
    )
    request = resolve_request(config.style_choice, backend)
    app = create_app(
        backend,
        mode=request.mode,
        tags=request.tags,
        prompt=request.prompt_for(),
        generation=config.generation,
        model_name=config.model_name,
        max_batch=config.max_batch,
        batch_wait_ms=config.batch_wait_ms,
        max_image_pixels=config.max_image_pixels,
        max_body_bytes=int(config.max_body_mb * 1024 * 1024),
        max_prompt_tokens=config.max_prompt_tokens,
        api_key=api_key,
    )
    if api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", config.host)
    _uvicorn_server(app, host=config.host, port=config.port, log_level=config.log_level).run()
