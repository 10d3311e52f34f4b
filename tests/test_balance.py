"""Balancing a dataset: `loracap report --rare-below N` lists the under-represented tags,
`--balance-prompts FILE` writes a prompt per missing image, and `loracap generate --prompts-file FILE
--captions` turns them into captioned images (the test kit's tiny Stable Diffusion), after which the
tags are no longer rare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from loracap.cli import main
from loracap.quality.balance import balance_prompts, rare_tags

CAPTIONS = {
    "a": "ohwx, 1girl, solo, red hat, smile",
    "b": "ohwx, 1girl, solo, red hat, outdoors",
    "c": "ohwx, 1girl, solo, red hat, scarf, outdoors",
    "d": "ohwx, 1girl, solo, blue coat, smile",
}


def test_rare_tags_and_their_prompts():
    counts = {"red hat": 3, "scarf": 1, "blue coat": 1, "boots": 2}
    assert rare_tags(counts, 3) == [("blue coat", 1), ("scarf", 1), ("boots", 2)]
    assert balance_prompts([("scarf", 1), ("boots", 2)], 3, tags=True, trigger="ohwx") == [
        "ohwx, scarf", "ohwx, scarf", "ohwx, boots"
    ]  # fmt: skip
    assert balance_prompts([("scarf", 2)], 3, tags=False, trigger=None) == ["a photo with scarf"]
    with pytest.raises(ValueError, match="at least 1"):
        rare_tags(counts, 0)


def test_the_whole_loop_with_a_tiny_stable_diffusion(tmp_path: Path, tiny_model, capsys):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    data.mkdir()
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (32, 32), (60 * i, 100, 160)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption, encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    checks = ["report", str(data), "--no-clip", "--no-images", "--trigger", "ohwx", "--rare-below", "2"]
    assert main([*checks, "--balance-prompts", str(prompts)]) == 0
    assert prompts.read_text(encoding="utf-8").splitlines() == ["ohwx, blue coat", "ohwx, scarf"]
    out = capsys.readouterr().out
    assert "rare (in fewer than 2 captions): blue coat (1), scarf (1)" in out and "balance prompts: 2" in out
    document = json.loads((data / "loracap-report" / "report.json").read_text())
    assert document["tags"]["rare"]["prompts"]["count"] == 2

    generated = data / "generated"
    code = main(["generate", "--base", str(tiny_model("sd15")), "--prompts-file", str(prompts), "--n", "1",
                 "--steps", "1", "--out", str(tmp_path / "grid.png"), "--captions", "--quiet"])  # fmt: skip
    assert code == 0
    generated.mkdir()
    for image in tmp_path.glob("grid-*.png"):  # the images and their captions join the dataset
        image.rename(generated / image.name)
        image.with_suffix(".txt").rename(generated / image.with_suffix(".txt").name)
    assert sorted(p.read_text().strip() for p in generated.glob("*.txt")) == [
        "ohwx, blue coat",
        "ohwx, scarf",
    ]
    assert main(checks) == 0
    document = json.loads((data / "loracap-report" / "report.json").read_text())
    assert document["tags"]["rare"]["tags"] == []  # every tag is now in 2 captions or more
