"""`loracap edit`'s page in a real browser: Debian's Chromium, driven headless through Playwright, against
the editor's server (uvicorn in a thread) on a tiny dataset. What a user does on the page has to land in
the files on disk: a saved caption, a refused save when the file changed behind the page's back, a bulk
edit and its undo, an accepted re-caption.

As in test_report_browser.py, a missing browser skips on a developer machine and fails where CI is set.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from loracap.edit.app import EditConfig, create_app  # noqa: E402

PROSE = {
    "a": "A red hat on a wooden table.",
    "b": "A blue coat hanging on a door.",
    "c": "A green scarf in the snow.",
    "d": None,
}
TAGS = {
    "a": "ohwx, red, hat",
    "b": "ohwx, red, coat",
    "c": "ohwx, blue, scarf",
    "d": "ohwx, green, hat, smiling",
}
# A function, not an expression: the page's CSP forbids eval, which Playwright uses for a bare expression.
THUMBNAILS_DECODED = "() => Array.from(document.querySelectorAll('#grid img')).every(i => i.naturalWidth > 0)"


def dataset(root: Path, captions: dict[str, str | None]) -> Path:
    root.mkdir()
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", (64, 48), (60 * i, 90, 160)).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_text(caption, encoding="utf-8")
    return root


@contextmanager
def serving(root: Path, **settings) -> Iterator[tuple[str, str]]:
    """The editor on a free port of 127.0.0.1, in a thread: (its address, its token)."""
    import uvicorn

    app = create_app(EditConfig(dir=root, browser=False, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the editor's server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.token
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def info(base: str, token: str) -> dict:
    request = urllib.request.Request(base + "/api/info", headers={"X-Loracap-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def wait_for(base: str, token: str, key: str, timeout: float = 60) -> None:
    """Until /api/info says `key` (indexing done: "indexed"; the tokenizer loaded: "tokenizer")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = info(base, token)
        if (key == "indexed" and not now["indexing"] and now["total"]) or (key != "indexed" and now[key]):
            return
        time.sleep(0.1)
    raise AssertionError(f"/api/info never said {key}: {now}")


