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

import asyncio
import base64
import binascii
import inspect
import itertools
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import APIRouter, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..backends.base import (
    ANY_MODE,
    Backend,
    BackendError,
    Generation,
    GenerationSettings,
    check_mode,
    decoder_positions,
)
from ..inputs import ImageDecodeError, load_image_bytes
from ..postprocess import PostProcess, postprocess
from ..styles import FLORENCE_TASKS, Style

log = logging.getLogger("loracap.serve")

# Every fixed caption mode loracap knows (Florence-2's task names; BLIP and ViT-GPT2 have a subset): a
# request text equal to one of them selects that mode.
MODE_NAMES = FLORENCE_TASKS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PROMPT_TOKENS = 1024
MAX_TOKENS_LIMIT = 4096
# Below this, sampling is greedy decoding in all but name, and dividing logits by it can overflow.
MIN_TEMPERATURE = 1e-3
# Counting tokens takes time linear in the text, so a prompt is first counted only as far as this many
# characters per allowed token: far more than a usual text needs to go over the limit. Only a text of
# unusually long tokens (runs of one character) that stays under it there is counted whole.
HEAD_CHARS_PER_TOKEN = 16
# Seconds uvicorn gives open requests at shutdown before cancelling them: a backstop, since waiting and
# running captions are failed at once anyway.
SHUTDOWN_GRACE_S = 10


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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers


def error_response(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
):
    if type is None:
        type = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the API's schema: what /openapi.json publishes and what requests are validated against ----------


class _Strict(BaseModel):
    # Unknown fields are refused, not ignored: dropping a parameter the client set would be a lie. Strict
    # types: "5" is not a number and true is not 1.
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's "integer" includes 5.0, which strict validation alone would refuse. (The bounds go before
# the validator, or they reach /openapi.json as "ge"/"le" instead of "minimum"/"maximum".)
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_integral)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(
        description="a base64 data: URL (data:image/png;base64,...); http(s) URLs are not fetched"
    )
    detail: Literal["auto"] | None = Field(
        None, description="only 'auto': the model's processor sizes images"
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart] = Field(description="one image_url part, and optionally text")


Message = Annotated[SystemMessage | UserMessage, Field(discriminator="role")]
StopString = Annotated[str, Field(min_length=1)]


class ChatCompletionRequest(_Strict):
    """OpenAI's chat-completions request, as far as a captioner can honour it; other fields are refused."""

    model: str | None = Field(None, description="not checked: the server has one model")
    messages: list[Message] = Field(min_length=1, description="optional system messages and one user message")
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = Field(None, description="wins over max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="above 0 samples; default greedy")
    top_p: float | None = Field(None, ge=0, le=1, description="below 1 samples (nucleus sampling)")
    seed: Seed | None = Field(None, description="makes sampling repeatable")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="the caption ends before the first of these strings"
    )
    n: Literal[1] | None = None
    stream: Literal[False] | None = None
    mode: str | None = Field(None, description="loracap: a caption mode, e.g. 'tags' (fixed-mode models)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "the request is refused; the message says why"},
    "5XX": {"model": ErrorResponse, "description": "shutting down (503), or a fault of the server or model"},
}


def _validation_error(errors: Sequence[Any]) -> ApiError:
    """A 400 for pydantic's errors: the most specific one (the deepest), located in the request."""
    error = max(errors, key=lambda e: len(e["loc"]))
    loc = list(error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"])
    if not loc:
        return ApiError(
            400, f"the request body must be a JSON object ({error['msg']})", code="invalid_request"
        )
    where = ""
    for i, item in enumerate(loc):
        if isinstance(item, int):
            where += f"[{item}]"
        elif "[" in item or item == "str":
            continue  # the branch of a union pydantic tried: `str`, `list[...]`
        elif i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc) and isinstance(loc[i + 1], str):
            continue  # the tag of a tagged union (a message's role, a part's type), not a field
        else:
            where += f".{item}" if where else item
    param = str(loc[0])
    if error["type"] == "extra_forbidden":
        return ApiError(
            400,
            f"unsupported parameter {where!r}: this captioning server cannot honour it; leave it out",
            code="unsupported_parameter",
            param=param,
        )
    return ApiError(400, f"{where}: {error['msg']}", code="invalid_request", param=param)


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
    """What a validated request asks for."""

    text: str
    system: str | None
    image_url: str
    max_tokens: int | None
    mode: str | None
    temperature: float
    """0: greedy."""
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def _texts(content: str | list[Any]) -> list[str]:
    return [content] if isinstance(content, str) else [p.text for p in content if isinstance(p, TextPart)]


