"""The prefix captioner and `loracap train` / `loracap eval`, with tiny SigLIP and Llama checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from loracap.cli import main
from loracap.prefix.batching import encode_captions, prompt_ids
from loracap.prefix.io import load_captioner, save_captioner
from loracap.prefix.modeling import PrefixCaptioner, build_captioner

pytest.importorskip("peft")

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def towers(tiny_model) -> tuple[Path, Path]:
    """(vision, lm): a tiny SiglipModel checkpoint and a tiny SmolLM2-shaped Llama, which pads with its eos
    token as SmolLM2 does: the case where masking "pad ids" would also mask the real eos."""
    return tiny_model("siglip"), tiny_model("llama")


def colour_dataset(root: Path, n: int = 24) -> Path:
    root.mkdir(parents=True)
    names = list(COLOURS)
    for i in range(n):
        name = names[i % len(names)]
        Image.new("RGB", (40, 40), COLOURS[name]).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {name} square", encoding="utf-8")
    return root


def images_and_pixels(vision: Path, names: list[str]):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vision).image_processor
    images = [Image.new("RGB", (40, 40), COLOURS[n]) for n in names]
    return processor, processor(images=images, return_tensors="pt")["pixel_values"]


def test_batch_labels_mask_prompt_and_padding_but_train_eos(towers) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(towers[1])
    assert tok.pad_token_id == tok.eos_token_id
    batch = encode_captions(
        tok, ["a red square", "a much longer blue circle on the left"], prompt="A photo of"
    )
    head = prompt_ids(tok, "A photo of")
    for row in range(2):
        ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        length = int(mask.sum())
        assert (
            ids[:length][-1] == tok.eos_token_id and labels[length - 1] == tok.eos_token_id
        )  # eos is trained
        assert (labels[: len(head)] == -100).all() and ids[: len(head)].tolist() == head  # prompt is not
        assert (labels[length:] == -100).all() and (mask[length:] == 0).all()  # nor is padding
        assert (labels[len(head) : length] == ids[len(head) : length]).all()
    assert int(batch["attention_mask"][0].sum()) < int(batch["attention_mask"][1].sum())  # really padded


def test_loss_covers_only_caption_and_eos(towers) -> None:
    model = build_captioner(str(towers[0]), str(towers[1]), prompt="A photo of")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(towers[1])
    _, pixels = images_and_pixels(towers[0], ["red", "blue"])
    batch = encode_captions(tok, ["a red square", "a blue circle on the left"], prompt="A photo of")
    out = model(pixel_values=pixels, **batch)
    # The same loss by hand: logits at position t predict token t+1, over labelled text positions only.
    p = out.prefix.shape[1]
    logits = out.logits[:, p - 1 : -1]
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
    )
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_batched_generation_equals_one_by_one_and_round_trips(towers, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = build_captioner(str(towers[0]), str(towers[1]), prompt="A photo of", pixel_shuffle=2).eval()
    tok = AutoTokenizer.from_pretrained(towers[1])
    processor, pixels = images_and_pixels(towers[0], ["red", "blue", "green"])
    kwargs = {
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "max_new_tokens": 8,
        "do_sample": False,
    }
    head = prompt_ids(tok, "A photo of")
    batched = model.generate_captions(pixels, head, **kwargs)
    singles = [model.generate_captions(pixels[i : i + 1], head, **kwargs)[0] for i in range(3)]
    for row, single in zip(batched, singles, strict=True):
        assert row[: len(single)].tolist() == single.tolist()

    save_captioner(model, processor, tok, tmp_path / "cap")
    loaded = load_captioner(tmp_path / "cap")
    assert type(AutoModel.from_pretrained(tmp_path / "cap")) is PrefixCaptioner
    assert loaded.model.generate_captions(pixels, head, **kwargs).tolist() == batched.tolist()
    assert loaded.model.config.pixel_shuffle == 2 and loaded.model.config.prompt == "A photo of"


def test_clip_loss_carries_gradient_to_the_projector(towers, tiny_model) -> None:
    from transformers import AutoTokenizer

    from loracap.train.alignment import ClipAlignment

    tok = AutoTokenizer.from_pretrained(towers[1])
    _, pixels = images_and_pixels(towers[0], ["red", "blue", "green"])
    captions = ["a red square", "a blue square", "a green square"]
    batch = encode_captions(tok, captions)
    grads = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_captioner(str(towers[0]), str(towers[1]))
        alignment = ClipAlignment(str(tiny_model("clip")), model.language_model.config.hidden_size)
        out = model(pixel_values=pixels, **batch)
        (out.loss + weight * alignment(out.prefix, captions)).backward()
        grads[weight] = model.projector[1].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])


def train_args(data: Path, out: Path, towers, *extra: str) -> list[str]:
    return [
        "train",
        str(data),
        "--out",
        str(out),
        "--vision",
        str(towers[0]),
        "--lm",
        str(towers[1]),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--warmup-steps",
        "1",
        "--quiet",
        *extra,
    ]


def test_train_then_caption_with_the_result(towers, tmp_path: Path, capsys) -> None:
    data = colour_dataset(tmp_path / "data")
    out = tmp_path / "cap"
    assert main(train_args(data, out, towers, "--max-steps", "6", "--eval-every", "3", "--seed", "3")) == 0
    printed = capsys.readouterr().out
    assert "test split: BLEU-4" in printed and f"--model {out}" in printed

    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(p.name for p in data.glob("*.png"))
    assert not set(split["train"]) & set(split["test"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [3, 6] and {"cider", "bleu4", "rouge_l"} <= set(
        state["history"][0]
    )
    assert json.loads((out / "eval-test.json").read_text())["images"] == len(split["test"])

    # The folder is a captioning model like any other.
    images = tmp_path / "new"
    images.mkdir()
    Image.new("RGB", (40, 40), COLOURS["red"]).save(images / "x.png")
    assert main(["caption", str(images), "--model", str(out), "--quiet", "--max-new-tokens", "6"]) == 0
    loaded = load_captioner(out)
    _, pixels = images_and_pixels(towers[0], ["red"])
    tok = loaded.tokenizer
    ids = loaded.model.generate_captions(
        pixels,
        [],
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=6,
        do_sample=False,
    )
    assert (images / "x.txt").read_text(encoding="utf-8") == tok.decode(
        ids[0], skip_special_tokens=True
    ).strip()

    # Same seed, same split; the split is not redrawn when training continues from the result.
    assert main(train_args(data, tmp_path / "again", towers, "--max-steps", "1", "--seed", "3")) == 0
    assert json.loads((tmp_path / "again" / "split.json").read_text())["test"] == split["test"]
    assert main(train_args(data, tmp_path / "more", towers, "--from", str(out), "--max-steps", "2")) == 0
    # Another seed (the default 0), yet the images held out from the captioner stay held out.
    more = json.loads((tmp_path / "more" / "split.json").read_text())
    assert more["test"] == split["test"]
    assert not set(split["test"]) & set(more["train"])


def test_resume_continues_exactly(towers, tmp_path: Path, monkeypatch) -> None:
    import loracap.train.loop as loop

    data = colour_dataset(tmp_path / "data")
    args = ["--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "100", "--lora-dropout", "0.3"]
    assert main(train_args(data, tmp_path / "straight", towers, *args)) == 0

    real_checkpoint = loop._checkpoint

    def checkpoint_then_crash(accelerator, out, state, keep):
        real_checkpoint(accelerator, out, state, keep)
        raise KeyboardInterrupt  # the machine went away right after the step-3 checkpoint

    monkeypatch.setattr(loop, "_checkpoint", checkpoint_then_crash)
    assert main(train_args(data, tmp_path / "resumed", towers, *args)) == 130
    monkeypatch.setattr(loop, "_checkpoint", real_checkpoint)
    assert main(train_args(data, tmp_path / "resumed", towers, *args, "--resume")) == 0

    a = load_captioner(tmp_path / "straight").model.state_dict()
    b = load_captioner(tmp_path / "resumed").model.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == []
    start = build_captioner(str(towers[0]), str(towers[1])).state_dict()
    assert not torch.equal(a["projector.1.weight"], start["projector.1.weight"])  # it did train


def test_eval_command_scores_a_split(towers, tmp_path: Path, capsys) -> None:
    data = colour_dataset(tmp_path / "data")
    out = tmp_path / "cap"
    assert main(train_args(data, out, towers, "--max-steps", "2", "--eval-every", "100")) == 0
    capsys.readouterr()
    assert (
        main(["eval", str(out), str(data), "--split", "all", "--quiet", "--out", str(tmp_path / "m.json")])
        == 0
    )
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["images"] == 24 and len(result["captions"]) == 24
    assert {"bleu4", "rouge_l", "cider"} <= set(result)
    assert "BLEU-4" in capsys.readouterr().out


def test_caption_metrics_reward_matching_captions() -> None:
    from loracap.train.metrics import caption_metrics

    refs = {str(i): [f"a {c} square on the left"] for i, c in enumerate(["red", "blue", "green", "white"])}
    perfect = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    wrong = caption_metrics({k: "two dogs running" for k in refs}, refs)
    assert perfect["bleu4"] > 0.99 and perfect["rouge_l"] > 0.99 and perfect["cider"] > wrong["cider"]
    assert wrong["bleu4"] < 0.01


def test_examples_from_a_saved_hugging_face_dataset(tmp_path: Path) -> None:
    import datasets

    from loracap.train.data import assign_splits, load_examples

    images = [Image.new("RGB", (16, 16), COLOURS[c]) for c in ("red", "blue", "green")]
    table = datasets.Dataset.from_dict({"image": images, "caption": ["a red square", "", "a green square"]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "hf"))
    examples = load_examples(tmp_path / "hf", caption_column="caption")
    assert [e.caption for e in examples] == [
        "a red square",
        "a green square",
    ]  # the empty caption is left out
    assert examples[1].image().getpixel((0, 0)) == COLOURS["green"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_examples(tmp_path / "hf")
    keys = [f"k{i}" for i in range(40)]
    assert assign_splits(keys, seed=1, val_share=0.1, test_share=0.2) == assign_splits(
        list(reversed(keys)), seed=1, val_share=0.1, test_share=0.2
    )
    assert (
        assign_splits(keys, seed=1, val_share=0.1, test_share=0.2)["test"]
        != assign_splits(keys, seed=2, val_share=0.1, test_share=0.2)["test"]
    )


def test_hugging_face_examples_pickle_for_spawned_workers(tmp_path: Path) -> None:
    """DataLoader workers started with "spawn" (macOS, Windows) receive the dataset pickled."""
    import pickle

    import datasets

    from loracap.train.data import load_examples

    images = [Image.new("RGB", (16, 16), COLOURS[c]) for c in ("red", "blue")]
    table = datasets.Dataset.from_dict({"image": images, "text": ["a red square", "a blue square"]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    examples = pickle.loads(pickle.dumps(load_examples(tmp_path / "hf")))
    assert [e.image().getpixel((0, 0)) for e in examples] == [COLOURS["red"], COLOURS["blue"]]


def test_extended_split_keeps_what_was_held_out() -> None:
    from loracap.train.data import extend_split

    previous = {"train": ["a", "b"], "val": ["c"], "test": ["d", "gone"]}
    fresh = {"train": ["d", "e"], "val": ["a", "f"], "test": ["c", "g"]}  # a redraw over old and new keys
    assert extend_split(previous, fresh) == {
        "train": ["a", "b", "e"],
        "val": ["c", "f"],
        "test": ["d", "gone", "g"],
    }
    assert extend_split(previous, previous) == previous


def test_train_on_a_saved_hugging_face_dataset_with_its_own_caption_column(towers, tmp_path: Path) -> None:
    import datasets

    from loracap.train.loop import train
    from loracap.train.settings import TrainSettings

    names = list(COLOURS) * 3  # 12 images: enough for a test split
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (40, 40), COLOURS[n]) for n in names],
            "caption": [f"a {n} square" for n in names],
        }
    )
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    settings = TrainSettings(
        data=str(tmp_path / "hf"),
        out=str(tmp_path / "cap"),
        vision=str(towers[0]),
        lm=str(towers[1]),
        caption_column="caption",
        max_steps=1,
        batch_size=4,
        workers=0,
        warmup_steps=1,
        progress=False,
    )
    result = train(settings)
    test_split = json.loads((tmp_path / "cap" / "split.json").read_text())["test"]
    assert test_split and result.test_metrics["images"] == len(test_split)
    # `loracap eval` reads the same dataset when told its caption column.
    out = tmp_path / "eval.json"
    args = ["eval", str(tmp_path / "cap"), str(tmp_path / "hf"), "--caption-column", "caption", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == len(test_split)


def test_hugging_face_images_flatten_alpha_like_image_files(tmp_path: Path) -> None:
    """A transparent pixel becomes the same colour whether the image is a file or in a dataset."""
    import datasets

    from loracap.inputs import load_image
    from loracap.train.data import load_examples

    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    table = datasets.Dataset.from_dict({"image": [image], "text": ["nothing"]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    (example,) = load_examples(tmp_path / "hf")
    assert example.image().getpixel((0, 0)) == load_image(tmp_path / "clear.png").getpixel((0, 0))


def test_eval_reports_undecodable_images_and_scores_the_rest(towers, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    from loracap.train.metrics import evaluate_captioner

    data = colour_dataset(tmp_path / "data", n=4)
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a broken square", encoding="utf-8")
    model = build_captioner(str(towers[0]), str(towers[1]))
    processor, tokenizer = (
        AutoImageProcessor.from_pretrained(towers[0]),
        AutoTokenizer.from_pretrained(towers[1]),
    )
    save_captioner(model, processor, tokenizer, tmp_path / "cap")
    result = evaluate_captioner(tmp_path / "cap", data, split="all", progress=False)
    assert result["images"] == 4 and len(result["captions"]) == 4
    assert [e["key"] for e in result["errors"]] == ["broken.png"] and result["errors"][0]["reason"]
    assert json.loads((tmp_path / "cap" / "eval-all.json").read_text())["errors"] == result["errors"]


def test_training_sees_images_decoded_as_captioning_decodes_them(towers, tmp_path: Path) -> None:
    import numpy as np
    from transformers import AutoImageProcessor, AutoTokenizer

    from loracap.backends.device import choose_placement
    from loracap.backends.prefix_captioner import PrefixCaptionerBackend
    from loracap.inputs import load_image
    from loracap.train.batches import CaptionDataset, make_collate
    from loracap.train.data import load_examples

    root = tmp_path / "data"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "big.png")  # detail, so how it is shrunk shows in the pixels
    (root / "big.txt").write_text("a noisy picture", encoding="utf-8")
    processor, tokenizer = (
        AutoImageProcessor.from_pretrained(towers[0]),
        AutoTokenizer.from_pretrained(towers[1]),
    )
    backend = PrefixCaptionerBackend.from_parts(
        build_captioner(str(towers[0]), str(towers[1])), processor, tokenizer, choose_placement("cpu")
    )
    decoded = load_image(root / "big.png", min_side=backend.image_side or None)  # what the pipeline does
    expected = backend.prepare([decoded], "caption")["pixel_values"]

    batch = make_collate(tokenizer, processor, "", 8)([CaptionDataset(load_examples(root), processor)[0]])
    assert torch.equal(batch["pixel_values"], expected)


def test_clip_alignment_cuts_captions_where_clip_scoring_does(tiny_model, tmp_path: Path) -> None:
    """The alignment loss and CLIPScore read a caption through the same window: the text tower's, or the
    tokenizer's where that is shorter."""
    import shutil

    from loracap.train.alignment import ClipAlignment

    folder = tmp_path / "clip"
    shutil.copytree(tiny_model("clip"), folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "model_max_length": 12}), encoding="utf-8")
    assert ClipAlignment(str(folder), 16).max_length == 12
    assert ClipAlignment(str(tiny_model("clip")), 16).max_length == 77


