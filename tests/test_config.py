"""One settings object per command: built from flags, a TOML file (--config) or code, and the same run
whichever way it was built."""

from __future__ import annotations

import json

import pytest
from conftest import write_images

import loracap
from loracap.cli import build_parser, main
from loracap.config import build, defaults, setting_names
from loracap.pipeline import CaptionConfig
from loracap.quality.report import ReportConfig
from loracap.serve import ServeConfig


def captions(folder):
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


def test_a_config_file_sets_what_flags_set_and_flags_override_it(tmp_path, tiny_model):
    data = tmp_path / "data"
    write_images(data, ["a.jpg", "b.jpg"])
    config = tmp_path / "ohwx.toml"
    # Keys as the flags name them, with - or _; settings of the style, clean-up and decoding parts too.
    config.write_text(
        f'dir = "{data}"\nmodel = "{tiny_model("vit-gpt2")}"\ntrigger = "ohwx"\nsuffix = ", from the file"\n'
        "min-new-tokens = 2\nmax_new_tokens = 6\nprogress = false\n"
    )
    assert main(["caption", "--config", str(config)]) == 0
    assert all(t.startswith("ohwx, ") and t.endswith(", from the file") for t in captions(data).values())

    # A flag given on the command line wins over the file; what it does not name still comes from it.
    args = ["caption", "--config", str(config), "--suffix", ", from the flag", "--existing", "overwrite"]
    assert main(args) == 0
    assert all(t.startswith("ohwx, ") and t.endswith(", from the flag") for t in captions(data).values())


def test_a_config_file_with_an_unknown_key_is_one_line_and_exit_2(tmp_path, capsys):
    write_images(tmp_path, ["a.jpg"])
    config = tmp_path / "bad.toml"
    config.write_text("max_new_tokenz = 5\n")
    assert main(["caption", str(tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracap: error: unknown setting 'max_new_tokenz' in --config") and "\n" not in err
    assert "max_new_tokens" in err  # the known names are listed
    config.write_text("trigger = [unclosed\n")
    assert main(["caption", str(tmp_path), "--config", str(config)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()


def test_the_python_api_takes_the_same_object_as_the_cli(tmp_path, tiny_model):
    model = str(tiny_model("vit-gpt2"))
    by_keywords, by_object = tmp_path / "keywords", tmp_path / "object"
    for folder in (by_keywords, by_object):
        write_images(folder, ["a.jpg", "b.jpg"])
    loracap.caption_folder(
        by_keywords, model=model, trigger="ohwx", min_new_tokens=2, max_new_tokens=6, progress=False
    )
    config = build(
        CaptionConfig,
        {"dir": by_object, "model": model, "trigger": "ohwx", "min_new_tokens": 2, "max_new_tokens": 6},
    )
    loracap.caption_folder(config, progress=False)
    assert captions(by_keywords) == captions(by_object) and len(captions(by_object)) == 2
    # The in-memory captioner reads the same object (its folder settings unused).
    from PIL import Image

    captioner = loracap.Captioner(config)
    assert captioner(Image.open(by_object / "a.jpg")) == captions(by_object)["a.txt"]


def test_help_shows_the_settings_class_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["caption", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {defaults(CaptionConfig)['style']})" in help_text
    assert f"(default: {defaults(CaptionConfig)['workers']})" in help_text


@pytest.mark.parametrize(
    ("command", "cls"), [("caption", CaptionConfig), ("report", ReportConfig), ("serve", ServeConfig)]
)
def test_every_flag_is_a_setting_of_its_command(command, cls):
    """A flag whose destination is no setting would be refused at run time: each must map to one."""
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if command in a.choices).choices[command]
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config", "offline", "verbose")}
    assert dests <= set(setting_names(cls)), dests - set(setting_names(cls))


def test_report_reads_its_settings_from_a_file(tmp_path, tiny_model):
    data = tmp_path / "data"
    write_images(data, ["a.jpg", "b.jpg"])
    (data / "a.txt").write_text("ohwx, a cat")
    config = tmp_path / "report.toml"
    out = tmp_path / "out"
    config.write_text(
        f'dir = "{data}"\nout = "{out}"\nclip = false\ntokenizer = "{tiny_model("clip")}"\n'
        'trigger = "ohwx"\nfail_on = ["missing-caption"]\nprogress = false\n'
    )
    assert main(["report", "--config", str(config)]) == 1  # b.jpg has no caption: the file's rule fails
    document = json.loads((out / "report.json").read_text())
    assert document["checks"]["missing-caption"] == 1 and document["fail_on"]["failed"]
    assert main(["report", "--config", str(config), "--fail-on", "orphan-caption"]) == 0  # the flag wins


def test_serve_settings_from_a_file_reach_the_app(tmp_path, tiny_model, monkeypatch):
    from test_serve import _captured_app

    from loracap.backends import load_backend

    backend = load_backend(str(tiny_model("blip")), device="cpu")
    config = tmp_path / "serve.toml"
    # --served-model-name sets the setting model_name: a file names settings.
    config.write_text(f'model = "{backend.name}"\nmodel_name = "team-captioner"\n')
    app = _captured_app(monkeypatch, backend, lambda: main(["serve", "--config", str(config)]))
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "team-captioner"
