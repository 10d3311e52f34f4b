"""`loracap web`: the page captions a dropped image in headless Chromium with onnxruntime-web (WASM), and
its token ids equal onnxruntime-python's for the same exported model and image, in each exported layout
(loracap train's captioners, ViT-GPT2, Florence-2); its downloads hold those captions; the server hands out
the page's files and nothing else."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from loracap.backends.base import GenerationSettings  # noqa: E402
from loracap.backends.onnx_captioner import load_onnx_captioner  # noqa: E402
from loracap.browser import page_files  # noqa: E402
from loracap.browser.runtime import runtime_dir  # noqa: E402
from loracap.browser.server import make_server  # noqa: E402
from loracap.cli import main  # noqa: E402
from loracap.onnx_export import ExportOnnxConfig, export_onnx  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def the_runtime():
    """The pinned onnxruntime-web, fetched by `loracap web --fetch-runtime` (the README's test command)."""
    if runtime_dir() is None:
        pytest.fail(
            "onnxruntime-web is not fetched: run `loracap web --fetch-runtime` (README: Run the tests)"
        )


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Both exported layouts: ViT-GPT2 (encoder + merged decoder) and a `loracap train`-style captioner
    (vision encoder + token embeddings + merged decoder), the latter with int8 graphs too."""
    from transformers import AutoProcessor, AutoTokenizer

    from loracap.prefix.io import save_captioner
    from loracap.prefix.modeling import build_captioner

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web")
    vision, lm = tiny_model("siglip"), tiny_model("llama")
    torch.manual_seed(0)  # the projector starts random: the same one every run
    model = build_captioner(str(vision), str(lm), prompt="A photo of", max_caption_tokens=12).eval()
    processor, tokenizer = (
        AutoProcessor.from_pretrained(vision).image_processor,
        AutoTokenizer.from_pretrained(lm),
    )
    save_captioner(model, processor, tokenizer, root / "prefix")
    config = {"check_images": 2}
    export_onnx(
        ExportOnnxConfig(model=str(root / "prefix"), out=root / "prefix-onnx", quantize="int8", **config)
    )
    export_onnx(ExportOnnxConfig(model=str(tiny_model("vit-gpt2")), out=root / "vit-onnx", **config))
    export_onnx(ExportOnnxConfig(model=str(tiny_model("florence2")), out=root / "florence2-onnx", **config))
    return {
        "prefix": root / "prefix-onnx",
        "vit-gpt2": root / "vit-onnx",
        "florence2": root / "florence2-onnx",
    }


def serve(files) -> tuple[str, object]:
    server = make_server(files, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def model_sized_images(side: int, count: int) -> list[tuple[str, bytes, Image.Image]]:
    """PNGs already at the model's input size, so the browser's canvas and PIL see the same pixels."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append((f"photo {i}.png", buffer.getvalue(), image))
    return out


def drop(page, images) -> None:
    """Drop the images on the page's drop zone, as a user dragging files from their desktop does."""
    payload = [[name, base64.b64encode(data).decode()] for name, data, _ in images]
    transfer = page.evaluate_handle(
        """(files) => { const dt = new DataTransfer();
            for (const [name, b64] of files) {
              const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
              dt.items.add(new File([bytes], name, { type: "image/png" }));
            }
            return dt; }""",
        payload,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_function("window.loracap.done !== undefined")
    page.evaluate("window.loracap.done")


@pytest.mark.parametrize("layout", ["prefix", "vit-gpt2", "florence2"])
def test_the_browser_writes_onnxruntime_pythons_tokens(exports, layout, browser, tmp_path) -> None:
    folder = exports[layout]
    base, server = serve(page_files(folder))
    try:
        page = browser.new_page(accept_downloads=True)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/?variant=fp32&threads=1")  # one thread: the same float sums every run
        page.evaluate("window.loracap.ready")
        assert "Ready (wasm, fp32)" in page.text_content("#status")
        side = json.loads(page_files(folder)["model/manifest.json"])["image"]["height"]
        images = model_sized_images(side, 3)
        drop(page, images)
        results = page.evaluate(
            "window.loracap.results.map(r => ({name: r.name, ids: r.ids, caption: r.caption}))"
        )
        assert "3 / 3 captioned" in page.text_content("#status") and not errors

        runtime = load_onnx_captioner(folder, layout)
        for (name, _, image), result in zip(images, results, strict=True):
            expected = runtime.token_ids(runtime.prepare([image], "caption"), GenerationSettings())[0]
            assert result["name"] == name and result["ids"] == expected
            assert result["caption"] == runtime.tokenizer.decode(expected, skip_special_tokens=True).strip()

        with page.expect_download() as download:
            page.click("#jsonl")
        rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
        assert rows == [{"file_name": r["name"], "text": r["caption"]} for r in results]
        with page.expect_download() as download:
            page.click("#zip")
        with zipfile.ZipFile(download.value.path()) as archive:
            sidecars = {n: archive.read(n).decode() for n in archive.namelist()}
        assert sidecars == {r["name"].replace(".png", ".txt"): r["caption"] + "\n" for r in results}
        page.close()
    finally:
        server.shutdown()


def test_the_int8_graphs_run_in_the_browser_too(exports, browser) -> None:
    folder = exports["prefix"]
    base, server = serve(page_files(folder))
    try:
        page = browser.new_page()
        page.goto(base + "/?threads=1")  # repeatable: int8 rounding amplifies any float difference
        page.evaluate("window.loracap.ready")
        assert "int8" in page.text_content("#status")  # the smaller download is the default
        images = model_sized_images(32, 3)
        drop(page, images)
        results = page.evaluate("window.loracap.results.map(r => r.ids)")
        runtime = load_onnx_captioner(folder, "prefix", quant="int8")
        expected = runtime.token_ids(
            runtime.prepare([i for _, _, i in images], "caption"), GenerationSettings()
        )
        # int8 kernels round differently on x86 (MLAS: saturating u8 x s8 products) and in WASM, and this
        # random tiny model has near-ties everywhere: tokens agree mostly, not all (fp32, above: exactly).
        same = sum(a == b for x, y in zip(results, expected, strict=True) for a, b in zip(x, y, strict=False))
        assert same >= 0.5 * sum(map(len, expected))
    finally:
        server.shutdown()


def test_the_server_hands_out_the_pages_files_and_nothing_else(exports) -> None:
    folder = exports["vit-gpt2"]
    base, server = serve(page_files(folder))
    try:
        with urllib.request.urlopen(base + "/") as response:
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"  # WASM threads
            assert b'src="caption.js"' in response.read()
        with urllib.request.urlopen(base + "/vendor/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
        for path in ("/config.json", "/model/../config.json", "/model/onnx/../../config.json", "/etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(base + path)
            assert error.value.code == 404
    finally:
        server.shutdown()


def test_export_writes_a_folder_to_host_anywhere(exports, tmp_path, capsys) -> None:
    out = tmp_path / "site"
    assert main(["web", str(exports["prefix"]), "--export", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "model" / "onnx" / "decoder_model_merged.onnx").is_file()
    assert (out / "vendor" / "onnxruntime-web" / "dist" / "ort.wasm.min.mjs").is_file()
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"fp32", "int8"} and manifest["layout"] == "prefix"


def test_web_on_a_folder_that_is_no_export_says_so(tiny_model, capsys) -> None:
    assert main(["web", str(tiny_model("vit-gpt2")), "--export", "/tmp/never-written"]) == 2
    assert "not an ONNX captioner" in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()
