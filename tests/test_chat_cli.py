"""`loracap caption` end to end with every chat-VLM architecture, and caption styles on each kind of model.

The tiny models are random, so their words mean nothing; what the tests check is what a user relies on:
every image gets a caption through the CLI, the caption is what the model writes for the instruction the
style renders (the same words as asking the backend directly), and a style a model cannot write is a
one-line error before any image is touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GEN_ARGS, write_images

from loracap.backends import GenerationSettings, caption_images, load_backend
from loracap.cli import main
from loracap.inputs import load_image
from loracap.postprocess import PostProcess, postprocess
from loracap.styles import load_style, render_prompt

SETTINGS = GenerationSettings(max_new_tokens=6, min_new_tokens=2)
CHAT_ARCHS = ["llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "idefics3", "smolvlm"]
NAMES = ["a.png", "b.jpg", "sub/c.webp"]


def run(folder: Path, model: Path, *extra: str) -> int:
    return main(["caption", str(folder), "--model", str(model), "--device", "cpu", *GEN_ARGS, *extra])


def read_captions(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.txt"))}


def expected(model: Path, folder: Path, names: list[str], prompts: list[str], tags: bool = False) -> dict:
    """What the backend writes for these images and instructions, asked directly, then cleaned up."""
    backend = load_backend(str(model), device="cpu")
    images = [load_image(folder / name, min_side=backend.image_side or None) for name in names]
    raw = [
        caption_images(backend, [im], "*", SETTINGS, prompt=p)[0]
        for im, p in zip(images, prompts, strict=True)
    ]
    return {
        Path(name).with_suffix(".txt").as_posix(): postprocess(text, PostProcess(), tags=tags)
        for name, text in zip(names, raw, strict=True)
    }


@pytest.mark.parametrize("arch", CHAT_ARCHS)
def test_each_chat_model_captions_a_folder_in_a_style(tmp_path, tiny_model, arch):
    model = tiny_model(arch)
    # Different sizes: Qwen turns each into its own number of image tokens within one batch.
    write_images(tmp_path, NAMES[:2], size=(64, 48))
    write_images(tmp_path, NAMES[2:], size=(30, 90))
    args = ["--style", "training-caption", "--length", "short", "--extra", "lighting", "--batch-size", "3"]
    assert run(tmp_path, model, *args) == 0

    prompt = render_prompt(load_style("training-caption"), length="short", extras=["lighting"])
    assert "one sentence" in prompt and prompt.endswith("Include information about lighting.")
    want = expected(model, tmp_path, NAMES, [prompt] * len(NAMES))
    assert read_captions(tmp_path) == want
    assert all(want.values())


def test_prompts_with_folder_and_tags_are_rendered_per_image(tmp_path, tiny_model):
    model = tiny_model("qwen2-vl")
    names = ["cats/a.png", "cats/b.png", "dogs/c.png"]
    write_images(tmp_path, names)
    (tmp_path / "dogs" / "c.tags").write_text("brown dog,\nsitting")
    template = "Caption this image from the {folder} folder. Hints: {tags}"
    assert run(tmp_path, model, "--prompt", template, "--tags-from", ".tags", "--batch-size", "3") == 0

    prompts = [
        "Caption this image from the cats folder. Hints:",
        "Caption this image from the cats folder. Hints:",
        "Caption this image from the dogs folder. Hints: brown dog, sitting",
    ]
    assert read_captions(tmp_path) == expected(model, tmp_path, names, prompts)


RAW_TAGS = "1girl, solo, 1girl, long_hair"  # a tagger's duplicate, which only tag clean-up removes


def test_tag_styles_get_tag_clean_up_on_chat_models(tmp_path, tiny_model, monkeypatch):
    from loracap.backends.chat_vlm import ChatVLMBackend

    real_generate = ChatVLMBackend.generate

    def tagging_generate(self, inputs, settings):
        # The model still runs; its random words are replaced by what a tagging model writes.
        return [RAW_TAGS for _ in real_generate(self, inputs, settings)]

    monkeypatch.setattr(ChatVLMBackend, "generate", tagging_generate)
    model = tiny_model("llava")
    write_images(tmp_path, ["a.png"])
    assert run(tmp_path, model, "--style", "booru-tags", "--trigger", "ohwx") == 0
    caption = read_captions(tmp_path)["a.txt"]
    prompt = render_prompt(load_style("booru-tags"))
    raw = expected(model, tmp_path, ["a.png"], [prompt], tags=True)["a.txt"]
    assert caption == postprocess(raw, PostProcess(trigger="ohwx"), tags=True)
    assert caption.startswith("ohwx, ")
    assert caption == "ohwx, 1girl, solo, long_hair"


def test_a_user_style_file_is_used_by_path(tmp_path, tiny_model):
    model = tiny_model("idefics3")
    style_file = tmp_path / "house.toml"
    style_file.write_text('prompt = "Describe {name} in the house style. It should be {length}."\n')
    data = tmp_path / "data"
    write_images(data, ["a.png"])
    assert run(data, model, "--style", str(style_file), "--name", "Alice", "--length", "12-words") == 0
    prompt = "Describe Alice in the house style. It should be about 12 words."
    assert read_captions(data) == expected(model, data, ["a.png"], [prompt])


def test_paligemma_captions_a_folder_and_refuses_other_styles(tmp_path, tiny_model, capsys):
    model = tiny_model("paligemma")
    write_images(tmp_path, NAMES[:2])
    assert run(tmp_path, model, "--style", "caption") == 0
    captions = read_captions(tmp_path)
    assert set(captions) == {"a.txt", "b.txt"} and all(captions.values())

    capsys.readouterr()
    other = tmp_path / "other"
    write_images(other, ["c.png"])
    assert run(other, model, "--style", "descriptive") == 2
    assert run(other, model, "--style", "caption", "--length", "short") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loracap: error")]
    assert "cannot write caption style 'descriptive'; it can write: caption" in errors[0]
    assert "does not follow instructions, so --length cannot apply" in errors[1]
    assert not list(other.glob("*.txt"))


def test_style_errors_are_one_line_and_touch_nothing(tmp_path, tiny_model, capsys):
    write_images(tmp_path, ["a.png"])
    chat = tiny_model("llava")
    cases = [
        (chat, ["--style", "poem"], "unknown caption style 'poem'"),
        (chat, ["--style", "analyze"], "style 'analyze' has no prompt: only Florence-2 writes it"),
        (chat, ["--length", "huge"], "bad length 'huge'"),
        (chat, ["--extra", "lightng"], "unknown extra 'lightng'"),
        (chat, ["--prompt", "Describe {subject}."], "unknown placeholder {subject}"),
        (tiny_model("blip"), ["--style", "mj-prompt"], "cannot write caption style 'mj-prompt'"),
    ]
    for model, args, message in cases:
        capsys.readouterr()
        assert run(tmp_path, model, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("loracap: error:") and message in err[-1], (args, err)
    assert not list(tmp_path.glob("*.txt"))


def test_styles_command_lists_styles_and_extras(capsys):
    assert main(["styles"]) == 0
    out = capsys.readouterr().out
    shipped = ("booru-tags", "training-caption", "sd-prompt", "mj-prompt", "descriptive", "straightforward")
    for name in shipped:
        assert f"\n{name} " in out
    assert "camera-angle" in out and "no-text" in out


def test_models_command_shows_styles_memory_and_support(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0].lstrip("*"): line for line in capsys.readouterr().out.splitlines() if "/" in line}
    joy = rows["fancyfeast/llama-joycaption-beta-one-hf-llava"]
    assert "any style" in joy and " 15.8 " in joy and "  3.9 " in joy  # bf16 and 4-bit weights, GB
    assert rows["google/paligemma-3b-mix-224"].split("  no  ")[1].strip().startswith("caption  (")
    florence = rows["microsoft/Florence-2-base"]
    assert "training-caption" in florence and "booru-tags" not in florence  # no tags mode without PromptGen
    assert "booru-tags" in rows["MiaoshouAI/Florence-2-large-PromptGen-v1.5"]
    assert "NOT SUPPORTED: needs trust_remote_code" in rows["vikhyatk/moondream2"]


def test_python_captioner_takes_the_same_style_options(tmp_path, tiny_model):
    import loracap

    model = tiny_model("qwen2.5-vl")
    write_images(tmp_path, ["a.png", "b.png"])
    captioner = loracap.Captioner(
        str(model), style="descriptive", length="short", extras=["no-text"], generation=SETTINGS, device="cpu"
    )
    images = [load_image(tmp_path / name) for name in ("a.png", "b.png")]
    prompt = render_prompt(load_style("descriptive"), length="short", extras=["no-text"])
    assert captioner(images) == list(expected(model, tmp_path, ["a.png", "b.png"], [prompt] * 2).values())


def test_tags_from_is_an_option_of_caption_only(capsys):
    from loracap.cli import build_parser

    assert build_parser().parse_args(["caption", "d", "--tags-from", ".tags"]).tags_ext == ".tags"
    # A served chat model renders its prompt once, with no image file to read {tags} from.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--tags-from", ".tags"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --tags-from" in capsys.readouterr().err
