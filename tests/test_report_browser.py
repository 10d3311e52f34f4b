"""report.html in a real browser: Debian's Chromium, driven headless through Playwright.

`.ci/run` installs Chromium and sets CI, and there a missing browser is a failure, not a skip: a
browser test that skips in CI checks nothing. On a developer machine without Chromium it skips.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from test_report import TRIGGER, planted_dataset

from loracap.cli import main


def test_report_page_renders_without_errors_and_its_tables_sort(tiny_model, tmp_path: Path, browser) -> None:
    root = planted_dataset(tmp_path / "ds")
    out = tmp_path / "report"
    model = str(tiny_model("clip"))
    main(["report", str(root), "--clip-model", model, "--trigger", TRIGGER, "--out", str(out), "--quiet"])

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")

    # Every thumbnail decoded, and the page fetched nothing from outside the file.
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.evaluate("document.images.length") >= 10
    assert page.evaluate("performance.getEntriesByType('resource').length") == 0

    def column(i: int) -> list[str]:
        return page.eval_on_selector_all(
            f"#pairs tbody tr td:nth-child({i})", "cells => cells.map(c => c.textContent)"
        )

    scores = [float(s) for s in column(2) if s != "–"]
    assert scores == sorted(scores)  # lowest CLIP score first, as written
    page.click("#pairs th:nth-child(2)")  # ascending (already), then descending
    page.click("#pairs th:nth-child(2)")
    resorted = [float(s) for s in column(2) if s != "–"]
    assert resorted == sorted(scores, reverse=True)

    page.fill("#pairs input.filter", "img2")
    visible = page.eval_on_selector_all(
        "#pairs tbody tr", "rows => rows.filter(r => r.style.display !== 'none').length"
    )
    assert visible == 1

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert problems == []
    image = Image.open(shot).convert("RGB")
    assert image.height > 2000  # the whole report, not an empty page
    small = image.resize((image.width // 8, image.height // 8))
    assert len(small.getcolors(maxcolors=1 << 20)) > 200  # text, charts and thumbnails, not a blank page
