"""`loracap serve` and the remote backend, over real HTTP on 127.0.0.1: no mocked transport, no mocked model.

Tiny BLIP and LLaVA models are served by uvicorn in a background thread (or by `loracap serve` in a
subprocess); the remote backend, plain httpx calls, raw sockets and a hand-written http.server (for retries
and error paths) talk to them through real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from loracap.backends import BackendError, GenerationSettings, caption_images, load_backend  # noqa: E402
from loracap.backends.openai_remote import (  # noqa: E402
    OpenAIRemoteBackend,
    RemoteConfigError,
    RemoteServerError,
)
from loracap.serve import create_app  # noqa: E402

PIXEL_LIMIT = 100_000
BODY_LIMIT = 256 * 1024
KEY = "sk-test-SECRET-0123456789"
TIMEOUT = 15.0


def _png(size=(48, 40), color=(200, 100, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _chat(url: str | None, text: str | None = "Describe the image.", **extra) -> dict:
    content = []
    if text is not None:
        content.append({"type": "text", "text": text})
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": "whatever", "messages": [{"role": "user", "content": content}], **extra}


def _images():
    return [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (30, 90), "blue"), Image.new("RGB", (50, 50))]


@contextmanager
def _uvicorn(app):
    """Run `app` with uvicorn on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def blip(tiny_model):
    return load_backend(str(tiny_model("blip")), device="cpu")


@pytest.fixture(scope="module")
def llava(tiny_model):
    """A tiny chat model: follows instructions; its decoder (RoPE, 512 positions) writes long captions."""
    return load_backend(str(tiny_model("llava")), device="cpu")


@pytest.fixture(scope="module")
def served(blip):
    """(base URL, list of batch sizes passed to the real backend's generate_detailed)."""
    backend = blip
    batches: list[int] = []
    real_generate = backend.generate_detailed

    def counting_generate(inputs, settings, interrupt=None):
        batches.append(len(inputs["pixel_values"]))
        return real_generate(inputs, settings, interrupt)

    backend.generate_detailed = counting_generate
    app = create_app(
        backend,
        model_name="tiny-blip",
        max_image_pixels=PIXEL_LIMIT,
        batch_wait_ms=100,
        max_body_bytes=BODY_LIMIT,
        # Random tiny models stop at once; two forced tokens make every caption non-empty.
        generation=GenerationSettings(max_new_tokens=6, min_new_tokens=2),
    )
    with _uvicorn(app) as base:
        yield base, batches


@pytest.fixture()
def no_key(monkeypatch):
    monkeypatch.delenv("LORACAP_TEST_KEY", raising=False)
    return "LORACAP_TEST_KEY"


# --- the server through the remote backend -----------------------------------------------------------


def test_remote_backend_captions_through_the_server(served, no_key):
    base, _ = served
    with OpenAIRemoteBackend("tiny-blip", f"{base}/v1", api_key_env=no_key, timeout_s=TIMEOUT) as remote:
        captions = remote.generate(remote.prepare(_images(), "*", None), GenerationSettings())
        assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
        # The library entry point works with it like with any local backend.
        captions = caption_images(remote, _images(), "*", GenerationSettings(max_new_tokens=4), "A photo.")
        assert len(captions) == 3 and all(captions)


def test_remote_backend_sends_the_mode_name_without_a_prompt(served, no_key):
    base, _ = served
    with OpenAIRemoteBackend("tiny-blip", f"{base}/v1", api_key_env=no_key, timeout_s=TIMEOUT) as remote:
        assert all(remote.generate(remote.prepare(_images()[:1], "caption"), GenerationSettings()))
        # BLIP has no tag mode: the server refuses, and a 4xx is not retried.
        with pytest.raises(RemoteServerError, match="HTTP 400: .*cannot caption in mode 'tags'"):
            remote.generate(remote.prepare(_images()[:1], "tags"), GenerationSettings())


def test_caption_folder_with_the_remote_backend(served, no_key, tmp_path):
    from conftest import write_images

    from loracap.pipeline import caption_folder

    base, _ = served
    write_images(tmp_path, ["a.png", "b.jpg", "sub/c.webp"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with OpenAIRemoteBackend("tiny-blip", f"{base}/v1", api_key_env=no_key, timeout_s=TIMEOUT) as remote:
        summary = caption_folder(tmp_path, backend=remote, prompt="Describe.", progress=False)
    assert (summary.captioned, summary.failed) == (3, 1)
    assert (tmp_path / "sub" / "c.txt").read_text().strip()


def test_concurrent_requests_share_generate_calls(served):
    base, batches = served
    batches.clear()
    n = 8
    bodies = [_chat(_data_url(_png(color=(30 * i, 60, 90)))) for i in range(n)]
    with httpx.Client(timeout=TIMEOUT) as client, ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda body: client.post(f"{base}/v1/chat/completions", json=body), bodies))
    assert [r.status_code for r in responses] == [200] * n
    assert sum(batches) == n
    assert len(batches) < n, f"no batching: generate batch sizes {batches}"
    answer = responses[0].json()
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny-blip"
    assert answer["id"] and isinstance(answer["created"], int) and "usage" in answer
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")


