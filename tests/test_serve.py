"""`loracap serve` and the remote backend, over real HTTP on 127.0.0.1: no mocked transport, no mocked model.

A tiny BLIP model is served by uvicorn in a background thread; the remote backend, plain httpx calls and a
hand-written http.server (for retries and error paths) talk to it through real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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
def served(blip):
    """(base URL, list of batch sizes passed to the real backend's generate)."""
    backend = blip
    batches: list[int] = []
    real_generate = backend.generate

    def counting_generate(inputs, settings):
        batches.append(len(inputs["pixel_values"]))
        return real_generate(inputs, settings)

    backend.generate = counting_generate
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
    assert choice["finish_reason"] == "stop"


def test_text_selects_a_mode_and_max_tokens_is_honoured(served):
    base, _ = served
    url = _data_url(_png())
    with httpx.Client(timeout=TIMEOUT) as client:
        # "caption" is BLIP's one mode; free text is ignored by a model that does not follow instructions.
        for body in (_chat(url, "caption"), _chat(url, "What is this?"), _chat(url, None, max_tokens=3)):
            r = client.post(f"{base}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]


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
    import uvicorn

    import loracap.backends
    from loracap.serve import serve

    apps = []
    monkeypatch.setattr(loracap.backends, "load_backend", lambda model, **_: backend)
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    serve(backend.name, **kw)
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


@contextmanager
def _cli_server(*args: str):
    """`loracap serve ARGS` in a subprocess on a free loopback port; yields its base URL once it answers."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "loracap", "serve", "--port", str(port), "--device", "cpu", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "loracap serve did not come up in 60 s"
                try:
                    client.get(f"{base}/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def test_loracap_serve_and_loracap_caption_through_it(tiny_model, tmp_path, monkeypatch, capsys):
    """The two commands end to end: a chat model served with a default style, a folder captioned remotely."""
    from conftest import write_images

    from loracap.cli import main

    model = str(tiny_model("llava"))
    serve_args = ["--model", model, "--style", "booru-tags", "--length", "short", "--log-level", "warning"]
    with _cli_server(*serve_args, "--max-new-tokens", "6", "--min-new-tokens", "2") as base:
        with httpx.Client(timeout=TIMEOUT) as client:
            health = client.get(f"{base}/health").json()
            # No text part: the served style's instruction is used instead of a 400 "missing_prompt".
            bare = client.post(f"{base}/v1/chat/completions", json=_chat(_data_url(_png()), text=None))
        assert health["status"] == "ok" and health["model"] == model and health["mode"] == "*"
        assert bare.status_code == 200, bare.text
        assert bare.json()["choices"][0]["message"]["content"]

        write_images(tmp_path, ["a.png", "b.jpg", "sub/c.webp"])
        (tmp_path / "broken.png").write_bytes(b"not a png")
        monkeypatch.setenv("LORACAP_TEST_KEY", KEY)
        capsys.readouterr()
        status = main(
            ["caption", str(tmp_path), "--model", "openai:tiny", "--api-base", f"{base}/v1"]
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


def test_serve_refuses_a_style_its_model_cannot_write(tiny_model, capsys):
    from loracap.cli import main

    blip = str(tiny_model("blip"))
    assert main(["serve", "--model", blip, "--style", "booru-tags", "--device", "cpu"]) == 2
    assert "cannot write caption style 'booru-tags'" in capsys.readouterr().err


# --- bad requests: always 4xx with OpenAI's error body ----------------------------------------------

_TRUNCATED_PNG = _png((40, 40), (1, 2, 3))[:60]

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
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_shaped_4xx(served, case):
    base, _ = served
    kwargs, status, words = BAD_REQUESTS[case]
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{base}/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error" and error["code"]


def test_unknown_routes_and_methods_use_the_error_shape(served):
    base, _ = served
    with httpx.Client(timeout=TIMEOUT) as client:
        missing = client.get(f"{base}/v1/nothing")
        wrong_method = client.get(f"{base}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


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