def read_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The request's parts; ApiError(400) for what the schema cannot say (one user message, one image)."""
    users = [m for m in body.messages if isinstance(m, UserMessage)]
    if not users:
        raise ApiError(400, "no user message in 'messages'", code="invalid_request", param="messages")
    if len(users) > 1:
        raise ApiError(
            400,
            f"{len(users)} user messages: send the image and its text in one user message "
            "(the server captions one image per request and reads no conversation)",
            code="invalid_request",
            param="messages",
        )
    content = users[0].content
    parts = [] if isinstance(content, str) else content
    urls = [
        p.image_url if isinstance(p.image_url, str) else p.image_url.url
        for p in parts
        if p.type == "image_url"
    ]
    if not urls:
        raise ApiError(
            400,
            "no image: send one image_url part with a data: URL (data:image/png;base64,...) "
            "in the user message",
            code="missing_image",
            param="messages",
        )
    if len(urls) > 1:
        raise ApiError(400, f"one image per request, got {len(urls)}", code="too_many_images")
    system = "\n".join(t for m in body.messages if isinstance(m, SystemMessage) for t in _texts(m.content))
    # Greedy unless the client asks for sampling: by a temperature above 0, or by top_p alone (at
    # OpenAI's default temperature, 1).
    top_p = 1.0 if body.top_p is None else body.top_p
    temperature = body.temperature if body.temperature is not None else 1.0 if top_p < 1 else 0.0
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return ChatRequest(
        text="\n".join(_texts(content)).strip(),
        system=system.strip() or None,
        image_url=urls[0],
        max_tokens=max_tokens,
        mode=body.mode,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=top_p,
        seed=body.seed,
        stop=stop,
    )


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` up to its first stop string, or None when it has none."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else None


# --- batching -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """What requests must share to be captioned in one call."""

    mode: str
    prompt: str | None
    """The prompt shared by the group, or None when each job brings its own."""
    system: str | None
    settings: GenerationSettings
    seed: int | None = None
    solo: int = 0
    """A seeded request's own number: it is captioned alone, so its seed alone decides its sampling."""


@dataclass
class _Job:
    image: Image.Image
    group: _Group
    prompt: str | None
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests and captions each group with one prepare + generate call.

    One model thread runs the backend, so requests queue while it works and the next batch is whatever
    arrived meanwhile (up to max_batch). Jobs are grouped by `_Group`; with `per_image_prompts`
    (instruction-following backends, whose prepare takes one prompt per image) the prompt is not part of
    the group, so clients with different instructions still share a batch.

    A job whose future is cancelled (its client went away) is skipped; a running batch stops generating
    once all its jobs are cancelled, or once `close` is called (shutdown).
    """

    def __init__(
        self, backend: Backend, *, max_batch: int, wait_s: float, per_image_prompts: bool = False
    ) -> None:
        self.backend = backend
        self.per_image_prompts = per_image_prompts
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_s)
        self.pending: list[_Job] = []
        self.running: list[_Job] = []
        self.closing = False
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._solo = itertools.count(1)

    def start(self) -> None:
        if self.task is None or self.task.done():  # not started yet, or died (it logs why)
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loracap-model")
            self.event = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(_log_crash)

    def close(self) -> None:
        """Shutdown has begun: refuse new work, answer what waits or runs with 503 now, and stop the
        running generation (the model thread checks `closing` after every token)."""
        self.closing = True
        for job in self.pending + self.running:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "the server is shutting down", code="unavailable"))
        self.pending = []

    async def stop(self) -> None:
        self.close()
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def submit(
        self,
        image: Image.Image,
        mode: str,
        prompt: str | None,
        settings: GenerationSettings,
        *,
        system: str | None = None,
        seed: int | None = None,
    ) -> asyncio.Future:
        """Queue one image; the future resolves to its Generation (or its raw caption, for a backend
        without `generate_detailed`). Cancel the future to drop the job."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="unavailable")
        self.start()
        assert self.event is not None
        seeded = seed is not None and settings.do_sample  # greedy decoding needs no seed
        group = _Group(
            mode,
            None if self.per_image_prompts else prompt,
            system,
            settings,
            seed if seeded else None,
            next(self._solo) if seeded else 0,
        )
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Job(image, group, prompt, future))
        self.event.set()
        return future

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
                except TimeoutError:
                    break
            self.pending = [job for job in self.pending if not job.future.done()]  # clients gone
            jobs, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            if self.pending:
                self.event.set()
            else:
                self.event.clear()
            groups: dict[_Group, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for group, members in groups.items():
                if all(job.future.done() for job in members):
                    continue
                self.running = members
                try:
                    results = await loop.run_in_executor(self.executor, self._caption, group, members)
                except Exception as exc:  # noqa: BLE001 - the executor itself failed; fail this group only
                    results = [exc] * len(members)
                finally:
                    self.running = []
                for job, result in zip(members, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _caption(self, group: _Group, jobs: list[_Job]) -> list[Generation | str | BaseException]:
        """In the model thread: one call for the group; if it fails, one by one to isolate the culprit."""
        try:
            return list(self._generate(group, jobs))
        except BackendError as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001
            if len(jobs) == 1:
                return [exc]
        results: list[Generation | str | BaseException] = []
        for job in jobs:
            try:
                results.extend(self._generate(group, [job]))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def _generate(self, group: _Group, jobs: list[_Job]) -> list[Generation] | list[str]:
        images = [job.image for job in jobs]
        prompts: str | list[str] | None = group.prompt
        if self.per_image_prompts:
            distinct = {job.prompt for job in jobs}
            # One prompt for the batch when all agree (every backend takes that), else one per image.
            prompts = distinct.pop() if len(distinct) == 1 else [job.prompt or "" for job in jobs]
        system = {"system": group.system} if group.system else {}
        inputs = self.backend.prepare(images, group.mode, prompts, **system)
        if group.seed is not None:
            import torch

            # Only this thread generates, and a seeded job is alone in its batch: seeding the global
            # generator right before the call makes its sampling depend on the seed alone.
            torch.manual_seed(group.seed)
        detailed = getattr(self.backend, "generate_detailed", None)
        if detailed is not None:

            def interrupt() -> bool:  # read in the model thread; a future's state is one attribute
                return self.closing or all(job.future.done() for job in jobs)

            results: list[Generation] | list[str] = detailed(inputs, group.settings, interrupt)
        else:
            results = self.backend.generate(inputs, group.settings)
        if len(results) != len(images):
            raise RuntimeError(f"the backend returned {len(results)} captions for {len(images)} images")
        return results


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching loop stopped; it restarts with the next request", exc_info=task.exception())


async def result_unless_disconnected(request: Request, future: asyncio.Future) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (the batcher skips it, or
    stops the batch if no client of it is left) and a 499 raised."""

    async def disconnected() -> None:
        # The body has been read, so the server's receive() waits until the client disconnects.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        future.cancel()  # a no-op once it is done; drops the job when this handler is cancelled too
    if future.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_disconnected")
    return future.result()


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
        version=__version__,
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
        return await _api_error(request, _validation_error(exc.errors()))

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
        if request.temperature > 0:
            settings = replace(settings, do_sample=True, temperature=request.temperature, top_p=request.top_p)
        return settings

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
        responses=_ERRORS,
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
    """Load `model` once and serve it until interrupted (SIGTERM or Ctrl-C). `kw` goes to create_app.

    The caption style (as in `loracap caption`) sets the default: a fixed-mode model's mode, or the
    instruction a chat model gets when a request brings no text of its own.
    """
    from ..backends import load_backend
    from ..request import StyleChoice, resolve_request

    choice = StyleChoice(style, length, extras, name, prompt, prompt_file)
    choice.check()  # before minutes of model loading
    backend = load_backend(model, device=device, dtype=dtype, quant=quant, offline=offline)
    request = resolve_request(choice, backend)
    app = create_app(backend, mode=request.mode, tags=request.tags, prompt=request.prompt_for(), **kw)
    if kw.get("api_key") is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach the port can use it", host)
    _uvicorn_server(app, host=host, port=port, log_level=log_level).run()