def test_validation_loss_is_the_same_on_every_process(towers) -> None:
    """With several processes each scores its share of the validation set; the loss that decides early
    stopping and the best step must be the mean over all shares, or the processes could disagree (and
    one stop while the others wait for it)."""
    from transformers import AutoTokenizer

    from loracap.train.validation import evaluate_loss

    torch.manual_seed(0)
    model = build_captioner(str(towers[0]), str(towers[1]))
    tok = AutoTokenizer.from_pretrained(towers[1])
    _, pixels = images_and_pixels(towers[0], ["red", "blue", "green"])
    captions = ["a red square", "a blue square on the left of a green one", "a green square"]
    batches = [
        {**encode_captions(tok, [c]), "pixel_values": p[None], "captions": [c]}
        for c, p in zip(captions, pixels, strict=True)
    ]

    class Rank:
        """Process `rank` of two, the other's (total, tokens) summed in by `reduce` as all_reduce would."""

        num_processes, device = 2, torch.device("cpu")

        def __init__(self, others: torch.Tensor) -> None:
            self.others = others

        def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
            assert reduction == "sum"
            return tensor + self.others.to(tensor.dtype)

    class Single:
        num_processes, device = 1, torch.device("cpu")

    whole = evaluate_loss(model, batches, Single())
    tokens = [int((b["labels"] != -100).sum()) for b in batches]
    shares = [evaluate_loss(model, [b], Single()) * n for b, n in zip(batches, tokens, strict=True)]
    first = torch.tensor([shares[0], tokens[0]])  # what rank 0 saw
    rest = torch.tensor([shares[1] + shares[2], tokens[1] + tokens[2]])  # what rank 1 saw
    on_rank_0 = evaluate_loss(model, batches[:1], Rank(rest))
    on_rank_1 = evaluate_loss(model, batches[1:], Rank(first))
    assert on_rank_0 == pytest.approx(whole) and on_rank_1 == pytest.approx(whole)


def test_training_loader_parts_pickle_for_spawned_workers(towers, tmp_path: Path) -> None:
    """DataLoader workers started with "spawn" (macOS, Windows) receive the dataset and collate pickled."""
    import pickle

    from transformers import AutoImageProcessor, AutoTokenizer

    from loracap.train.batches import CaptionDataset, make_collate
    from loracap.train.data import load_examples

    data = colour_dataset(tmp_path / "data", n=4)
    processor, tokenizer = (
        AutoImageProcessor.from_pretrained(towers[0]),
        AutoTokenizer.from_pretrained(towers[1]),
    )
    parts = (
        CaptionDataset(load_examples(data), processor),
        make_collate(tokenizer, processor, "A photo of", 8),
    )
    dataset, collate = pickle.loads(pickle.dumps(parts))
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == 2 and batch["captions"] == ["a red square", "a blue square"]
