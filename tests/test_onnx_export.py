"""`loracap export-onnx` and the onnxruntime captioner, on the test kit's tiny ViT-GPT2: the export is proven
against PyTorch (first-step logits, then greedy tokens), a broken graph fails loudly, `loracap caption`
on the exported folder writes PyTorch's captions, and int8 mostly agrees."""

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
    names = {p.name for p in (out / "onnx").iterdir()}
    assert names == {f"{g}{q}.onnx" for g in ("encoder_model", "decoder_model", "decoder_with_past_model")
                     for q in ("", "_quantized")}  # fmt: skip
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not out.with_name(out.name + ".partial").exists()
    assert result["parity"]["first_step_max_logit_difference"] < 1e-4
    assert result["parity"]["token_agreement"] == 1.0
    assert result["parity"]["int8"]["token_agreement"] >= 0.9
    assert result["files"]["decoder_model_quantized.onnx"] < result["files"]["decoder_model.onnx"]


def test_a_graph_of_another_model_fails_the_parity_check(exported, tiny_model, tmp_path):
    """Another decoder in the folder (here: another seed's export) is caught at the first step's logits."""
    out, _ = exported
    other = export_onnx_other_seed(tiny_model, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.copy(other / "onnx" / "decoder_model.onnx", broken / "onnx" / "decoder_model.onnx")
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
