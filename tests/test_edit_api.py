"""`loracap edit`'s API on a small dataset in each layout: what a user's edits do to the files on disk,
what is refused (a caption changed on disk, a path out of the folder, a missing token), and that bad input
gets a 4xx, never a 5xx."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from loracap.backends import BackendError  # noqa: E402
from loracap.edit.app import EditConfig, create_app  # noqa: E402

CAPTIONS = {"a": "ohwx, red, hat", "b": "ohwx, red, coat", "c": "ohwx, blue", "d": None}


def dataset(root: Path, layout: str = "sidecar") -> Path:
    root.mkdir()
    lines = []
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (40, 30), (60 * i, 90, 120)).save(root / f"{name}.png")
        if caption is not None:
            if layout == "sidecar":
                (root / f"{name}.txt").write_text(caption, encoding="utf-8")
            else:
                lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def client(root: Path, **settings) -> TestClient:
    app = create_app(EditConfig(dir=root, **settings))
    test_client = TestClient(app)
    for _ in range(100):  # the index builds in a background thread
        info = test_client.get("/api/info", headers=_auth(app)).json()
        if not info["indexing"] and info["total"]:
            break
        time.sleep(0.05)
    test_client.headers.update(_auth(app))
    return test_client


def _auth(app) -> dict[str, str]:
    return {"X-Loracap-Token": app.state.token} if app.state.token else {}


def ids(c: TestClient) -> dict[str, int]:
    return {item["path"]: item["id"] for item in c.get("/api/images").json()["items"]}


@pytest.mark.parametrize("layout", ["sidecar", "jsonl"])
def test_a_saved_caption_lands_in_the_datasets_own_layout(tmp_path, layout):
    root = dataset(tmp_path / "data", layout)
    c = client(root)
    page = c.get("/api/images").json()
    assert page["total"] == 4 and [i["path"] for i in page["items"]] == ["a.png", "b.png", "c.png", "d.png"]
    image = ids(c)["a.png"]
    saved = c.put(f"/api/image/{image}/caption", json={"base": "ohwx, red, hat", "text": "ohwx, green, hat"})
    assert saved.status_code == 200
    if layout == "sidecar":
        assert (root / "a.txt").read_text(encoding="utf-8") == "ohwx, green, hat"
    else:
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
        assert {"file_name": "a.png", "text": "ohwx, green, hat"} in rows
    assert c.get("/api/images", params={"q": "green"}).json()["total"] == 1


def test_a_caption_changed_on_disk_is_not_overwritten(tmp_path):
    root = dataset(tmp_path / "data")
    c = client(root)
    (root / "a.txt").write_text("edited in another tool", encoding="utf-8")
    reply = c.put(f"/api/image/{ids(c)['a.png']}/caption", json={"base": "ohwx, red, hat", "text": "mine"})
    assert reply.status_code == 409
    assert reply.json()["disk"] == "edited in another tool" and reply.json()["yours"] == "mine"
    assert (root / "a.txt").read_text(encoding="utf-8") == "edited in another tool"
    # Keeping theirs on purpose: the page resends with the disk's text as the base.
    kept = c.put(
        f"/api/image/{ids(c)['a.png']}/caption", json={"base": "edited in another tool", "text": "mine"}
    )
    assert kept.status_code == 200 and (root / "a.txt").read_text(encoding="utf-8") == "mine"


def test_filters_tags_and_flags(tmp_path):
    root = dataset(tmp_path / "data")
    c = client(root)
    assert c.get("/api/images", params={"tags": "red"}).json()["total"] == 2
    assert c.get("/api/images", params={"tags": "ohwx", "without": "red"}).json()["total"] == 1
    assert [i["path"] for i in c.get("/api/images", params={"flag": "no-caption"}).json()["items"]] == [
        "d.png"
    ]
    tags = c.get("/api/tags").json()
    assert tags["tags"][0] == {"tag": "ohwx", "count": 3} and {"hat", "coat", "blue"} <= set(tags["once"])


def test_bulk_edit_previews_then_applies_and_undo_survives_a_restart(tmp_path):
    root = dataset(tmp_path / "data")
    c = client(root)
    body = {
        "selection": {"query": {"tags": ["red"]}},
        "op": {"kind": "replace_tag", "old": "red", "new": "crimson"},
    }
    preview = c.post("/api/bulk/preview", json=body).json()
    assert preview["count"] == 2 and {x["after"] for x in preview["changes"]} == {
        "ohwx, crimson, hat",
        "ohwx, crimson, coat",
    }
    assert (root / "a.txt").read_text() == "ohwx, red, hat"  # a preview writes nothing
    (root / "b.txt").write_text("changed elsewhere", encoding="utf-8")
    applied = c.post("/api/bulk/apply", json=body).json()
    assert applied["changed"] == 1 and applied["conflicts"] == ["b.png"]
    assert (root / "a.txt").read_text() == "ohwx, crimson, hat" and (
        root / "b.txt"
    ).read_text() == "changed elsewhere"

    restarted = client(root)  # a new server on the same folder: the undo log is on disk
    assert restarted.get("/api/undo").json()["entries"][0]["what"] == "replace_tag red -> crimson"
    assert restarted.post("/api/undo").json() == {"reverted": 1, "conflicts": []}
    assert (root / "a.txt").read_text() == "ohwx, red, hat"
    assert restarted.post("/api/undo").status_code == 409  # nothing left to undo


def test_files_are_served_only_from_inside_the_dataset(tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = dataset(tmp_path / "data")
    os.symlink(outside, root / "link.png")
    c = client(root)
    link = ids(c)["link.png"]
    assert c.get(f"/api/image/{link}/file").status_code == 404
    assert c.get(f"/api/image/{link}/thumb").status_code == 404
    assert c.get(f"/api/image/{ids(c)['a.png']}/thumb").headers["content-type"] == "image/webp"
    for path in (
        "/api/image/../../secret.png/file",
        "/api/image/%2e%2e%2fsecret.png/file",
        "/api/image/-1/file",
    ):
        assert c.get(path).status_code in (404, 422)


def test_another_address_needs_the_token(tmp_path):
    root = dataset(tmp_path / "data")
    app = create_app(EditConfig(dir=root, host="0.0.0.0"))
    anonymous = TestClient(app)
    assert app.state.token and anonymous.get("/api/info").status_code == 401
    assert anonymous.get("/").status_code == 401
    assert anonymous.get("/api/info", headers={"X-Loracap-Token": app.state.token}).status_code == 200
    assert anonymous.get(f"/api/info?token={app.state.token}").status_code == 200
    local = TestClient(create_app(EditConfig(dir=dataset(tmp_path / "other"))))
    assert local.get("/api/info").status_code == 200  # 127.0.0.1: no token


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/images?offset=-1", None),
        ("get", "/api/images?limit=0", None),
        ("get", "/api/images?limit=100000", None),
        ("get", "/api/images?flag=bogus", None),
        ("get", "/api/images?sort=size", None),
        ("get", "/api/image/abc/file", None),
        ("get", "/api/image/999/thumb", None),
        ("put", "/api/image/999/caption", {"base": None, "text": "x"}),
        ("put", "/api/image/1/caption", {"base": None}),
        ("put", "/api/image/1/caption", {"text": "x" * 30000}),
        ("post", "/api/tokens", {"text": 5}),
        ("get", "/api/tags?sort=random", None),
        ("post", "/api/bulk/preview", {"selection": {}, "op": {"kind": "add_tag", "tag": "x"}}),
        ("post", "/api/bulk/preview", {"selection": {"ids": [1]}, "op": {"kind": "explode"}}),
        ("post", "/api/bulk/preview", {"selection": {"ids": [1]}, "op": {"kind": "regex", "pattern": "("}}),
        ("post", "/api/bulk/apply", {"selection": {"ids": [1]}, "op": {"kind": "add_tag"}}),
        (
            "post",
            "/api/bulk/apply",
            {"selection": {"query": {"flag": "nope"}}, "op": {"kind": "add_tag", "tag": "x"}},
        ),
        ("post", "/api/recaption", {"ids": []}),
        ("post", "/api/recaption", {"ids": [1]}),
        ("post", "/api/recaption", {"ids": [999], "model": "m"}),
        ("get", "/api/jobs/nope/events", None),
        ("post", "/api/proposals/accept", {}),
        ("post", "/api/undo", None),
        ("post", "/api/images", None),
        ("get", "/api/explain/1", None),  # no --explain-model
    ],
)
def test_bad_requests_get_a_4xx_never_a_5xx(tmp_path, method, path, body):
    c = client(dataset(tmp_path / "data"))
    reply = getattr(c, method)(path, **({"json": body} if body is not None else {}))
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert "detail" in reply.json()


def test_recaption_proposes_and_accepting_writes(tmp_path, tiny_model):
    import torch

    torch.set_num_threads(1)
    root = dataset(tmp_path / "data")
    c = client(root, model=str(tiny_model("florence2")), device="cpu")
    chosen = [ids(c)["a.png"], ids(c)["d.png"]]
    job = c.post("/api/recaption", json={"ids": chosen, "style": "caption"}).json()["job"]
    with c.stream("GET", f"/api/jobs/{job}/events") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["state"] == "done" and events[-1]["done"] == events[-1]["total"] == 2, events[-1]
    proposals = c.get("/api/proposals").json()["items"]
    assert {p["path"] for p in proposals} == {"a.png", "d.png"} and all(p["proposal"] for p in proposals)
    assert (root / "a.txt").read_text() == "ohwx, red, hat"  # a proposal is not written until accepted
    assert c.post("/api/proposals/reject", json={"ids": [ids(c)["a.png"]]}).json() == {"rejected": 1}
    assert c.post("/api/proposals/accept", json={"all": True}).json()["accepted"] == 1
    written = {p["path"]: p["proposal"] for p in proposals}["d.png"]
    assert (root / "d.txt").read_text(encoding="utf-8") == written.strip()
    assert (root / "a.txt").read_text() == "ohwx, red, hat" and c.get("/api/proposals").json()["items"] == []


@pytest.mark.usefixtures("one_thread")
def test_explain_draws_where_the_model_looked_at_the_chosen_image(tmp_path, tiny_model):
    root = dataset(tmp_path / "data")
    (root / "e.png").write_bytes(b"not an image")  # listed, but cannot be decoded
    c = client(root, explain_model=str(tiny_model("vit-gpt2")), device="cpu")
    assert c.get("/api/info").json()["explain"] is True
    assert 'data-testid="explain-start"' in c.get("/").text  # the page's button

    image = ids(c)["a.png"]
    reply = c.get(f"/api/explain/{image}")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(reply.content))
    assert picture.format == "PNG" and picture.width > 2 * 100  # the image and at least one word's map
    # Drawn once and kept; an image changed on disk is drawn again.
    Image.new("RGB", (40, 30), (250, 20, 20)).save(root / "a.png")
    os.utime(root / "a.png", ns=(time.time_ns() + 10**9,) * 2)
    assert c.get(f"/api/explain/{image}").content != reply.content

    # Bad requests are a 4xx with the reason, never a 5xx.
    for path, params, status in [
        ("/api/explain/999", {}, 404),
        ("/api/explain/x", {}, 422),
        (f"/api/explain/{image}", {"layers": "last"}, 422),
        (f"/api/explain/{image}", {"layers": "5"}, 422),  # the tiny decoder has one layer
        (f"/api/explain/{ids(c)['e.png']}", {}, 422),
    ]:
        bad = c.get(path, params=params)
        assert bad.status_code == status and bad.json()["detail"], (path, params, bad.text)


def test_explain_needs_a_model_it_can_read(tmp_path, tiny_model):
    root = dataset(tmp_path / "data")
    c = client(root)
    assert c.get("/api/info").json()["explain"] is False
    reply = c.get(f"/api/explain/{ids(c)['a.png']}")
    assert reply.status_code == 404 and "--explain-model" in reply.json()["detail"]
    with pytest.raises(BackendError, match="cross-attention"):  # said at start, not on the first click
        create_app(EditConfig(dir=root, explain_model=str(tiny_model("clip"))))


def test_clip_scores_on_request_sort_the_grid_lowest_first(tmp_path, tiny_model):
    import torch

    torch.set_num_threads(1)
    root = dataset(tmp_path / "data")
    c = client(root, clip_model=str(tiny_model("clip")), device="cpu")
    job = c.post("/api/clip", json={}).json()["job"]
    with c.stream("GET", f"/api/jobs/{job}/events") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["state"] == "done", events[-1]
    items = c.get("/api/images", params={"sort": "clip"}).json()["items"]
    scores = [i["clip"] for i in items if i["clip"] is not None]
    assert len(scores) == 3 and scores == sorted(scores)  # the three captioned images, lowest first
    assert items[-1]["path"] == "d.png" and items[-1]["clip"] is None  # no caption, no score: last


def test_a_prose_dataset_lists_no_tags_and_items_carry_their_flags(tmp_path):
    root = tmp_path / "prose"
    root.mkdir()
    for name, caption in {
        "a": "A red hat on a wooden table, in soft light.",
        "b": "A dog.",
        "c": "A dog.",
    }.items():
        Image.new("RGB", (20, 20)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption, encoding="utf-8")
    c = client(root)
    assert c.get("/api/tags").json() == {"tags": [], "common": [], "once": [], "prose": True}
    flags = {i["path"]: i["flags"] for i in c.get("/api/images").json()["items"]}
    assert flags == {"a.png": [], "b.png": ["duplicate"], "c.png": ["duplicate"]}
    assert c.get("/api/images", params={"flag": "duplicate"}).json()["total"] == 2


def test_a_caption_file_that_cannot_be_read_is_never_written_over(tmp_path):
    root = dataset(tmp_path / "data")
    c = client(root)
    (root / "d.txt").mkdir()  # a folder where d.png's caption file belongs
    reply = c.put(f"/api/image/{ids(c)['d.png']}/caption", json={"base": None, "text": "mine"})
    assert reply.status_code == 409 and "cannot be read" in reply.json()["detail"]
    assert (root / "d.txt").is_dir()