def open_page(browser, base: str, token: str):
    """The page, and the list its problems land in: console errors and warnings, script errors, and any
    request that leaves the editor's own address (the page must load nothing from a CDN)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []

    def console(m) -> None:
        # The refused save of the conflict check is a 409 the page handles; Chromium logs every 4xx.
        if m.type in ("error", "warning") and "409 (Conflict)" not in m.text:
            problems.append(f"console {m.type}: {m.text}")

    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def failed(r) -> None:
        # A job's event stream is closed by the page at its last event, so Chromium calls it aborted.
        if not (r.url.split("?")[0].endswith("/events") and "ERR_ABORTED" in (r.failure or "")):
            problems.append(f"request failed: {r.url} {r.failure}")

    page.on("requestfailed", failed)
    page.on("request", lambda r: None if r.url.startswith(base) else problems.append(f"outside: {r.url}"))
    page.goto(base + "/" + (f"?token={token}" if token else ""))
    return page, problems


def card_ids(page) -> dict[str, int]:
    """path -> id of the cards on the page."""
    cards = page.eval_on_selector_all(
        "#grid > li", "cards => cards.map(c => [c.getAttribute('aria-label'), Number(c.dataset.id)])"
    )
    return dict(cards)


def focused_testid(page) -> str | None:
    return page.evaluate("document.activeElement && document.activeElement.getAttribute('data-testid')")


def test_prose_captions_edit_save_and_refuse_a_changed_file(tmp_path, tiny_model, browser) -> None:
    from playwright.sync_api import expect

    root = dataset(tmp_path / "prose", PROSE)
    with serving(root, tokenizer=str(tiny_model("clip"))) as (base, token):
        assert token == ""  # 127.0.0.1: no token
        wait_for(base, token, "indexed")
        wait_for(base, token, "tokenizer")
        page, problems = open_page(browser, base, token)
        expect(page.locator("#grid > li")).to_have_count(4)
        page.wait_for_function(THUMBNAILS_DECODED)
        ids = card_ids(page)
        a, b, c, d = (ids[f"{n}.png"] for n in "abcd")
        expect(page.get_by_test_id(f"caption-{a}")).to_have_text(PROSE["a"])
        expect(page.get_by_test_id(f"caption-{d}")).to_contain_text("no caption")

        # The keyboard: j / ArrowRight forward, k / ArrowLeft back, Enter edits, Escape cancels.
        page.keyboard.press("j")  # the first press shows where the keyboard is: the first card
        assert focused_testid(page) == f"card-{a}"
        page.keyboard.press("ArrowRight")
        page.keyboard.press("j")
        assert focused_testid(page) == f"card-{c}"
        page.keyboard.press("ArrowLeft")
        assert focused_testid(page) == f"card-{b}"
        page.keyboard.press("Enter")
        editor = page.get_by_test_id(f"editor-{b}")
        expect(editor).to_be_focused()
        page.keyboard.type(" Again")
        expect(page.get_by_test_id("save-state")).to_contain_text("Unsaved")
        page.keyboard.press("Escape")
        expect(editor).to_have_count(0)
        assert focused_testid(page) == f"card-{b}"
        expect(page.get_by_test_id(f"caption-{b}")).to_have_text(PROSE["b"])
        page.keyboard.press("k")
        page.keyboard.press("e")

        # The token counter follows the text; over the 77-token window it turns red; Ctrl+Z takes the
        # last change back; Ctrl+S saves, and the sidecar holds the new caption.
        editor = page.get_by_test_id(f"editor-{a}")
        counter = page.get_by_test_id(f"tokens-{a}")
        editor.fill("A red hat.")
        expect(counter).not_to_have_class(re.compile(r"\bpending\b"))  # the count of this text came back
        expect(counter).to_have_text(re.compile(r"^\d+ / 77$"))
        expect(counter).not_to_have_class(re.compile(r"\bover\b"))
        short = int(counter.inner_text().split(" / ")[0])
        editor.fill("A red hat, " + "very " * 60 + "large.")
        expect(counter).to_have_class(re.compile(r"\bover\b"))
        assert int(counter.inner_text().split(" / ")[0]) > 77
        page.keyboard.press("Control+z")
        expect(editor).to_have_value("A red hat.")
        expect(counter).to_have_text(f"{short} / 77")
        expect(counter).not_to_have_class(re.compile(r"\bover\b"))
        page.keyboard.press("Control+s")
        expect(page.get_by_test_id("save-state")).to_have_text("Saved a.png")
        expect(page.get_by_test_id(f"caption-{a}")).to_have_text("A red hat.")
        assert (root / "a.txt").read_text(encoding="utf-8") == "A red hat."

        # A caption changed on disk since the page loaded it: the save is refused, both versions shown.
        # "Use the version on disk" leaves the file as it is and shows it on the card.
        page.get_by_test_id(f"caption-{b}").click()
        page.get_by_test_id(f"editor-{b}").fill("Mine.")
        (root / "b.txt").write_text("Changed behind your back.", encoding="utf-8")
        page.keyboard.press("Control+s")
        dialog = page.get_by_test_id("conflict-dialog")
        expect(dialog).to_be_visible()
        expect(page.get_by_test_id("conflict-disk")).to_have_text("Changed behind your back.")
        expect(page.get_by_test_id("conflict-yours")).to_have_text("Mine.")
        expect(page.get_by_test_id("save-state")).to_contain_text("changed on disk")
        assert (root / "b.txt").read_text(encoding="utf-8") == "Changed behind your back."
        page.get_by_test_id("conflict-take-disk").click()
        expect(dialog).to_be_hidden()
        expect(page.get_by_test_id(f"caption-{b}")).to_have_text("Changed behind your back.")
        assert (root / "b.txt").read_text(encoding="utf-8") == "Changed behind your back."

        # "Keep mine" writes over the file; a caption written for an image that had none is saved too.
        page.get_by_test_id(f"caption-{c}").click()
        page.get_by_test_id(f"editor-{c}").fill("Mine too.")
        (root / "c.txt").write_text("Also changed.", encoding="utf-8")
        page.get_by_test_id(f"save-{c}").click()
        expect(dialog).to_be_visible()
        page.get_by_test_id("conflict-keep-mine").click()
        expect(page.get_by_test_id("save-state")).to_have_text("Saved c.png")
        assert (root / "c.txt").read_text(encoding="utf-8") == "Mine too."
        page.get_by_test_id(f"caption-{d}").click()
        page.get_by_test_id(f"editor-{d}").fill("A pink square.")
        page.keyboard.press("Control+s")
        expect(page.get_by_test_id("save-state")).to_have_text("Saved d.png")
        assert (root / "d.txt").read_text(encoding="utf-8") == "A pink square."

        # Search: only the captions with the text.
        page.get_by_test_id("search").fill("hat")
        expect(page.locator("#grid > li")).to_have_count(1)
        expect(page.get_by_test_id(f"card-{a}")).to_be_visible()
        assert "q=hat" in page.url  # the filter survives a reload
        page.get_by_test_id("search").fill("")
        expect(page.locator("#grid > li")).to_have_count(4)
        assert problems == []
        page.close()


def test_tags_filter_bulk_edit_undo_and_recaption(tmp_path, tiny_model, browser) -> None:
    import torch
    from playwright.sync_api import expect

    torch.set_num_threads(1)
    root = dataset(tmp_path / "tags", TAGS)
    # A token, as on a non-local address: every request of the page must carry it, or get a 401 (which
    # `problems` would hold): fetch() as a header, <img> and EventSource, which cannot send one, as ?token=.
    with serving(root, token="s3cret", model=str(tiny_model("florence2")), device="cpu") as (base, token):
        wait_for(base, token, "indexed")
        page, problems = open_page(browser, base, token)
        grid = page.locator("#grid > li")
        expect(grid).to_have_count(4)
        page.wait_for_function(THUMBNAILS_DECODED)
        ids = card_ids(page)
        a, b, c, d = (ids[f"{n}.png"] for n in "abcd")

        # The tag panel: counts, a click filters by the tag, a shift-click excludes one.
        expect(page.get_by_test_id("tag-ohwx")).to_contain_text("4")
        expect(page.get_by_test_id("tags-once")).to_contain_text("scarf")
        page.get_by_test_id("tag-red").click()
        expect(grid).to_have_count(2)
        page.get_by_test_id("tag-hat").click(modifiers=["Shift"])
        expect(grid).to_have_count(1)
        expect(page.get_by_test_id(f"card-{b}")).to_be_visible()
        expect(page.get_by_test_id("filter-without-hat")).to_be_visible()
        page.get_by_test_id("filters-clear").click()
        expect(grid).to_have_count(4)

        # Tag captions are chips: autocomplete from the dataset's tags, Ctrl+Z takes the last chip back.
        page.get_by_test_id(f"caption-{a}").click()
        tag_input = page.get_by_test_id(f"tag-input-{a}")
        expect(tag_input).to_be_focused()
        tag_input.press_sequentially("smi")
        expect(page.get_by_test_id("suggestion-smiling")).to_contain_text("1")
        tag_input.press("ArrowDown")
        tag_input.press("Enter")
        expect(page.get_by_test_id(f"chip-{a}-smiling")).to_be_visible()
        page.keyboard.press("Control+z")
        expect(page.get_by_test_id(f"chip-{a}-smiling")).to_have_count(0)
        tag_input.press_sequentially("big")
        tag_input.press("Enter")
        page.get_by_test_id(f"chip-remove-{a}-red").click()
        expect(page.get_by_test_id(f"chips-{a}")).to_have_text(re.compile(r"ohwx×\s*hat×\s*big×"))
        page.keyboard.press("Control+s")
        expect(page.get_by_test_id("save-state")).to_have_text("Saved a.png")
        assert (root / "a.txt").read_text(encoding="utf-8") == "ohwx, hat, big"

        # Bulk: replace a tag in everything the filter matches; preview first, then apply; undo puts the
        # files back.
        page.get_by_test_id("tag-hat").click()
        expect(grid).to_have_count(2)
        page.get_by_test_id("select-all-matching").click()
        expect(page.get_by_test_id("selection-count")).to_have_text("all 2 images matching the filter")
        page.get_by_test_id("bulk-op").select_option("replace_tag")
        page.get_by_test_id("bulk-old").fill("hat")
        page.get_by_test_id("bulk-new").fill("cap")
        expect(page.get_by_test_id("bulk-apply")).to_be_disabled()  # nothing applies unseen
        page.get_by_test_id("bulk-preview").click()
        expect(page.get_by_test_id("bulk-result")).to_have_text("2 captions would change.")
        expect(page.get_by_test_id(f"change-{d}")).to_contain_text("ohwx, green, cap, smiling")
        expect(page.locator(f'[data-testid="change-{d}"] ins')).to_have_text("cap")
        expect(page.locator(f'[data-testid="change-{d}"] del')).to_have_text("hat")
        page.get_by_test_id("bulk-apply").click()
        expect(page.get_by_test_id("bulk-result")).to_have_text("Changed 2 captions.")
        assert (root / "a.txt").read_text(encoding="utf-8") == "ohwx, cap, big"
        assert (root / "d.txt").read_text(encoding="utf-8") == "ohwx, green, cap, smiling"
        assert (root / "b.txt").read_text(encoding="utf-8") == TAGS["b"]
        expect(grid).to_have_count(0)  # nothing has "hat" any more
        expect(page.get_by_test_id("undo-log")).to_contain_text("replace_tag hat -> cap")
        page.get_by_test_id("undo").click()
        expect(page.get_by_test_id("undo-result")).to_have_text("Reverted 2 captions.")
        assert (root / "a.txt").read_text(encoding="utf-8") == "ohwx, hat, big"
        assert (root / "d.txt").read_text(encoding="utf-8") == TAGS["d"]
        expect(grid).to_have_count(2)
        expect(page.get_by_test_id("undo-log")).to_contain_text("undone")
        expect(page.get_by_test_id("undo")).to_be_disabled()
        page.get_by_test_id("filters-clear").click()
        page.get_by_test_id("select-none").click()
        expect(grid).to_have_count(4)

        # Re-caption two ticked images with the kit's tiny Florence-2: progress, then proposals; one
        # rejected (its file stays), one accepted (its file gets the new caption).
        page.get_by_test_id(f"select-{c}").check()
        page.get_by_test_id(f"card-{d}").focus()
        page.keyboard.press("x")  # the keyboard ticks too
        expect(page.get_by_test_id("selection-count")).to_have_text("2 selected")
        assert page.get_by_test_id("recaption-model").input_value() == str(tiny_model("florence2"))
        page.get_by_test_id("recaption-style").select_option("caption")
        page.get_by_test_id("recaption-start").click()
        status = page.get_by_test_id("job-status")
        expect(status).to_have_attribute("data-state", re.compile(r"^(done|failed)$"), timeout=45_000)
        expect(status).to_contain_text("done")  # or the job's error
        assert page.get_by_test_id("job-progress").evaluate("p => [p.value, p.max]") == [2, 2]
        expect(page.get_by_test_id(f"proposal-{c}")).to_be_visible()
        expect(page.get_by_test_id(f"proposal-{d}")).to_be_visible()
        proposal = page.locator(f'[data-testid="proposal-{d}"] .after').inner_text().strip()
        page.get_by_test_id(f"proposal-reject-{c}").click()
        expect(page.get_by_test_id(f"proposal-{c}")).to_have_count(0)
        page.get_by_test_id(f"proposal-accept-{d}").click()
        expect(page.get_by_test_id("proposal-result")).to_have_text("Accepted 1 caption.")
        expect(page.get_by_test_id(f"proposal-{d}")).to_have_count(0)
        assert (root / "c.txt").read_text(encoding="utf-8") == TAGS["c"]
        assert (root / "d.txt").read_text(encoding="utf-8") == proposal
        assert problems == []
        page.close()
