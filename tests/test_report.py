"""`loracap report` end to end, on a planted dataset, with tiny CLIP and SigLIP checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loracap
from loracap import hub
from loracap.cli import main
from loracap.hub import hf_cache_dir
from loracap.quality.clipscore import DEFAULT_MODEL
from loracap.quality.gates import CHECKS, NEEDS_TOKENS, Rule, evaluate, parse_rules

TRIGGER = "ohwx"
LONG_CAPTION = f"{TRIGGER}, " + " ".join(f"detail{i}" for i in range(120))


def texture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random blocky texture: unrelated seeds give perceptual hashes about 32 bits apart."""
    cells = np.random.default_rng(seed).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.BILINEAR)


def planted_dataset(root: Path) -> Path:
    """Eight textures with sidecar captions, plus one of each problem the report must find."""
    root.mkdir(parents=True)
    for i in range(8):
        texture(i, (96 + 16 * i, 80)).save(root / f"img{i}.jpg", quality=95)
        (root / f"img{i}.txt").write_text(f"{TRIGGER}, photo, subject{i}, outdoors", encoding="utf-8")
    texture(0, (96, 80)).resize((150, 125)).save(root / "copy_resized.png")  # near-duplicate of img0
    shutil.copyfile(root / "img1.jpg", root / "copy_exact.jpg")  # byte copy of img1 ...
    shutil.copyfile(root / "img1.txt", root / "copy_exact.txt")  # ... with the same caption
    (root / "copy_resized.txt").write_text(f"{TRIGGER}, photo, a resized copy", encoding="utf-8")
    (root / "img2.txt").write_text(LONG_CAPTION, encoding="utf-8")
    (root / "img3.txt").write_text(f"{TRIGGER}woman, smiling, photo", encoding="utf-8")
    texture(99, (64, 64)).save(root / "nocap.jpg")
    (root / "orphan.txt").write_text(f"{TRIGGER}, the image was deleted", encoding="utf-8")
    (root / "broken.jpg").write_bytes(b"")
    (root / "broken.txt").write_text(f"{TRIGGER}, unreadable", encoding="utf-8")
    return root


def run_report(root: Path, out: Path, model: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["report", str(root), "--clip-model", str(model), "--out", str(out), "--quiet", *extra])
    data = (
        json.loads((out / "report.json").read_text(encoding="utf-8"))
        if (out / "report.json").exists()
        else {}
    )
    return rc, data


@pytest.mark.parametrize("arch", ["clip", "siglip-clip"])
def test_report_finds_every_planted_problem(tiny_model, tmp_path: Path, arch: str, capsys) -> None:
    root = planted_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    rc, data = run_report(root, out, tiny_model(arch), "--trigger", TRIGGER, "--fail-on", "missing-caption")

    assert rc == 1  # nocap.jpg breaks the missing-caption rule
    printed = capsys.readouterr().out
    assert "FAIL missing-caption" in printed and str(out / "report.html") in printed

    assert data["dataset"]["missing"] == ["nocap.jpg"]
    assert data["dataset"]["orphans"] == ["orphan.txt"]
    groups = {frozenset(g["paths"]): g["exact"] for g in data["images"]["duplicate_groups"]}
    assert groups == {
        frozenset({"img0.jpg", "copy_resized.png"}): False,
        frozenset({"img1.jpg", "copy_exact.jpg"}): True,
    }
    assert [e["path"] for e in data["images"]["errors"]] == ["broken.jpg"]
    assert [t["path"] for t in data["tokens"]["truncated"]] == ["img2.jpg"]
    assert [g["paths"] for g in data["duplicates"]["exact"]] == [["copy_exact.jpg", "img1.jpg"]]
    assert [f["path"] for f in data["trigger"]["fused"]] == ["img3.jpg"]
    assert data["trigger"]["with_trigger"] == data["dataset"]["captioned"]

    scored = [p for p in data["pairs"] if p["clip"] is not None]
    assert len(scored) == data["dataset"]["captioned"] - 1  # all but the unreadable image
    assert [p["clip"] for p in scored] == sorted(p["clip"] for p in scored)  # lowest first
    assert all(0 <= p["clip"] <= 100 for p in scored)
    assert data["pairs"][-1]["path"] == "broken.jpg" and data["pairs"][-1]["clip_error"]
    assert data["checks"]["fused-trigger"] == 1 and data["checks"]["truncated"] == 1
    assert set(data["checks"]) == set(CHECKS)  # every rule --fail-on accepts has its number

    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") >= len(scored)  # worst pairs and duplicate groups
    assert scored[0]["path"] in html and "<svg" in html


