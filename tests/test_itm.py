"""Image-text matching (BLIP's ITM head) with the tiny BLIP-ITM checkpoint: equal to transformers computed
directly, cached like CLIP scores, in report.json / report.html / the summary, and gated by --fail-on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_images
from PIL import Image
from test_report import planted_dataset

import loracap
from loracap.backends.base import BackendError
from loracap.cli import main
from loracap.quality import itm
from loracap.quality.gates import Rule, evaluate, parse_rules
from loracap.quality.itm import check_itm_model, itm_scores
from loracap.quality.report import summary_lines

LONG = " ".join(["a red car parked next to a wooden house"] * 60)  # > 512 BERT tokens
CAPTIONS = ["a photo of a cat", "a dog running on the beach", "1girl, solo, smile", "a robot", LONG]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from loracap.testing import make_tiny_model

    return make_tiny_model("blip-itm", tmp_path_factory.mktemp("blip_itm"))


def _pairs(folder: Path, n: int = 5) -> list[tuple[Path, str]]:
    # 48x40: smaller than twice the 32 px input, so loracap decodes it at full size, as PIL does directly.
    paths = write_images(folder, [f"img{i}.png" for i in range(n)])
    return [(p, CAPTIONS[i % len(CAPTIONS)]) for i, p in enumerate(paths)]


def _direct(model_dir: Path, pairs: list[tuple[Path, str]]) -> list[float]:
    """Reference: each pair on its own through BlipProcessor + BlipForImageTextRetrieval, softmax, index 1."""
    import torch
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    net = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    out = []
    for path, caption in pairs:
        inputs = processor(
            images=Image.open(path).convert("RGB"),
            text=caption,
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        with torch.no_grad():
            logits = net(**inputs, use_itm_head=True).itm_score
        out.append(float(logits.softmax(dim=-1)[0, 1]))
    return out


def test_tiny_checkpoint_is_blip_image_text_matching(model: Path) -> None:
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    net, info = BlipForImageTextRetrieval.from_pretrained(model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the ITM head is saved, not re-drawn
    assert net.config.architectures == ["BlipForImageTextRetrieval"]
    processor = AutoProcessor.from_pretrained(model)
    assert type(processor).__name__ == "BlipProcessor"
    assert net.config.text_config.vocab_size == len(processor.tokenizer)
    assert check_itm_model(str(model)) == model.resolve()


def test_probabilities_equal_direct_transformers_computation(model: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path)
    run = itm_scores(pairs, model=str(model), batch_size=2, threads=1, cache=False, progress=False)
    assert run.computed == len(pairs) and run.cached == 0 and run.failed == 0
    assert [(p.path, p.caption) for p in run.pairs] == pairs  # input order
    got = [p.probability for p in run.pairs]
    assert got == pytest.approx(_direct(model, pairs), abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in got) and len({round(p, 4) for p in got}) > 1  # not all alike
    assert [p.truncated for p in run.pairs] == [c == LONG for _, c in pairs] and run.truncated == 1
    assert [p.probability for p in run.lowest_first()] == sorted(got)


def test_cache_scores_only_what_changed(model: Path, tmp_path: Path, monkeypatch) -> None:
    pairs = _pairs(tmp_path / "images", n=4)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    pairs.append((tmp_path / "images" / "broken.png", "a cat"))
    cache = tmp_path / "cache" / "itm-cache.json"
    first = itm_scores(pairs, model=str(model), cache_path=cache, threads=1, progress=False)
    assert (first.computed, first.cached, first.failed) == (4, 0, 1) and cache.is_file()

    # Nothing changed: every number comes from the cache, the model is never loaded.
    class NoModel:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the model was loaded although every pair is cached")

    with monkeypatch.context() as m:
        m.setattr(itm, "_Matcher", NoModel)
        again = itm_scores(pairs, model=str(model), cache_path=cache, threads=1, progress=False)
    assert (again.computed, again.cached, again.failed) == (0, 4, 1)
    assert [p.probability for p in again.pairs] == [p.probability for p in first.pairs]
    assert all(p.cached for p in again.pairs) and again.pairs[-1].error == first.pairs[-1].error

    # One caption edited, one image rewritten with other pixels: exactly those two are scored again.
    pairs[1] = (pairs[1][0], "a dog sleeping on a sofa")
    Image.new("RGB", (48, 40), (250, 10, 10)).save(pairs[3][0])
    changed = itm_scores(pairs, model=str(model), cache_path=cache, batch_size=2, threads=1, progress=False)
    assert (changed.computed, changed.cached) == (2, 2)
    assert [p.cached for p in changed.pairs] == [True, False, True, False, True]
    assert [p.probability for p in changed.pairs[:4]] == pytest.approx(_direct(model, pairs[:4]), abs=1e-5)
    assert changed.pairs[1].probability != first.pairs[1].probability

    # Keyed apart from CLIP's entries (a file may hold both); superseded entries are kept, as CLIP's are.
    entries = json.loads(cache.read_text(encoding="utf-8"))["entries"]
    assert all(e["model"].startswith("itm|") for e in entries.values()) and len(entries) == 7


def test_refuses_a_checkpoint_that_is_not_itm(tiny_model, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path, n=1)
    # A BLIP captioner would load into BlipForImageTextRetrieval with a random ITM head: refused.
    for arch, kind in (("blip", "BlipForConditionalGeneration"), ("clip", "CLIPModel")):
        with pytest.raises(BackendError, match=kind):
            itm_scores(pairs, model=str(tiny_model(arch)), cache=False, progress=False)


def test_rules() -> None:
    rules = parse_rules(["itm<0.5, mean-itm<.8", "itm-error"])
    assert rules == [Rule("itm", 0.5), Rule("mean-itm", 0.8), Rule("itm-error", 0)]
    assert [str(r) for r in rules] == ["itm<0.5", "mean-itm<0.8", "itm-error"]
    failures = evaluate(rules, {"itm-error": 0}, [], [0.9, 0.4, 0.95, 0.99, 0.99])
    assert [f.split(":")[0] for f in failures] == ["itm<0.5"]
    assert "1 pair(s)" in failures[0]
    assert [f.split(":")[0] for f in evaluate(rules, {"itm-error": 1}, [], [0.6, 0.7])] == [
        "mean-itm<0.8",
        "itm-error",
    ]
    for spec in ("itm<0.5", "mean-itm<0.5", "itm-error"):
        with pytest.raises(ValueError, match="--itm-model"):
            parse_rules([spec], itm=False)
    for spec in ("itm>0.5", "itm<50", "mean-itm"):  # a probability, from 0 to 1, as a lower bound
        with pytest.raises(ValueError, match="from 0 to 1"):
            parse_rules([spec])


def test_report_has_itm_per_pair_in_the_summary_and_the_page(model: Path, tiny_model, tmp_path: Path) -> None:
    root = planted_dataset(tmp_path / "ds")
    rep = loracap.report(
        root,
        clip_model=str(tiny_model("clip")),
        itm_model=str(model),
        images=False,
        threads=1,
        cache_path=tmp_path / "scores.json",  # CLIP and ITM share it
        progress=False,
    )
    data = json.loads(rep.json_path.read_text(encoding="utf-8"))
    pairs = {p["path"]: p for p in data["pairs"]}
    # The empty image file: no probability and the reason, like its CLIP score; every other pair has one.
    broken = pairs.pop("broken.jpg")
    assert broken["itm"] is None and broken["itm_error"] and broken["clip_error"]
    assert all(p["itm_error"] is None and 0 <= p["itm"] <= 1 for p in pairs.values())
    raw = {p.path.name: p.probability for p in rep.itm.pairs if p.probability is not None}
    assert {k: round(v, 4) for k, v in raw.items()} == {k: p["itm"] for k, p in pairs.items()}
    assert data["checks"]["itm-error"] == 1

    section = data["itm"]
    assert section["model"] == str(model)
    assert (section["scored"], section["failed"]) == (len(pairs), 1)
    assert section["computed"] == len(pairs) - 1  # copy_exact.jpg is img1.jpg with its caption: scored once
    assert section["min"] == round(min(raw.values()), 4) and section["max"] == round(max(raw.values()), 4)
    assert section["below"] == {"threshold": 0.5, "count": sum(v < 0.5 for v in raw.values())}
    assert sum(section["histogram"]["counts"]) == len(pairs)
    assert [e["path"] for e in section["errors"]] == ["broken.jpg"]
    assert data["clip"]["scored"] == len(pairs)  # CLIP scoring is unchanged beside it
    line = next(s for s in summary_lines(rep) if s.startswith("ITM match"))
    lowest = min(raw, key=raw.get)
    assert f"lowest {min(raw.values()):.3f} ({lowest})" in line and f"{len(pairs) - 1} computed" in line

    html = rep.html_path.read_text(encoding="utf-8")
    headers = re.search(r'<section id="pairs">.*?<thead><tr>(.*?)</tr>', html, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", headers) == ["image", "CLIP", "ITM", "tokens", "flags", "caption"]
    # Sortable by the raw number (data-v), shown with three decimals.
    value = pairs["img5.jpg"]["itm"]
    assert f'<td data-v="{value:g}"' in html and f"{value:.3f}</td>" in html

    # Without --itm-model nothing changes: no column, "itm": null, and the pairs carry null.
    plain = loracap.build_report(root, clip=False, images=False, clip_model=str(tiny_model("clip"))).data
    assert plain["itm"] is None and all(p["itm"] is None for p in plain["pairs"])


def test_fail_on_itm_sets_the_exit_status(model: Path, tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORACAP_CACHE", str(tmp_path / "cache"))
    root = planted_dataset(tmp_path / "ds")
    probabilities = sorted(
        p.probability
        for p in loracap.build_report(
            root,
            clip=False,
            images=False,
            clip_model=str(tiny_model("clip")),
            itm_model=str(model),
            threads=1,
        ).itm.pairs
        if p.probability is not None
    )
    assert probabilities[0] < probabilities[-1]
    # itm_model from a settings file, as `--itm-model` gives it; the rule from the command line.
    config = tmp_path / "report.toml"
    config.write_text(f'itm_model = "{model}"\nthreads = 1\n', encoding="utf-8")
    base = [
        "report",
        str(root),
        "--config",
        str(config),
        "--no-clip",
        "--clip-model",
        str(tiny_model("clip")),
    ]

    def run(rule: str) -> tuple[int, dict]:
        out = tmp_path / f"out-{rule}"
        rc = main([*base, "--no-images", "--out", str(out), "--quiet", "--fail-on", rule])
        return rc, json.loads((out / "report.json").read_text(encoding="utf-8"))

    between = (probabilities[0] + probabilities[1]) / 2  # only the lowest pair is below it
    rc, data = run(f"itm<{between:.6f}")
    assert rc == 1 and len(data["fail_on"]["failed"]) == 1 and "1 pair(s)" in data["fail_on"]["failed"][0]
    assert data["itm"]["computed"] == 0  # the scores came from the cache
    scored = [p["itm"] for p in data["pairs"] if p["itm"] is not None]
    assert scored == sorted(scored) and data["pairs"][-1]["path"] == "broken.jpg"  # no CLIP: lowest ITM first
    rc, data = run(f"itm<{probabilities[0] * 0.9:.6f}")
    assert rc == 0 and data["fail_on"]["failed"] == []
    mean = sum(probabilities) / len(probabilities)
    assert run(f"mean-itm<{mean * 1.01:.6f}")[0] == 1 and run(f"mean-itm<{mean * 0.99:.6f}")[0] == 0
    assert run("itm-error")[0] == 1  # the broken image


def test_unusable_itm_model_fails_before_any_work(tiny_model, tmp_path: Path, capsys) -> None:
    root = planted_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    base = ["report", str(root), "--no-clip", "--no-images", "--out", str(out), "--quiet"]
    # An itm rule without an ITM model.
    assert main([*base, "--fail-on", "itm<0.5"]) == 2
    assert "--itm-model" in capsys.readouterr().err
    config = tmp_path / "report.toml"
    # Not on this machine in offline mode: the one-line fix; a BLIP captioner: not an ITM checkpoint.
    for spec, message in (
        ("Salesforce/blip-itm-base-coco", "hf download Salesforce/blip-itm-base-coco"),
        (str(tiny_model("blip")), "not BLIP image-text matching"),
    ):
        config.write_text(f'itm_model = "{spec}"\n', encoding="utf-8")
        assert main([*base, "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
