"""The test kit builds checkpoints that load and caption like hub checkpoints, offline and reproducibly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracap.testing import ARCHS, make_tiny_model
from loracap.testing.clip_models import CLIP_ARCHS

REPO_ROOT = Path(__file__).resolve().parents[1]
GEN_KW = {"min_new_tokens": 3, "max_new_tokens": 5, "do_sample": False}


def _images() -> list:
    from PIL import Image

    # Two sizes and colours: the processor must resize both to the model's square input.
    return [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (47, 90), (20, 40, 220))]


def _subprocess_env() -> dict[str, str]:
    """The environment for `python -m loracap.testing` run from a checkout that is not pip-installed."""
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each arch built once per module with seed 0; the tests below only read these directories."""
    root = tmp_path_factory.mktemp("kit")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHS}


def test_unknown_arch_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        make_tiny_model("llava-9000", tmp_path)
    for arch in ARCHS:
        assert arch in str(info.value)


def test_florence2_reloads_through_auto_classes_and_captions(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = built["florence2"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "Florence2ForConditionalGeneration"

    images = _images()
    inputs = processor(text=["<CAPTION>"] * 2, images=images, return_tensors="pt")
    # <image> expands to image_seq_length placeholders, which must match the vision features the model makes.
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert n_image == processor.image_processor.image_seq_length == 5
    with torch.no_grad():
        out = model.generate(**inputs, **GEN_KW)
    assert out.shape[0] == 2
    assert (out[:, 0] == model.generation_config.decoder_start_token_id).all()
    texts = processor.batch_decode(out, skip_special_tokens=False)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    for text, image in zip(texts, images, strict=True):
        parsed = processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)
        assert isinstance(parsed["<CAPTION>"], str)
    # Location tokens parse into boxes scaled to the image (needs the <loc_i> tokens + post_processor_config).
    boxes = processor.post_process_generation(
        "cat<loc_0><loc_0><loc_500><loc_999>", task="<OD>", image_size=(80, 60)
    )
    assert boxes["<OD>"]["labels"] == ["cat"] and boxes["<OD>"]["bboxes"][0][2] == pytest.approx(40, abs=1)


def test_florence2_tokenizer_layout(built: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = built["florence2"]
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    od = tok.convert_tokens_to_ids("<od>")
    assert tok.convert_tokens_to_ids("<loc_0>") == od + 4
    assert tok.convert_tokens_to_ids("<and>") == od + 1023
    assert tok.image_token_id == od + 1024 == len(tok) - 1 == config.image_token_id
    assert config.text_config.vocab_size == len(tok)
    # Task/location tokens are atomic and dropped by skip_special_tokens, as on the hub.
    ids = tok("a cat<loc_5>", add_special_tokens=False).input_ids
    assert ids[-1] == tok.convert_tokens_to_ids("<loc_5>")
    assert tok.decode(ids, skip_special_tokens=True) == "a cat"


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_blip_reloads_through_auto_classes_and_captions(built: dict[str, Path], prompt: str | None) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = built["blip"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "BlipForConditionalGeneration"
    text = None if prompt is None else [prompt] * 2
    inputs = processor(images=_images(), text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **GEN_KW)
    # BLIP starts decoding from [DEC] (text_config.bos_token_id), in place of the prompt's [CLS].
    assert (out[:, 0] == model.config.text_config.bos_token_id).all()
    if prompt is not None:
        n_prompt = inputs["input_ids"].shape[1] - 1  # generate drops the trailing [SEP]
        assert torch.equal(out[:, 1:n_prompt], inputs["input_ids"][:, 1:n_prompt])
    assert out.shape[1] >= (1 if prompt is None else n_prompt) + 3
    texts = processor.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    if prompt is not None:
        assert all(t.startswith(prompt) for t in texts)


def test_vit_gpt2_reloads_and_captions(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    # No Auto* model class maps "vision-encoder-decoder" for image-to-text in transformers 5
    # (AutoModelForVision2Seq is gone and AutoModelForImageTextToText does not list it), and the family has
    # no combined processor: checkpoints ship an image processor and a tokenizer side by side.
    path = built["vit-gpt2"]
    model = VisionEncoderDecoderModel.from_pretrained(path).eval()
    image_processor = AutoImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eot = tokenizer.eos_token_id
    assert eot == tokenizer.bos_token_id == tokenizer.pad_token_id == model.config.decoder_start_token_id
    pixel_values = image_processor(images=_images(), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, **GEN_KW)
    assert out.shape[0] == 2 and (out[:, 0] == eot).all()
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("arch", ["florence2", "blip", "siglip", "llama"])
def test_same_seed_same_weights_other_seed_differs(built: dict[str, Path], tmp_path: Path, arch: str) -> None:
    import torch

    again = _weights(make_tiny_model(arch, tmp_path / "again", seed=0))
    reference = _weights(built[arch])
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    other = _weights(make_tiny_model(arch, tmp_path / "other", seed=1))
    assert any(not torch.equal(other[k], reference[k]) for k in reference)
    # The caller's RNG stream is not reset by a build.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(arch, tmp_path / "rng", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_florence2_original_layout(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoTokenizer

    path = built["florence2-original"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "florence2"
    assert (
        config["auto_map"]["AutoModelForCausalLM"] == "modeling_florence2.Florence2ForConditionalGeneration"
    )
    assert config["vision_config"]["model_type"] == "davit"
    assert config["text_config"]["model_type"] == "florence2_language"

    state = _weights(path)
    assert "image_projection" in state
    assert not [k for k in state if k.startswith("model.")]
    assert "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight" in state
    assert state["language_model.final_logits_bias"].shape == (1, config["vocab_size"])

    # The processor's remote code adds the 1024 task/location tokens at load time: they are not in the files.
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) + 1024 == config["vocab_size"] == config["text_config"]["vocab_size"]
    assert "<loc_0>" not in tokenizer.get_vocab() and "<image>" not in tokenizer.get_vocab()
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "BartTokenizer"

    # Same seed as the native build: identical tensors under the original names, vocab rows [0:V].
    native = _weights(built["florence2"])
    vocab = config["vocab_size"]
    # lm_head is tied to the shared embedding, so the native file stores it once, as `shared`.
    native_embed = native["model.language_model.shared.weight"]
    assert native_embed.shape[0] == vocab + 1  # + <image>
    assert torch.equal(state["language_model.lm_head.weight"], native_embed[:vocab])
    assert torch.equal(state["language_model.model.shared.weight"], native_embed[:vocab])
    assert torch.equal(
        state["image_projection"], native["model.multi_modal_projector.image_projection.weight"].T
    )
    assert torch.equal(
        state["vision_tower.convs.0.proj.weight"], native["model.vision_tower.convs.0.conv.weight"]
    )

    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert preprocessor["image_seq_length"] == 5 and preprocessor["size"] == {"height": 64, "width": 64}
    processing = (path / "processing_florence2.py").read_text()
    assert "self.task_prompts_without_inputs = {" in processing and "'<GENERATE_TAGS>'" in processing
    assert "<MIX_CAPTION>" in (path / "README.md").read_text()


def test_florence2_original_bin_weights(tmp_path: Path) -> None:
    import torch

    path = make_tiny_model("florence2-original", tmp_path, weights_format="bin")
    assert not (path / "model.safetensors").exists()
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert "image_projection" in state and "language_model.lm_head.weight" in state
    with pytest.raises(ValueError):
        make_tiny_model("blip", tmp_path / "blip", weights_format="bin")


def test_cli_builds_blip_identical_to_in_process_build(built: dict[str, Path], tmp_path: Path) -> None:
    import torch

    env = _subprocess_env()
    out_dir = tmp_path / "blip"
    result = subprocess.run(
        [sys.executable, "-m", "loracap.testing", "blip", str(out_dir), "--seed", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out_dir)
    # Another process, same seed: the same tokenizer and weights (nothing depends on hash-map order).
    reference = built["blip"]
    assert (out_dir / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()
    cli_weights, ref_weights = _weights(out_dir), _weights(reference)
    assert all(torch.equal(cli_weights[k], ref_weights[k]) for k in ref_weights)

    bad = subprocess.run(
        [sys.executable, "-m", "loracap.testing", "nope", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode != 0 and "florence2" in bad.stderr


def test_import_is_light() -> None:
    # Importing the kit must not drag in torch / transformers (seconds of start-up) until a model is built.
    light = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, loracap.testing; print('torch' in sys.modules, 'transformers' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
    )
    assert light.stdout.split() == ["False", "False"], light.stderr


# ------------------------------------------------------------------------- parts for `loracap train`


@pytest.mark.parametrize("arch", ["siglip", "llama"])
def test_train_parts_build_small_and_from_the_cli(built: dict[str, Path], tmp_path: Path, arch: str) -> None:
    from loracap.testing.__main__ import main

    # No wall-clock assertion: unit tests must not depend on the machine's speed.
    path = make_tiny_model(arch, tmp_path / "small")
    assert sum(f.stat().st_size for f in path.iterdir()) < 2_000_000
    # The CLI offers every arch; in-process, so no second interpreter start-up.
    assert main([arch, str(tmp_path / "cli")]) == 0
    assert _weights(tmp_path / "cli").keys() == _weights(path).keys()


def test_siglip_is_a_hub_shaped_vision_tower(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModel, SiglipVisionModel

    path = built["siglip"]
    # Saved as google/siglip-* are: a full dual encoder, whose image tower loaders take as .vision_model.
    model = AutoModel.from_pretrained(path).eval()
    assert type(model).__name__ == "SiglipModel"
    tower = SiglipVisionModel.from_pretrained(path).eval()
    vision = tower.config
    assert vision.model_type == "siglip_vision_model" and vision.num_hidden_layers == 2

    processor = AutoImageProcessor.from_pretrained(path)
    # SiglipImageProcessorPil without torchvision, the torchvision-backed SiglipImageProcessor with it.
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    pixels = processor(images=_images(), return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, vision.image_size, vision.image_size)

    with torch.no_grad():
        direct = tower(pixel_values=pixels, output_hidden_states=True)
        extracted = model.vision_model(pixel_values=pixels).last_hidden_state
    # SigLIP has no CLS token: one feature per patch, a 4x4 grid a 2x2 pixel shuffle can fold.
    n_patches = (vision.image_size // vision.patch_size) ** 2
    side = int(n_patches**0.5)
    assert n_patches == 16 and side * side == n_patches and side % 2 == 0
    assert direct.last_hidden_state.shape == (2, n_patches, vision.hidden_size)
    assert len(direct.hidden_states) == vision.num_hidden_layers + 1
    # Both ways of loading give the same tower.
    assert torch.allclose(direct.last_hidden_state, extracted)
    assert not torch.allclose(direct.last_hidden_state[0], direct.last_hidden_state[1])


def _lm(path: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_llama_is_smollm2_shaped(built: dict[str, Path]) -> None:
    path = built["llama"]
    model, tok = _lm(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.rope_parameters["rope_theta"] == 100000.0
    # Tied embeddings, as SmolLM2: one matrix, stored once.
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in _weights(path)

    # SmolLM2's specials at their hub ids; <|endoftext|> is bos, eos, unk and (here) pad.
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.unk_token_id == 0
    gen = model.generation_config
    assert tok.eos_token_id == gen.eos_token_id == config.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id
    # Not the embedding's padding_idx: the pad id is the eos id, whose row must train.
    assert config.pad_token_id is None


def test_llama_tokenizer_round_trips_captions(built: dict[str, Path]) -> None:
    from loracap.testing.tokenizer import caption_corpus

    _, tok = _lm(built["llama"])
    for caption in [caption_corpus()[0], '1girl, solo, 2 cats -- café au lait, 100% "quoted"\n(new line)']:
        ids = tok(caption).input_ids
        assert 0 not in ids  # no bos / eos added, as SmolLM2 and GPT-2; byte-level: no unk either
        assert tok.decode(ids) == caption
    # Chat-format specials stay atomic and are dropped by skip_special_tokens.
    ids = tok("<|im_start|>a cat<|im_end|>").input_ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "a cat"


def test_llama_batched_forward_with_padding_matches_single_rows(built: dict[str, Path]) -> None:
    import torch

    model, tok = _lm(built["llama"])
    texts = ["a photo of a red car on the beach at sunset", "a cat"]
    with torch.no_grad():
        singles = [model(**tok(t, return_tensors="pt")).logits[0] for t in texts]
        for side in ("right", "left"):
            tok.padding_side = side
            batch = tok(texts, return_tensors="pt", padding=True)
            mask = batch["attention_mask"]
            assert (batch["input_ids"][mask == 0] == tok.pad_token_id).all()
            # Positions count real tokens only, so a left-padded row starts at position 0 as generate does.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(**batch, position_ids=positions).logits
            for row, single in enumerate(singles):
                real = logits[row][mask[row].bool()]
                assert torch.allclose(real, single, atol=1e-5), side


class _ForceEos:
    """Logits processor: row `row` must emit eos as its `step`-th new token (random models rarely do)."""

    def __init__(self, prompt_len: int, row: int, step: int, eos: int) -> None:
        self.prompt_len, self.row, self.step, self.eos = prompt_len, row, step, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores[self.row] = float("-inf")
            scores[self.row, self.eos] = 0.0
        return scores


def test_llama_generate_stops_at_eos_and_pads(built: dict[str, Path]) -> None:
    import torch
    from transformers import LogitsProcessorList

    model, tok = _lm(built["llama"])
    tok.padding_side = "left"  # decoder-only batched generation
    prompts = ["a photo of", "an anime illustration of a knight in armor"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    eos = tok.eos_token_id
    with torch.no_grad():
        free = model.generate(**batch, max_new_tokens=6, do_sample=False)
        forced = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            logits_processor=LogitsProcessorList([_ForceEos(width, row=0, step=2, eos=eos)]),
        )
        # Left padding + attention mask: each row generates what it generates alone.
        alone = [
            model.generate(**tok(p, return_tensors="pt"), max_new_tokens=6, do_sample=False) for p in prompts
        ]
    assert free.shape == (2, width + 6)  # the random model never says eos: max_new_tokens bounds it
    for row, single in enumerate(alone):
        assert torch.equal(free[row, -6:], single[0, -6:])
    # Row 0 stops at its eos; generate fills the rest with the pad id; row 1 is unaffected.
    new = forced[:, width:]
    assert new.shape == (2, 6)
    assert new[0, 2] == eos and (new[0, 3:] == tok.pad_token_id).all()
    assert torch.equal(new[1], free[1, width:])
    assert tok.decode(new[0], skip_special_tokens=True) == tok.decode(new[0, :2])


@pytest.mark.parametrize("arch", CLIP_ARCHS)
def test_tiny_checkpoint_layout(tiny_model, arch: str) -> None:
    from transformers import AutoModel, AutoProcessor

    model_dir = tiny_model(arch)
    model = AutoModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    # The image processor is the Pil class without torchvision and the torchvision-backed one with it.
    image_processor = type(processor.image_processor).__name__.removesuffix("Pil")
    names = (type(model).__name__, type(processor).__name__, image_processor)
    if arch == "clip":
        assert names == ("CLIPModel", "CLIPProcessor", "CLIPImageProcessor")
        assert processor.tokenizer.model_max_length == 77 == model.config.text_config.max_position_embeddings
        # CLIP pools the text at the first <|endoftext|>: the config must name the tokenizer's id.
        eos = processor.tokenizer.eos_token_id
        assert model.config.text_config.eos_token_id == eos == len(processor.tokenizer) - 1
    else:
        assert names == ("SiglipModel", "SiglipProcessor", "SiglipImageProcessor")
        assert processor.tokenizer.model_max_length == 64 == model.config.text_config.max_position_embeddings
        assert list(processor.tokenizer("a cat")) == ["input_ids"]  # no attention mask, as on the hub
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


@pytest.mark.parametrize("arch", ["florence2", "blip", "vit-gpt2"])
def test_kit_models_caption_with_the_cli_defaults(built: dict[str, Path], tmp_path: Path, arch: str) -> None:
    """`python -m loracap.testing ARCH DIR` then `loracap caption --model DIR` with no decoding options:
    every mode's default decode length fits the decoder, so every image gets a caption."""
    import torch

    from loracap.cli import main

    torch.set_num_threads(1)
    for name, image in zip(("red.png", "blue.jpg"), _images(), strict=True):
        image.save(tmp_path / name)
    assert main(["caption", str(tmp_path), "--model", str(built[arch]), "--quiet"]) == 0
    assert all((tmp_path / name).read_text().strip() for name in ("red.txt", "blue.txt"))