def test_text_selects_a_mode_and_max_tokens_is_honoured(served):
    base, _ = served
    url = _data_url(_png())
    with httpx.Client(timeout=TIMEOUT) as client:
        # "caption" is BLIP's one mode; free text is ignored by a model that does not follow instructions.
        for body in (_chat(url, "caption"), _chat(url, "What is this?"), _chat(url, None, max_tokens=3)):
            r = client.post(f"{base}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]


def test_top_p_zero_is_the_most_likely_token_not_an_error(served):
    """OpenAI takes top_p 0 (only the most likely token): the same caption as greedy decoding, not a 5xx."""
    base, _ = served
    url = _data_url(_png(color=(9, 150, 60)))
    with httpx.Client(timeout=TIMEOUT) as client:
        greedy = client.post(f"{base}/v1/chat/completions", json=_chat(url, None))
        zero = client.post(f"{base}/v1/chat/completions", json=_chat(url, None, top_p=0.0, seed=0))
    assert zero.status_code == 200, zero.text
    caption = [r.json()["choices"][0]["message"]["content"] for r in (greedy, zero)]
    assert caption[0] == caption[1]


def test_models_and_health(served):
    base, _ = served
    with httpx.Client(timeout=TIMEOUT) as client:
        models = client.get(f"{base}/v1/models").json()
        health = client.get(f"{base}/health").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("tiny-blip", "model")]
    assert health["status"] == "ok" and health["model"] == "tiny-blip"


class _InstructionBlip:
    """The real tiny BLIP behind an instruction-following interface, as a chat VLM has: the request's
    text reaches the model as BLIP's text prefix."""

    modes = ("*",)
    tag_modes: frozenset[str] = frozenset()
    instructions = True
    default_batch_size = 4

    def __init__(self, blip):
        self.blip, self.name, self.image_side = blip, "tiny-instruct", blip.image_side
        self.tokenizer = blip.processor.tokenizer  # counts the prompt against --max-prompt-tokens
        self.prompts: list[tuple[str, str | list[str] | None]] = []

    def prepare(self, images, mode, prompt=None):
        self.prompts.append((mode, prompt))
        # One prefix for the batch reaches BLIP; per-image prompts (a list) are only recorded.
        return self.blip.prepare(images, "caption", prompt if isinstance(prompt, str) else None)

    def generate(self, inputs, settings):
        return self.blip.generate(inputs, settings)


def test_an_instruction_model_gets_the_text_as_its_prompt(blip):
    backend = _InstructionBlip(blip)
    app = create_app(backend, generation=GenerationSettings(max_new_tokens=6, min_new_tokens=2))
    url = _data_url(_png())
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        ok = client.post(f"{base}/v1/chat/completions", json=_chat(url, "a photo of"))
        no_text = client.post(f"{base}/v1/chat/completions", json=_chat(url, None))
        health = client.get(f"{base}/health").json()
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert ok.json()["model"] == "tiny-instruct" and health["mode"] == "*"
    assert backend.prompts == [("*", "a photo of")]
    assert no_text.status_code == 400 and no_text.json()["error"]["code"] == "missing_prompt"


