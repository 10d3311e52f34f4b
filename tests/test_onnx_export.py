"""`loracap export-onnx` and the onnxruntime captioners, on the test kit's tiny ViT-GPT2 and a tiny
captioner of `loracap train`'s architecture (SigLIP -> projector -> Llama): each export is proven against
PyTorch (first-step logits, then greedy tokens), a broken graph fails loudly, `loracap caption` on the
exported folder (or with `--engine onnx`) writes PyTorch's captions, and int8 mostly agrees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from loracap.cli import main  # noqa: E402
from loracap.onnx_export import ExportOnnxConfig, check_parity, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx") / "vit-gpt2-onnx"
    result = export_onnx(ExportOnnxConfig(model=str(tiny_model("vit-gpt2")), out=out, quantize="int8"))
    return out, result


def test_the_export_has_the_layout_and_passes_its_parity_check(exported):
    out, result = exported
    names = {p.name for p in (out / "onnx").glob("*.onnx")}
    # optimum's image-to-text-with-past layout, as transformers.js reads it
    assert names == {
        f"{g}{q}.onnx" for g in ("encoder_model", "decoder_model_merged") for q in ("", "_quantized")
    }
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not out.with_name(out.name + ".partial").exists()
    assert result["parity"]["first_step_max_logit_difference"] < 1e-4
    assert result["parity"]["token_agreement"] == 1.0
    assert result["parity"]["int8"]["token_agreement"] >= 0.9
    assert (
        result["files"]["decoder_model_merged_quantized.onnx"] < result["files"]["decoder_model_merged.onnx"]
    )
    assert result["parity"]["images"] == 20


def test_a_graph_of_another_model_fails_the_parity_check(exported, tiny_model, tmp_path):
    """Another decoder in the folder (here: another seed's export) is caught at the first step's logits."""
    out, _ = exported
    other = export_onnx_other_seed(tiny_model, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.copy(other / "onnx" / "decoder_model_merged.onnx", broken / "onnx" / "decoder_model_merged.onnx")
    with pytest.raises(ValueError, match="first-step logits differ"):
        check_parity(Path(tiny_model("vit-gpt2")), broken, images=2)


def export_onnx_other_seed(tiny_model, tmp_path: Path) -> Path:
    from loracap.testing import make_tiny_model

    model = make_tiny_model("vit-gpt2", tmp_path / "seed1", seed=1)
    out = tmp_path / "seed1-onnx"
    export_onnx(ExportOnnxConfig(model=str(model), out=out, check_images=1))
    return out


def test_caption_on_the_export_writes_pytorchs_captions(exported, tiny_model, tmp_path):
    out, _ = exported
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (60 + 7 * i, 40), (40 * i, 120, 200 - 30 * i)).save(data / f"{i}.png")
    flags = [
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--quiet",
        "--existing",
        "overwrite",
        "--batch-size",
        "2",
    ]
    assert main(["caption", str(data), "--model", str(tiny_model("vit-gpt2")), *flags]) == 0
    pytorch = {p.name: p.read_text() for p in sorted(data.glob("*.txt"))}
    assert main(["caption", str(data), "--model", str(out), *flags]) == 0
    assert {p.name: p.read_text() for p in sorted(data.glob("*.txt"))} == pytorch
    assert main(["caption", str(data), "--model", str(out), "--quant", "int8", *flags]) == 0
    assert len(list(data.glob("*.txt"))) == 5


def test_export_onnx_from_the_command_line_refuses_what_it_cannot_export(tiny_model, tmp_path, capsys):
    assert main(["export-onnx", str(tiny_model("blip")), str(tmp_path / "out")]) == 2
    assert "export-onnx takes ViT-GPT2-style captioners" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def prefix_captioner(tiny_model, tmp_path_factory) -> Path:
    """A captioner of `loracap train`'s architecture (tiny SigLIP -> MLP projector -> tiny Llama), saved as
    training saves it, with a prompt between the prefix and the caption."""
    from transformers import AutoProcessor, AutoTokenizer

    from loracap.prefix.io import save_captioner
    from loracap.prefix.modeling import build_captioner

    torch.set_num_threads(1)
    vision, lm = tiny_model("siglip"), tiny_model("llama")
    torch.manual_seed(0)  # the projector starts random: the same one every run
    model = build_captioner(str(vision), str(lm), prompt="A photo of", max_caption_tokens=10).eval()
    out = tmp_path_factory.mktemp("prefix") / "captioner"
    save_captioner(
        model, AutoProcessor.from_pretrained(vision).image_processor, AutoTokenizer.from_pretrained(lm), out
    )
    return out


@pytest.fixture(scope="module")
def prefix_exported(prefix_captioner, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("prefix-onnx") / "captioner-onnx"
    return out, export_onnx(ExportOnnxConfig(model=str(prefix_captioner), out=out, quantize="int8,fp16"))


def test_a_trained_captioner_exports_in_transformers_js_layout_and_passes_parity(prefix_exported):
    out, result = prefix_exported
    names = {p.name for p in (out / "onnx").glob("*.onnx")}
    assert names == {f"{g}{q}.onnx" for g in ("vision_encoder", "embed_tokens", "decoder_model_merged")
                     for q in ("", "_quantized", "_fp16")}  # fmt: skip
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    parity = result["parity"]
    assert parity["images"] == 20 and parity["token_agreement"] == 1.0
    assert parity["first_step_max_logit_difference"] < 1e-4
    assert 0 < parity["int8"]["token_agreement"] <= 1 and parity["fp16"]["token_agreement"] >= 0.9
    assert result["files"]["decoder_model_merged_fp16.onnx"] < result["files"]["decoder_model_merged.onnx"]


def test_a_prefix_decoder_of_another_model_fails_the_parity_check(
    prefix_exported, prefix_captioner, tmp_path
):
    """The decoder's weights changed (another seed's LM) is caught at the first step, before any token."""
    import onnx

    out, _ = prefix_exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    graph = onnx.load(str(broken / "onnx" / "decoder_model_merged.onnx"))
    weight = max(graph.graph.initializer, key=lambda w: len(w.raw_data))
    array = onnx.numpy_helper.to_array(weight).copy()
    array *= -1
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(graph, str(broken / "onnx" / "decoder_model_merged.onnx"))
    with pytest.raises(ValueError, match="first-step logits differ"):
        check_parity(prefix_captioner, broken, images=2)


def test_engine_onnx_exports_once_and_writes_pytorchs_captions(prefix_captioner, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (40 + 9 * i, 36), (50 * i, 200 - 40 * i, 90)).save(data / f"{i}.png")
    flags = ["--min-new-tokens", "2", "--device", "cpu", "--quiet", "--existing", "overwrite"]
    # A random tiny captioner may write only special tokens for an image (an empty caption: that image
    # fails, status 1): the onnxruntime runs must then fail on the same image and write the same others.
    status = main(["caption", str(data), "--model", str(prefix_captioner), *flags])
    pytorch = {p.name: p.read_text() for p in sorted(data.glob("*.txt"))}
    assert len(pytorch) >= 3
    for sidecar in data.glob("*.txt"):  # each run writes its own, none is left from the one before
        sidecar.unlink()
    with caplog.at_level("INFO", logger="loracap.onnx_export"):
        assert (
            main(["caption", str(data), "--model", str(prefix_captioner), "--engine", "onnx", *flags])
            == status
        )
    assert "exporting" in caplog.text
    assert {p.name: p.read_text() for p in sorted(data.glob("*.txt"))} == pytorch
    caplog.clear()
    for sidecar in data.glob("*.txt"):
        sidecar.unlink()
    with caplog.at_level("INFO", logger="loracap.onnx_export"):
        assert (
            main(["caption", str(data), "--model", str(prefix_captioner), "--engine", "onnx", *flags])
            == status
        )
    assert "exporting" not in caplog.text  # the cached export is reused
    assert {p.name: p.read_text() for p in sorted(data.glob("*.txt"))} == pytorch


def test_serve_answers_with_the_onnx_captioner(exported, tmp_path):
    """`loracap serve --model OUT`: the OpenAI-style server captions with the onnxruntime backend, and says
    the same as `loracap caption --model OUT` for the same image."""
    import base64

    from fastapi.testclient import TestClient

    from loracap.backends import load_backend
    from loracap.backends.base import GenerationSettings
    from loracap.serve.app import create_app

    out, _ = exported
    (tmp_path / "one").mkdir()
    Image.new("RGB", (50, 40), (30, 160, 90)).save(tmp_path / "one" / "a.png")
    flags = ["--min-new-tokens", "3", "--max-new-tokens", "8", "--quiet"]
    assert main(["caption", str(tmp_path / "one"), "--model", str(out), *flags]) == 0
    written = (tmp_path / "one" / "a.txt").read_text().strip()
    app = create_app(
        load_backend(str(out)), generation=GenerationSettings(max_new_tokens=8, min_new_tokens=3)
    )
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "one" / "a.png").read_bytes()).decode()
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == written != ""


@pytest.fixture(scope="module")
def florence_exported(tiny_model, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("florence-onnx") / "florence2-onnx"
    model = tiny_model("florence2")
    return model, out, export_onnx(ExportOnnxConfig(model=str(model), out=out, check_images=8))


def test_florence2_exports_in_transformers_js_layout_and_passes_parity(florence_exported):
    _, out, result = florence_exported
    names = {p.name for p in (out / "onnx").glob("*.onnx")}
    assert names == {
        f"{g}.onnx" for g in ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
    }
    assert result["parity"]["token_agreement"] == 1.0 and result["parity"]["images"] == 8
    assert result["parity"]["first_step_max_logit_difference"] < 1e-4


@pytest.mark.parametrize("style", ["caption", "detailed"])
def test_caption_on_a_florence2_export_writes_pytorchs_captions(florence_exported, tmp_path, style):
    """Task prompts, the "</s><s>" start, the suppressed location tokens and the checkpoint's decoding rules
    (forced end token) all reach the onnxruntime loop: every caption is PyTorch's, in each task."""
    model, out, _ = florence_exported
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (50 + 11 * i, 40), (60 * i, 90, 220 - 50 * i)).save(data / f"{i}.png")
    flags = [
        "--style",
        style,
        "--min-new-tokens",
        "2",
        "--max-new-tokens",
        "10",
        "--quiet",
        "--existing",
        "overwrite",
    ]
    assert main(["caption", str(data), "--model", str(model), "--device", "cpu", *flags]) == 0
    pytorch = {p.name: p.read_text() for p in sorted(data.glob("*.txt"))}
    assert len(pytorch) == 4
    assert main(["caption", str(data), "--model", str(out), *flags]) == 0
    assert {p.name: p.read_text() for p in sorted(data.glob("*.txt"))} == pytorch