def test_rerun_scores_only_changed_pairs(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORACAP_CACHE", str(tmp_path / "cache"))  # not the scores of the other tests
    root = planted_dataset(tmp_path / "ds")
    model = tiny_model("clip")
    _, first = run_report(root, tmp_path / "a", model, "--no-images")
    # copy_exact.jpg is img1.jpg's bytes with its caption: one model call scores both.
    assert first["clip"]["computed"] == first["clip"]["scored"] - 1 > 0

    _, second = run_report(root, tmp_path / "b", model, "--no-images")
    assert second["clip"]["computed"] == 0 and second["clip"]["cached"] == first["clip"]["scored"]
    assert second["clip"]["failed"] == first["clip"]["failed"] == 1  # the broken image, also remembered
    assert [p["clip"] for p in second["pairs"]] == [p["clip"] for p in first["pairs"]]

    (root / "img4.txt").write_text(f"{TRIGGER}, a new caption", encoding="utf-8")
    _, third = run_report(root, tmp_path / "c", model, "--no-images")
    assert third["clip"]["computed"] == 1


def test_rules_that_hold_exit_zero(tiny_model, tmp_path: Path) -> None:
    root = planted_dataset(tmp_path / "ds")
    rules = "duplicate-image>2,truncated>1,orphan-caption>1,clip<0.0,fused-trigger>1"
    rc, data = run_report(
        root, tmp_path / "out", tiny_model("clip"), "--trigger", TRIGGER, "--fail-on", rules
    )
    assert rc == 0
    assert data["fail_on"]["failed"] == [] and len(data["fail_on"]["rules"]) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-on", "missing-captions"], "unknown --fail-on rule"),
        (["--fail-on", "clip<20", "--no-clip"], "--no-clip"),
        (["--fail-on", "fused-trigger"], "needs --trigger"),
        (["--fail-on", "clip>20"], "clip<SCORE"),
    ],
)
def test_bad_rules_fail_before_any_work(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    root = planted_dataset(tmp_path / "ds")
    # A model path that does not exist: the rule must be refused before anything is loaded.
    rc, _ = run_report(root, tmp_path / "out", tmp_path / "no-model", *args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_jsonl_layout_custom_terms_and_t5_window(tiny_model, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    rows = []
    for i in range(4):
        texture(i, (80, 80)).save(root / f"{i}.png")
        rows.append(
            {
                "file_name": f"{i}.png",
                "text": f"a woman in a red coat, {LONG_CAPTION if i == 1 else 'elderly'}",
            }
        )
    rows.append({"file_name": "gone.png", "text": "missing image"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]), encoding="utf-8")
    terms = tmp_path / "terms.toml"
    terms.write_text('clothing = ["red coat"]\nage = ["elderly", "young"]\n', encoding="utf-8")
    t5 = tiny_model("siglip-clip")  # a sentencepiece-style tokenizer standing in for T5's

    rc, data = run_report(
        root,
        tmp_path / "out",
        tiny_model("clip"),
        "--no-clip",
        "--terms",
        str(terms),
        "--t5-tokenizer",
        str(t5),
        "--t5-max-length",
        "40",
        "--fail-on",
        "t5-truncated",
    )
    assert rc == 1
    assert data["dataset"]["layout"] == "jsonl"
    assert data["dataset"]["missing"] == ["0.png"] and data["dataset"]["orphans"] == ["gone.png"]
    assert data["sensitive"]["categories"] == {
        "clothing": {"occurrences": 3, "captions": 3},
        "age": {"occurrences": 2, "captions": 2},
    }
    assert data["tokens"]["t5"]["max_length"] == 40
    assert [t["path"] for t in data["tokens"]["t5"]["truncated"]] == ["1.png"] and data["clip"] is None


def test_relative_metadata_file_is_named_as_in_the_problems(tiny_model, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    texture(0, (80, 80)).save(root / "0.png")
    lines = '{"file_name": "0.png", "text": "a cat"}\nnot json\n'
    (root / "metadata.jsonl").write_text(lines, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rep = loracap.build_report(
        "ds", metadata_file="ds/metadata.jsonl", clip=False, images=False, clip_model=str(tiny_model("clip"))
    )
    dataset = rep.data["dataset"]
    assert dataset["source"] == "metadata.jsonl"
    assert [p["path"] for p in dataset["problems"]] == ["metadata.jsonl:2"]


def test_python_api_matches_the_cli(tiny_model, tmp_path: Path) -> None:
    root = planted_dataset(tmp_path / "ds")
    rep = loracap.report(
        root, clip_model=str(tiny_model("clip")), trigger=TRIGGER, fail_on=["truncated"], progress=False
    )
    assert not rep.passed and rep.failures == [rep.data["fail_on"]["failed"][0]]
    assert rep.html_path == root / "loracap-report" / "report.html" and rep.html_path.is_file()
    assert rep.checks["truncated"] == 1
    # The report folder is not mistaken for dataset content on the next run.
    assert (
        loracap.build_report(root, clip=False, images=False, clip_model=str(tiny_model("clip"))).data[
            "dataset"
        ]["images"]
        == rep.data["dataset"]["images"]
    )


def test_timing_covers_every_stage_and_the_writes_are_logged(tiny_model, tmp_path: Path, caplog) -> None:
    root = planted_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    with caplog.at_level("DEBUG", logger="loracap"):
        args = ["--no-clip", "--clip-model", str(tiny_model("clip")), "--trigger", TRIGGER, "-v"]
        rc = main(["report", str(root), "--out", str(out), *args])
    timing = json.loads((out / "report.json").read_text(encoding="utf-8"))["timing"]

    assert rc == 0
    assert set(timing) == {"read_s", "tokenizer_load_s", "text_checks_s", "text", "image_checks_s", "images",
                           "clip_s", "document_s"}  # fmt: skip
    assert set(timing["text"]) == {"tokens_s", "duplicates_s", "tags_s", "sensitive_s", "trigger_s"}
    assert set(timing["images"]) == {"scan_s", "duplicates_s", "sizes_s"}
    assert timing["clip_s"] is None
    stages = [v for k, v in timing.items() if k.endswith("_s") and v is not None]
    stages += [*timing["text"].values(), *timing["images"].values()]
    assert all(isinstance(v, float) and v >= 0 for v in stages)
    assert sum(timing["text"].values()) <= timing["text_checks_s"] + 0.01  # the parts of the whole
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert [w.split()[1] for w in wrote] == ["report.json", "report.html"]


def test_rule_parsing_and_evaluation() -> None:
    rules = parse_rules(["missing-caption, truncated>3", "clip<20.5", "mean-clip<25"])
    assert rules == [
        Rule("missing-caption", 0),
        Rule("truncated", 3),
        Rule("clip", 20.5),
        Rule("mean-clip", 25),
    ]
    assert [str(r) for r in rules] == ["missing-caption", "truncated>3", "clip<20.5", "mean-clip<25"]
    failures = evaluate(rules, {"missing-caption": 0, "truncated": 4}, [30.0, 19.0, 40.0])
    assert [f.split(":")[0] for f in failures] == ["truncated>3", "clip<20.5"]
    assert evaluate(rules, {"missing-caption": 1, "truncated": 3}, [10.0, 20.0])[0].startswith(
        "missing-caption"
    )
    with pytest.raises(ValueError, match="needs --trigger"):
        parse_rules(["no-trigger"], trigger=False)
    with pytest.raises(KeyError):  # a check the report did not compute must not pass silently
        evaluate([Rule("small-image", 0)], {"missing-caption": 0}, [])


@pytest.mark.usefixtures("one_thread")
def test_explain_model_draws_the_captions_to_check_first(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """--explain-model: a PNG of where the captioner looked, for each image of the first tiles, linked."""
    monkeypatch.setenv("LORACAP_CACHE", str(tmp_path / "cache"))  # to see whether CLIP scoring ran
    root = planted_dataset(tmp_path / "ds")
    # A model explain cannot read is refused before any work: nothing scored, nothing written.
    refused = ["--explain-model", str(tiny_model("clip"))]
    rc, _ = run_report(root, tmp_path / "refused", tiny_model("clip"), *refused)
    assert rc == 2 and not (tmp_path / "refused").exists() and not (tmp_path / "cache").exists()

    out = tmp_path / "out"
    explainer = str(tiny_model("vit-gpt2"))
    rc, data = run_report(root, out, tiny_model("clip"), "--explain-model", explainer, "--thumbnails", "3")
    assert rc == 0
    lowest = [p["path"] for p in data["pairs"] if p["clip"] is not None][:3]
    explained = data["explain"]
    assert explained["model"] == explainer and explained["errors"] == []
    assert [x["path"] for x in explained["images"]] == lowest
    page = (out / "report.html").read_text(encoding="utf-8")
    for x in explained["images"]:
        assert Image.open(out / x["file"]).format == "PNG"
        assert f'href="{x["file"]}"' in page and f'src="{x["file"]}"' in page

    run_report(root, tmp_path / "plain", tiny_model("clip"), "--thumbnails", "3")  # without: no links
    assert "explain/" not in (tmp_path / "plain" / "report.html").read_text(encoding="utf-8")


def test_missing_clip_model_offline_gives_the_one_line_fix(tmp_path: Path, capsys) -> None:
    root = planted_dataset(tmp_path / "ds")
    rc = main(["report", str(root), "--out", str(tmp_path / "out"), "--quiet"])  # the default CLIP model
    assert rc == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14" in err and "hf download" in err
    assert not (tmp_path / "out").exists()


# --- --no-clip without a tokenizer: the token checks are skipped, not downloaded for ---------------------


@pytest.fixture
def no_downloads(monkeypatch):
    """Hub mode on (HF_HUB_OFFLINE unset) with downloading made a test failure: --no-clip must not fetch a
    CLIP checkpoint for its tokenizer, online or not."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def download(spec, *args):
        raise AssertionError(f"tried to download {spec}")

    monkeypatch.setattr(hub, "_download", download)


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_no_clip_without_tokenizer_skips_the_token_checks(
    tiny_model, tmp_path: Path, capsys, request, online: bool
) -> None:
    if online:
        request.getfixturevalue("no_downloads")
    root = planted_dataset(tmp_path / "ds")
    (root / "img4.txt").write_text("", encoding="utf-8")
    out = tmp_path / "out"
    # The default CLIP model, which is not in the tests' empty Hugging Face cache.
    rc = main(["report", str(root), "--no-clip", "--trigger", TRIGGER, "--out", str(out), "--quiet"])

    assert rc == 0
    printed = capsys.readouterr().out
    assert "token checks skipped" in printed and "--tokenizer ID_OR_FOLDER" in printed
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # Skipped reads as skipped, never as "0 truncated".
    assert set(data["tokens"]) == {"skipped"} and DEFAULT_MODEL in data["tokens"]["skipped"]
    assert {name for name, n in data["checks"].items() if n is None} == NEEDS_TOKENS
    assert all(p["tokens"] is None and p["truncated"] is None for p in data["pairs"])
    assert data["trigger"]["tokens"] is None
    # Every other check still ran.
    assert data["dataset"]["missing"] == ["nocap.jpg"]
    assert [g["paths"] for g in data["duplicates"]["exact"]] == [["copy_exact.jpg", "img1.jpg"]]
    assert data["checks"]["duplicate-image"] == 2 and data["checks"]["empty-caption"] == 1
    assert [p["path"] for p in data["pairs"] if p["empty"]] == ["img4.jpg"]
    assert [f["path"] for f in data["trigger"]["fused"]] == ["img3.jpg"]  # "ohwxwoman": glued, still seen
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Token checks skipped" in html and "fusion check was skipped" in html

    # A tokenizer given explicitly brings the token section back.
    rc = main(
        [
            "report",
            str(root),
            "--no-clip",
            "--tokenizer",
            str(tiny_model("clip")),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rc == 0 and data["tokens"]["tokenizer"] == str(tiny_model("clip"))
    assert [t["path"] for t in data["tokens"]["truncated"]] == ["img2.jpg"] and data["checks"][
        "truncated"
    ] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-on", "truncated"], "needs token counts"),
        (["--fail-on", "t5-truncated>2"], "needs token counts"),
        (["--trigger", TRIGGER, "--fail-on", "fused-trigger"], "needs token counts"),
        (["--t5-tokenizer", "google/t5-v1_1-xxl"], "--t5-tokenizer"),
    ],
)
def test_token_options_without_a_tokenizer_fail_before_any_work(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    root = planted_dataset(tmp_path / "ds")
    rc = main(["report", str(root), "--no-clip", "--out", str(tmp_path / "out"), "--quiet", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "--tokenizer ID_OR_FOLDER" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_no_clip_uses_the_cached_clip_tokenizer(
    tiny_model, tmp_path: Path, monkeypatch, no_downloads
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # not the cache the other tests share
    # Laid out as huggingface_hub's cache does: refs/main -> snapshots/<commit>.
    repo = hf_cache_dir() / f"models--{DEFAULT_MODEL.replace('/', '--')}"
    shutil.copytree(tiny_model("clip"), repo / "snapshots" / ("ab12" * 10))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab12" * 10, encoding="utf-8")
    root = planted_dataset(tmp_path / "ds")

    rc, data = run_report(
        root, tmp_path / "out", DEFAULT_MODEL, "--no-clip", "--no-images", "--fail-on", "truncated"
    )

    assert rc == 1  # the rule is accepted: img2.jpg is over the window
    assert data["tokens"]["tokenizer"] == DEFAULT_MODEL
    assert [t["path"] for t in data["tokens"]["truncated"]] == ["img2.jpg"]


def test_a_given_tokenizer_that_is_not_here_is_an_error(tmp_path: Path, capsys) -> None:
    root = planted_dataset(tmp_path / "ds")
    rc = main(
        ["report", str(root), "--no-clip", "--tokenizer", "acme/not-cached", "--out", str(tmp_path / "out")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "acme/not-cached" in err and "hf download" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_token_rules_need_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="needs token counts"):
        parse_rules(["missing-caption,truncated>3"], tokens=False)
    # Counted without a tokenizer: still accepted.
    assert parse_rules(["empty-caption", "duplicate-caption"], tokens=False) == [
        Rule("empty-caption", 0),
        Rule("duplicate-caption", 0),
    ]