def test_different_instructions_share_a_batch(blip):
    backend = _InstructionBlip(blip)
    app = create_app(
        backend, batch_wait_ms=200, generation=GenerationSettings(max_new_tokens=4, min_new_tokens=2)
    )
    texts = ["Describe it.", "List the colours.", "One word."]
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client, ThreadPoolExecutor(3) as pool:
        bodies = [_chat(_data_url(_png(color=(i, 2, 3))), text) for i, text in enumerate(texts)]
        responses = list(pool.map(lambda b: client.post(f"{base}/v1/chat/completions", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 3
    assert len(backend.prompts) < 3
    sent = [p for _, batch in backend.prompts for p in (batch if isinstance(batch, list) else [batch])]
    assert sorted(sent) == sorted(texts)


def test_create_app_refuses_a_default_mode_the_model_lacks(blip):
    with pytest.raises(BackendError, match="cannot caption in mode 'tags'"):
        create_app(blip, mode="tags")


class _ScriptedChat:
    """A chat model that writes the same raw text for every image and records the prompts it gets."""

    modes = ("*",)
    tag_modes: frozenset[str] = frozenset()
    instructions = True
    default_batch_size = 4
    image_side = 0

    def __init__(self, raw: str) -> None:
        self.raw, self.name = raw, "scripted-chat"
        self.prompts: list[str | list[str] | None] = []

    def prepare(self, images, mode, prompt=None):
        self.prompts.append(prompt)
        return len(images)

    def generate(self, inputs, settings):
        return [self.raw] * inputs


def _app_of_serve(monkeypatch, backend, **kw):
    """The app `serve(**kw)` builds around `backend`, captured where uvicorn would have run it."""
    from loracap.serve import serve

    return _captured_app(monkeypatch, backend, lambda: serve(backend.name, **kw))


def _captured_app(monkeypatch, backend, start):
    """The app that `start()` (serve, or `loracap serve`) builds around `backend`, captured where uvicorn
    would have run it."""
    import uvicorn

    import loracap.backends

    apps = []
    monkeypatch.setattr(loracap.backends, "load_backend", lambda model, **_: backend)
    with monkeypatch.context() as patch:  # only while it starts: the test then serves the app for real
        patch.setattr(uvicorn.Server, "run", lambda server, *_, **__: apps.append(server.config.app))
        start()
    (app,) = apps
    return app


def test_serve_with_a_tag_style_gives_a_chat_model_tag_clean_up(monkeypatch):
    backend = _ScriptedChat("1girl, solo, 1girl, long_hair")
    app = _app_of_serve(monkeypatch, backend, style="booru-tags")
    url = _data_url(_png())
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        served_style = client.post(f"{base}/v1/chat/completions", json=_chat(url, None))
        own_text = client.post(f"{base}/v1/chat/completions", json=_chat(url, "Describe the image."))
    assert served_style.status_code == own_text.status_code == 200
    # The served style asks for tags, as `loracap caption --style booru-tags` does: duplicates go.
    assert served_style.json()["choices"][0]["message"]["content"] == "1girl, solo, long_hair"
    # A client's own instruction may ask for anything: only the model-agnostic clean-up applies.
    assert own_text.json()["choices"][0]["message"]["content"] == "1girl, solo, 1girl, long_hair"


def test_serve_takes_one_extra_as_a_string(monkeypatch):
    from loracap.styles import load_style, render_prompt

    backend = _ScriptedChat("a red square")
    app = _app_of_serve(monkeypatch, backend, style="training-caption", extras="lighting")
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{base}/v1/chat/completions", json=_chat(_data_url(_png()), None))
    assert r.status_code == 200, r.text
    assert backend.prompts == [render_prompt(load_style("training-caption"), extras=["lighting"])]


@dataclass
class _Served:
    base: str
    proc: subprocess.Popen
    output: str = ""
    """Everything it printed, once it has exited."""


@contextmanager
def _cli_server(*args: str, env: dict[str, str] | None = None):
    """`loracap serve ARGS` in a subprocess on a free loopback port (one torch thread, plus `env`); yields a
    _Served once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "loracap", "serve", "--port", str(port), "--device", "cpu", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ)
    served = _Served(f"http://127.0.0.1:{port}", proc)
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "loracap serve did not come up in 60 s"
                try:
                    client.get(f"{served.base}/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        served.output = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()


def test_loracap_serve_and_loracap_caption_through_it(tiny_model, tmp_path, monkeypatch, capsys):
    """The two commands end to end: a chat model served with a default style and an API key, a folder
    captioned remotely with that key."""
    from conftest import write_images

    from loracap.cli import main

    model = str(tiny_model("llava"))
    serve_args = ["--model", model, "--style", "booru-tags", "--length", "short", "--log-level", "info"]
    serve_args += ["--max-new-tokens", "6", "--min-new-tokens", "2", "--api-key-env", "LORACAP_SERVE_KEY"]
    with _cli_server(*serve_args, env={"LORACAP_SERVE_KEY": KEY}) as server:
        url = f"{server.base}/v1/chat/completions"
        with httpx.Client(timeout=TIMEOUT) as client:
            health = client.get(f"{server.base}/health").json()
            # No text part: the served style's instruction is used instead of a 400 "missing_prompt".
            bare = client.post(
                url, json=_chat(_data_url(_png()), text=None), headers={"Authorization": f"Bearer {KEY}"}
            )
            keyless = client.post(url, json=_chat(_data_url(_png()), text=None))
        assert health["status"] == "ok" and health["model"] == model and health["mode"] == "*"
        assert bare.status_code == 200, bare.text
        assert bare.json()["choices"][0]["message"]["content"]
        assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"

        write_images(tmp_path, ["a.png", "b.jpg", "sub/c.webp"])
        (tmp_path / "broken.png").write_bytes(b"not a png")
        monkeypatch.setenv("LORACAP_TEST_KEY", KEY)
        capsys.readouterr()
        status = main(
            ["caption", str(tmp_path), "--model", "openai:tiny", "--api-base", f"{server.base}/v1"]
            + ["--api-key-env", "LORACAP_TEST_KEY", "--style", "training-caption", "--extra", "lighting"]
            + ["--trigger", "ohwx", "--max-new-tokens", "6", "--quiet"]
        )
    output = capsys.readouterr()
    assert status == 1  # the broken file, and only it
    captions = {p.name: p.read_text() for p in tmp_path.rglob("*.txt")}
    assert set(captions) == {"a.txt", "b.txt", "c.txt"}
    assert all(c.startswith("ohwx") and len(c) > len("ohwx, ") for c in captions.values())
    assert "3 captioned" in output.err and "1 failed" in output.err
    assert KEY not in output.out + output.err
    # The server logged every request (--log-level info) and never the key.
    assert "POST /v1/chat/completions" in server.output and KEY not in server.output


def test_serve_refuses_a_style_its_model_cannot_write(tiny_model, capsys):
    from loracap.cli import main

    blip = str(tiny_model("blip"))
    assert main(["serve", "--model", blip, "--style", "booru-tags", "--device", "cpu"]) == 2
    assert "cannot write caption style 'booru-tags'" in capsys.readouterr().err


# --- bad requests: always 4xx with OpenAI's error body ----------------------------------------------

_TRUNCATED_PNG = _png((40, 40), (1, 2, 3))[:60]
_JSON = {"content-type": "application/json"}

BAD_REQUESTS = {
    "no image": ({"json": _chat(None)}, 400, "no image"),
    "text-only content": ({"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400, "no image"),
    "no messages": ({"json": {"model": "x"}}, 400, "messages"),
    "body not an object": ({"json": [1, 2]}, 400, "JSON object"),
    "broken base64": ({"json": _chat("data:image/png;base64,@@not*base64@@")}, 400, "base64"),
    "not base64 encoded": ({"json": _chat("data:image/png,rawbytes")}, 400, "base64"),
    "not an image": (
        {"json": _chat(_data_url(b"hello, these bytes are text"))},
        400,
        "not a recognised image",
    ),
    "truncated image": ({"json": _chat(_data_url(_TRUNCATED_PNG))}, 400, "image"),
    "empty image": ({"json": _chat("data:image/png;base64,")}, 400, "empty"),
    "over the pixel limit": ({"json": _chat(_data_url(_png((400, 400))))}, 413, "decompression bomb"),
    "http url": ({"json": _chat("http://example.com/cat.png")}, 400, "only data: URLs"),
    "https url": ({"json": _chat("https://example.com/cat.png")}, 400, "only data: URLs"),
    "two images": (
        {"json": {"messages": [{"role": "user", "content": _chat("data:,")["messages"][0]["content"] * 2}]}},
        400,
        "one image",
    ),
    "invalid json": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    "wrong content type": ({"data": {"a": "b"}}, 415, "application/json"),
    "no content type": ({"content": b"{}"}, 415, "application/json"),
    "unsupported mode field": (
        {"json": _chat(_data_url(_png()), mode="tags")},
        400,
        "cannot caption in mode",
    ),
    "unsupported mode text": ({"json": _chat(_data_url(_png()), "tags")}, 400, "cannot caption in mode"),
    "bad max_tokens": ({"json": _chat(_data_url(_png()), max_tokens="ten")}, 400, "max_tokens"),
    "streaming": ({"json": _chat(_data_url(_png()), stream=True)}, 400, "stream"),
    "body too large": ({"json": _chat(_data_url(_png()), "x" * (BODY_LIMIT + 1000))}, 413, "bytes"),
    # json.loads raised RecursionError on these (a 500 and a traceback per request)
    "deeply nested JSON": (
        {"content": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": _JSON},
        400,
        "JSON",
    ),
    # json.dumps writes a lone surrogate as the escape "\ud800", which JSON allows and UTF-8 cannot encode
    "lone surrogate in the text": (
        {"content": json.dumps(_chat(_data_url(_png()), "a \ud800 b")).encode(), "headers": _JSON},
        400,
        "invalid JSON",
    ),
    "lone surrogate in the mode": (
        {"content": json.dumps(_chat(_data_url(_png()), mode="\udfff")).encode(), "headers": _JSON},
        400,
        "invalid JSON",
    ),
    "image in an earlier user message": (
        {
            "json": {
                "messages": _chat(_data_url(_png()))["messages"] + [{"role": "user", "content": "Again."}]
            }
        },
        400,
        "in one user message",
    ),
    "conversation history": (
        {
            "json": {
                "messages": [{"role": "assistant", "content": "Hi."}, *_chat(_data_url(_png()))["messages"]]
            }
        },
        400,
        "'assistant'",
    ),
    "an image in a system message": (
        {
            "json": {
                "messages": [
                    {"role": "system", "content": _chat(_data_url(_png()))["messages"][0]["content"]}
                ]
            }
        },
        400,
        "messages[0].content",
    ),
    "max_tokens past the decoder": (
        {"json": _chat(_data_url(_png()), max_tokens=4000)},
        400,
        "writes at most",
    ),
    "fractional max_tokens": ({"json": _chat(_data_url(_png()), max_tokens=5.5)}, 400, "max_tokens"),
    "max_tokens as a string": ({"json": _chat(_data_url(_png()), max_tokens="5")}, 400, "max_tokens"),
    "temperature out of range": ({"json": _chat(_data_url(_png()), temperature=3)}, 400, "temperature"),
    "empty stop string": ({"json": _chat(_data_url(_png()), stop="")}, 400, "stop"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_shaped_4xx(served, case, caplog):
    base, _ = served
    kwargs, status, words = BAD_REQUESTS[case]
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{base}/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error" and error["code"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], "a client mistake was logged"


# OpenAI parameters a captioner cannot honour: refused by name instead of accepted and ignored.
UNSUPPORTED = {
    "logprobs": True,
    "top_logprobs": 3,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "caption"}}],
    "tool_choice": "auto",
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logit_bias": {"50": -100},
    "n": 2,
    "stream": True,
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_parameters_a_captioner_cannot_honour_are_refused_by_name(served, name):
    base, _ = served
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(
            f"{base}/v1/chat/completions", json=_chat(_data_url(_png()), **{name: UNSUPPORTED[name]})
        )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and name in error["message"]


def test_unknown_routes_and_methods_use_the_error_shape(served):
    base, _ = served
    with httpx.Client(timeout=TIMEOUT) as client:
        missing = client.get(f"{base}/v1/nothing")
        wrong_method = client.get(f"{base}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


# --- what the server reports, and what it honours ------------------------------------------------------


def _caption(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_finish_reason_and_usage_tell_the_truth(served):
    base, _ = served
    url = f"{base}/v1/chat/completions"
    image = _data_url(_png())
    with httpx.Client(timeout=TIMEOUT) as client:
        cut = client.post(url, json=_chat(image, max_tokens=3)).json()
        # null is "not set": it used to hide max_tokens
        null = client.post(url, json=_chat(image, max_tokens=2, max_completion_tokens=None)).json()
        full = _caption(client.post(url, json=_chat(image, max_tokens=12)))
        stop = " " + full.split()[2]
        stopped = client.post(url, json=_chat(image, max_tokens=12, stop=[stop, "never there"])).json()
    # The tiny model never ends a caption itself: max_tokens cut it, and the server says so.
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3 and cut["usage"]["prompt_tokens"] >= 1
    assert cut["usage"]["total_tokens"] == cut["usage"]["prompt_tokens"] + 3
    assert null["usage"]["completion_tokens"] == 2
    # A stop string ends the caption before it, and that is a "stop".
    caption = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in caption and full.startswith(caption) and len(caption) < len(full)


@pytest.mark.parametrize("arch", ["florence2", "vit-gpt2", "llava"])
def test_every_model_family_counts_its_tokens(tiny_model, arch):
    """BLIP is covered above; Florence-2's decoder is made to write an end token at the limit, which is
    still a "length"."""
    backend = load_backend(str(tiny_model(arch)), device="cpu")
    app = create_app(backend, generation=GenerationSettings(max_new_tokens=8))
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        answer = client.post(
            f"{base}/v1/chat/completions", json=_chat(_data_url(_png()), max_tokens=3)
        ).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3 and answer["usage"]["prompt_tokens"] >= 1


def test_temperature_top_p_and_seed_sample(served):
    import torch

    torch.set_num_threads(1)
    base, _ = served
    url = f"{base}/v1/chat/completions"
    image = _data_url(_png())
    with httpx.Client(timeout=TIMEOUT) as client:

        def caption(**kw) -> str:
            return _caption(client.post(url, json=_chat(image, max_tokens=8, **kw)))

        greedy = caption()
        seeded = [caption(temperature=1.5, seed=7), caption(temperature=1.5, seed=7)]
        seeds = {caption(temperature=1.5, seed=seed) for seed in range(6)}
        nucleus = {caption(top_p=0.9, seed=seed) for seed in range(6)}
        # Greedy and sampling requests at once: they are never captioned in one batch.
        mixed = [{"temperature": 1.5}, {}] * 4
        with ThreadPoolExecutor(len(mixed)) as pool:
            together = list(pool.map(lambda kw: caption(**kw), mixed))
    assert all(caption == greedy for caption in together[1::2])  # unchanged by the sampling requests
    assert seeded[0] == seeded[1]  # a seed makes sampling repeatable
    assert len(seeds) > 1 and len(nucleus) > 1  # and sampling samples: by temperature, or by top_p alone


def test_a_long_prompt_is_refused_before_any_work(blip):
    backend = _InstructionBlip(blip)
    app = create_app(backend, max_prompt_tokens=50, generation=GenerationSettings(max_new_tokens=4))
    image = _data_url(_png())
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        url = f"{base}/v1/chat/completions"
        fits = client.post(url, json=_chat(image, "a photo of"))
        long = client.post(url, json=_chat(image, "a photo of " * 40))
        # 1 MB of text: it used to hold the server for everyone, and never finish
        huge = client.post(url, json=_chat(image, "a photo of " * 100_000))
        system = {"role": "system", "content": "Write one caption. " * 20}
        long_system = client.post(url, json={"messages": [system, *_chat(image, "a photo of")["messages"]]})
    assert fits.status_code == 200, fits.text
    for refused in (long, huge, long_system):
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "prompt_too_long" and "50 tokens" in error["message"]
    assert backend.prompts == [("*", "a photo of")]  # nothing else reached the model


def test_a_chat_model_reads_the_system_message(llava):
    app = create_app(llava, generation=GenerationSettings(max_new_tokens=4, min_new_tokens=2))
    user = _chat(_data_url(_png()), "Describe the image.")["messages"]
    system = {"role": "system", "content": "You caption photos for a training set."}
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        url = f"{base}/v1/chat/completions"
        plain = client.post(url, json={"messages": user})
        with_system = client.post(url, json={"messages": [system, *user]})
    assert plain.status_code == with_system.status_code == 200, with_system.text
    # The system turn is part of what the model read: more prompt tokens, by the model's own count.
    assert with_system.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] > 0


def test_a_fixed_mode_model_takes_a_system_message_as_it_takes_free_text(served):
    base, _ = served
    body = {"messages": [{"role": "system", "content": "You are a helpful assistant."}]}
    body["messages"] += _chat(_data_url(_png()))["messages"]
    with httpx.Client(timeout=TIMEOUT) as client:
        assert _caption(client.post(f"{base}/v1/chat/completions", json=body))


def test_the_api_key_guards_the_v1_routes(blip, caplog):
    app = create_app(blip, api_key=KEY, generation=GenerationSettings(max_new_tokens=4, min_new_tokens=2))
    body = _chat(_data_url(_png()))
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        url = f"{base}/v1/chat/completions"
        missing = client.post(url, json=body)
        wrong = client.post(url, json=body, headers={"Authorization": "Bearer sk-test-SECRET-0123456788"})
        # Checked before the body is read: without the key, a broken body is a 401 too.
        junk = client.post(url, content=b"{not json", headers={**_JSON, "Authorization": "Basic abc"})
        models = client.get(f"{base}/v1/models")
        ok = client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})
        listed = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        open_routes = [client.get(f"{base}/{path}").status_code for path in ("health", "openapi.json")]
    for refused in (missing, wrong, junk, models):
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer" and KEY not in refused.text
    assert _caption(ok) and listed.status_code == 200 and open_routes == [200, 200]
    assert KEY not in caplog.text


def test_loracap_serve_passes_its_options_to_the_app(blip, monkeypatch, capsys):
    from loracap.cli import main

    monkeypatch.setenv("LORACAP_SERVE_KEY", KEY)
    args = ["serve", "--model", "tiny", "--max-prompt-tokens", "5", "--api-key-env", "LORACAP_SERVE_KEY"]
    app = _captured_app(monkeypatch, blip, lambda: main(args))
    auth = {"Authorization": f"Bearer {KEY}"}
    with _uvicorn(app) as base, httpx.Client(timeout=TIMEOUT) as client:
        url = f"{base}/v1/chat/completions"
        keyless = client.post(url, json=_chat(_data_url(_png()), "caption"))
        long = client.post(
            url, json=_chat(_data_url(_png()), "one two three four five six seven"), headers=auth
        )
    assert keyless.status_code == 401
    assert long.status_code == 400 and "limit of 5 tokens" in long.json()["error"]["message"]
    # Asked for a key it does not have, it refuses to start open.
    monkeypatch.delenv("LORACAP_SERVE_KEY")
    assert main(args) == 2
    assert "$LORACAP_SERVE_KEY is not set" in capsys.readouterr().err


def test_the_request_schema_is_published(served):
    base, _ = served
    with httpx.Client(timeout=TIMEOUT) as client:
        schema = client.get(f"{base}/openapi.json").json()
    components = schema["components"]["schemas"]
    request = components["ChatCompletionRequest"]
    assert request["additionalProperties"] is False  # what it does not list is refused, not ignored
    assert {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"} <= set(
        request["properties"]
    )
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest"
    )
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletion"
    )
    # Refusals are 400s with OpenAI's error body, not FastAPI's 422.
    assert "422" not in operation["responses"] and "4XX" in operation["responses"]
    assert components["Choice"]["properties"]["finish_reason"]["enum"] == ["stop", "length"]


# --- never stall: clients that leave, prompts that are too long, shutdown ----------------------------


class _Watched:
    """A real backend, recording the completion tokens of every generate call; `busy` is set while the
    model generates."""

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[list[int]] = []
        self.busy = threading.Event()

    def __getattr__(self, name):  # name, modes, instructions, model, tokenizer, ...: the backend's own
        return getattr(self.backend, name)

    def prepare(self, images, mode, prompt=None):
        return self.backend.prepare(images, mode, prompt)

    def generate(self, inputs, settings):
        return [g.text for g in self.generate_detailed(inputs, settings)]

    def generate_detailed(self, inputs, settings, interrupt=None):
        self.busy.set()
        try:
            results = self.backend.generate_detailed(inputs, settings, interrupt)
        finally:
            self.busy.clear()
        self.calls.append([r.completion_tokens for r in results])
        return results


def _open_request(base: str, body: dict) -> socket.socket:
    """A chat completion sent on a socket of its own and left unread: closing it is the client leaving."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_work_for_a_client_that_left_is_dropped(llava):
    import torch

    torch.set_num_threads(1)
    backend, long = _Watched(llava), 400  # fits the tiny LLaVA's 512 positions after its prompt
    # One caption at a time, each long: a second request waits in the queue while the first runs.
    app = create_app(
        backend, max_batch=1, generation=GenerationSettings(max_new_tokens=long, min_new_tokens=long)
    )
    body = _chat(_data_url(_png()))
    with _uvicorn(app) as base:
        running = _open_request(base, body)
        assert backend.busy.wait(TIMEOUT)
        queued = _open_request(base, body)
        deadline = time.monotonic() + TIMEOUT
        while not app.state.batcher.pending:
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.01)
        queued.close()
        running.close()
        # A client that stays is answered as soon as the model is free.
        kept = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT)
    first, *others = backend.calls
    assert first[0] < long  # the running caption stopped soon after its client left
    assert others == [[long]]  # the queued one never ran; the kept one ran in full
    assert kept.status_code == 200 and kept.json()["usage"]["completion_tokens"] == long


def test_sigterm_stops_a_busy_server_within_seconds(tiny_model):
    n, long = 12, 500
    args = ["--model", str(tiny_model("llava")), "--max-batch", "1", "--log-level", "warning"]
    args += ["--max-new-tokens", str(long), "--min-new-tokens", str(long)]
    body = _chat(_data_url(_png()))
    with _cli_server(*args) as server, httpx.Client(timeout=60) as client, ThreadPoolExecutor(n) as pool:
        pending = [
            pool.submit(client.post, f"{server.base}/v1/chat/completions", json=body) for _ in range(n)
        ]
        # Once one caption is done, the others are queued behind the model (each takes it a while).
        wait(pending, timeout=60, return_when=FIRST_COMPLETED)
        server.proc.send_signal(signal.SIGTERM)
        # uvicorn used to wait for every queued caption first: minutes, with a real model and queue.
        server.proc.wait(timeout=30)
        responses = [future.result() for future in pending]
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= n // 2, statuses
    assert all(r.json()["error"]["code"] == "unavailable" for r in responses if r.status_code == 503)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output, server.output


# --- the remote backend against a scripted server: retries, key, errors ------------------------------


def _completion(text: str) -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]
    }


