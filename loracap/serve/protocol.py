"""The wire protocol of `loracap serve`: OpenAI's chat-completions request and response as pydantic
models (validated on the way in, published at /openapi.json), the errors in OpenAI's shape, and what a
valid request asks for (`read_chat_request`). See loracap/serve/app.py for what the server does with it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_TOKENS_LIMIT = 4096
# Below this, sampling is greedy decoding in all but name, and dividing logits by it can overflow.
MIN_TEMPERATURE = 1e-3

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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "the request is refused; the message says why"},
    "5XX": {"model": ErrorResponse, "description": "shutting down (503), or a fault of the server or model"},
}


def validation_error(errors: Sequence[Any]) -> ApiError:
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
