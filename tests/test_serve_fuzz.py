"""`loracap serve` fuzzed from its own /openapi.json: whatever a client sends, never a 5xx.

schemathesis generates requests from the published schema, valid and invalid ones, and sends them over
real HTTP to a server around a tiny real model: BLIP (fixed modes) and LLaVA (a chat model, which reads
the text and the system message). The schema cannot say "one user message with one image", so half of
the generated bodies get their messages rebuilt around a real image: those reach the model with the
fuzzed parameters (max_tokens, temperature, top_p, seed, stop, mode, the texts).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import _data_url, _png, _uvicorn  # noqa: E402

from loracap.backends import GenerationSettings, load_backend  # noqa: E402
from loracap.serve import create_app  # noqa: E402

EXAMPLES = 150
IMAGE = _data_url(_png())


@pytest.fixture(scope="module", params=["blip", "llava"])
def base(request, tiny_model):
    """The base URL of a server around a tiny model."""
    import torch

    torch.set_num_threads(1)
    backend = load_backend(str(tiny_model(request.param)), device="cpu")
    app = create_app(backend, generation=GenerationSettings(max_new_tokens=8), max_image_pixels=100_000)
    with _uvicorn(app) as url:
        yield url


def _around_one_image(messages: list) -> list:
    """The generated system messages, then one user message: the first generated user text (if any) and a
    real image."""
    messages = [m for m in messages if isinstance(m, dict)]
    texts = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    content = [{"type": "text", "text": text} for text in texts[:1]]
    content.append({"type": "image_url", "image_url": {"url": IMAGE}})
    return [m for m in messages if m.get("role") != "user"] + [{"role": "user", "content": content}]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_request_gets_a_5xx(base, mode):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    # Never a 5xx, and answers as the schema documents them; what the schema forbids is refused.
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    negative = mode is GenerationMode.NEGATIVE
    if negative:
        checks.append(negative_data_rejection)

    @given(case=schema.as_strategy(mode), with_image=st.just(False) if negative else st.booleans())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case, with_image):
        valid_messages = isinstance(case.body, dict) and isinstance(case.body.get("messages"), list)
        if with_image and valid_messages and not negative:  # (invalid data stays as it was generated)
            case.body["messages"] = _around_one_image(case.body["messages"])
        response = case.call(timeout=60)
        case.validate_response(response, checks=checks)

    check()