@contextmanager
def _scripted(replies):
    """A real HTTP server on 127.0.0.1 answering POSTs with `replies` in order (the last one repeats).

    A reply is (status, body); body may be a function of (Authorization header, request JSON).
    Yields (base URL, list of the Authorization headers received, one per attempt).
    """
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            auth = self.headers.get("Authorization")
            seen.append(auth)
            status, body = replies[min(len(seen), len(replies)) - 1]
            if status == 200 and auth != f"Bearer {KEY}":
                status, body = 401, {"error": {"message": "missing or wrong key"}}
            data = json.dumps(body(auth, request) if callable(body) else body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status in (429, 503):
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _remote(base: str, **kw) -> OpenAIRemoteBackend:
    kw.setdefault("max_retries", 4)
    return OpenAIRemoteBackend(
        "m", base, api_key_env="LORACAP_TEST_KEY", backoff_s=0.01, timeout_s=TIMEOUT, **kw
    )


def _one_image(backend):
    return backend.prepare(_images()[:1], "*", "Describe.")


def _error_of(remote: OpenAIRemoteBackend) -> RemoteServerError:
    with pytest.raises(RemoteServerError) as info:
        remote.generate(_one_image(remote), GenerationSettings())
    return info.value


def test_retries_5xx_and_429_then_succeeds_sending_the_key(monkeypatch):
    monkeypatch.setenv("LORACAP_TEST_KEY", KEY)
    busy = {"error": {"message": "overloaded"}}
    replies = [(503, busy), (429, busy), (200, _completion(" a red square "))]
    with _scripted(replies) as (base, seen), _remote(base) as remote:
        assert remote.generate(_one_image(remote), GenerationSettings()) == ["a red square"]
    assert seen == [f"Bearer {KEY}"] * 3
    assert KEY not in repr(remote) and KEY not in str(vars(remote))


def test_gives_up_after_max_retries_without_leaking_the_key(monkeypatch):
    monkeypatch.setenv("LORACAP_TEST_KEY", KEY)
    echo = (500, lambda auth, request: {"error": {"message": f"cannot serve {auth}"}})
    with _scripted([echo]) as (base, seen), _remote(base, max_retries=2) as remote:
        error = _error_of(remote)
    assert len(seen) == 3 and error.status == 500
    assert base in str(error) and "HTTP 500" in str(error) and "3 attempts" in str(error)
    assert KEY not in str(error) and "***" in str(error)
    assert not isinstance(error, BackendError)  # the pipeline records it for the file and goes on


def test_client_errors_are_not_retried(monkeypatch):
    monkeypatch.setenv("LORACAP_TEST_KEY", KEY)
    with _scripted([(400, {"error": {"message": "bad image"}})]) as (base, seen), _remote(base) as remote:
        error = _error_of(remote)
    assert len(seen) == 1 and error.status == 400 and "HTTP 400: bad image" in str(error)


def test_a_wrong_key_stops_the_run(monkeypatch):
    monkeypatch.setenv("LORACAP_TEST_KEY", "sk-wrong")
    with _scripted([(200, _completion("never"))]) as (base, seen), _remote(base) as remote:
        error = _error_of(remote)
    assert isinstance(error, RemoteConfigError) and isinstance(error, BackendError)  # stops caption_folder
    assert len(seen) == 1 and "HTTP 401" in str(error) and "LORACAP_TEST_KEY" in str(error)
    assert "sk-wrong" not in str(error)


def test_connection_errors_are_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _remote(f"http://127.0.0.1:{port}/v1", max_retries=1) as remote:
        error = _error_of(remote)
    assert f"127.0.0.1:{port}" in str(error) and "ConnectError" in str(error) and "2 attempts" in str(error)


def test_requests_run_concurrently_and_keep_their_order(monkeypatch):
    monkeypatch.setenv("LORACAP_TEST_KEY", KEY)

    def digest(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:12]

    lock, in_flight, peak = threading.Lock(), [0], [0]

    def echo_digest(auth, request):  # answers with its text and a digest of the image's data URL
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)  # long enough for the other requests in flight to arrive meanwhile
        with lock:
            in_flight[0] -= 1
        text, image = request["messages"][0]["content"]
        return _completion(f"{text['text']}: {digest(image['image_url']['url'])}")

    images = [Image.new("RGB", (32, 24), (25 * i, 0, 0)) for i in range(9)]
    texts = [f"prompt {i}" for i in range(9)]
    with _scripted([(200, echo_digest)]) as (base, seen), _remote(base, concurrency=3) as remote:
        inputs = remote.prepare(images, "*", texts)  # one instruction per image
        captions = remote.generate(inputs, GenerationSettings(max_new_tokens=5))
    assert captions == [f"{t}: {digest(url)}" for t, url in zip(texts, inputs.urls, strict=True)]
    assert len(seen) == 9
    assert len(set(captions)) == 9
    assert 1 < peak[0] <= 3, f"{peak[0]} requests in flight at most; concurrency is 3"
