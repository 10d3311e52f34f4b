"""`loracap caption --engine ray` and `loracap export` end to end, on a local Ray and a two-node cluster on
this machine, with a tiny Florence-2 built locally.

Ray starts once for the module (`ray_local`); the two-node cluster test, last, shuts it down first. Each
Ray Data run costs seconds (its caption actor is a fresh process that imports torch and loads the model),
so the tests are few and each checks much.

Two tests kill a run mid-job. A tiny model captions a whole test set in well under a second, too fast to
hit, so the caption actors are slowed down while a flag file exists: a `sitecustomize` on the PYTHONPATH
of this module's Ray (and of the killed `loracap` process and its Ray) wraps `CaptionActor.__call__` with
a short sleep. Nothing else of the engine is changed.

The killed runs read webdataset shards, not a table: Ray hands the driver results a block at a time, and a
small parquet file is one block (everything arrives at the end, so there is no "mid-job" to kill in); a
folder of several parquet files would do, but Ray Data's threaded file listing fails on it without aiohttp
(see the Hugging Face test). Tables are tested with one parquet file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import GEN_ARGS, write_images
from PIL import Image

import loracap
from loracap.cli import main
from loracap.pipeline import caption_folder
from loracap.scale.export import ExportConfig, export
from loracap.scale.shards import read_captions
from loracap.scale.sources import row_id

pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

GENERATION = loracap.GenerationSettings(min_new_tokens=2, max_new_tokens=6)  # GEN_ARGS, for the Python API
OWNER = "LORACAP_TEST_RAY_OWNER"
"""Set in the environment of every process a Ray of these tests starts: how a test finds its own Ray
processes (and never another session's) in /proc."""
SLOW_FLAG = "LORACAP_TEST_SLOW_FLAG"
"""The flag file: while it exists, each caption actor call first sleeps SLOW_SECONDS."""
SLOW_SECONDS = 0.2

_SITECUSTOMIZE = f"""
import os

_flag = os.environ.get({SLOW_FLAG!r})
if _flag:
    try:
        import time
        from loracap.scale import ray_engine as _engine

        _call = _engine.CaptionActor.__call__

        def _slow_call(self, batch, _call=_call):
            if os.path.exists(_flag):
                time.sleep({SLOW_SECONDS})
            return _call(self, batch)

        _engine.CaptionActor.__call__ = _slow_call
    except Exception:  # never break a Ray process over a test aid
        pass
"""


# --- fixtures and helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the module (2 CPUs, no dashboard); torch on one thread in this process. Yields
    the slow-down flag file (absent: actors run at full speed) and the OWNER mark of its processes."""
    import ray
    import torch

    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    flag = site / "slow"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", OWNER, SLOW_FLAG)}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), saved["PYTHONPATH"]]))
    os.environ[OWNER] = f"module-{uuid.uuid4().hex}"
    os.environ[SLOW_FLAG] = str(flag)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield {"flag": flag, "owner": os.environ[OWNER]}
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ray_settings(model: Path) -> dict:
    """caption_with_ray / caption_folder settings shared by the tests."""
    return {
        "model": str(model),
        "device": "cpu",
        "batch_size": 2,
        "progress": False,
        "style": "caption",
        "generation": GENERATION,
    }


@pytest.fixture
def settings(tiny_model):
    return ray_settings(tiny_model("florence2"))


def png_bytes(i: int) -> bytes:
    """A small PNG, different for each i."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), ((37 * i) % 256, (11 * i) % 256, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def write_tars(folder: Path, samples: list[list[str]], bad: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Webdataset shards folder/shard-000.tar...: shard n holds samples[n], each KEY.png + KEY.txt; the
    keys in `bad` get bytes that are no image. Returns {row_id: (key, image bytes, shard)} of the good."""
    folder.mkdir(parents=True, exist_ok=True)
    expected, n = {}, 0
    for index, keys in enumerate(samples):
        shard = folder / f"shard-{index:03d}.tar"
        with tarfile.open(shard, "w") as tar:
            for key in keys:
                data = b"this is not an image" if key in bad else png_bytes(n)
                n += 1
                for name, payload in ((f"{key}.png", data), (f"{key}.txt", f"text of {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if key not in bad:
                    expected[row_id(key, data)] = (key, data, str(shard))
    return expected


def raw_rows(out: Path) -> list[dict]:
    """Every row of every caption shard under `out`, duplicates included (not read_captions)."""
    return [row for path in sorted(out.glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


def caption_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.txt"))}


def errors_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def own_processes(owner: str, needle: bytes = b"") -> dict[int, str]:
    """{pid: command line} of the processes whose environment carries OWNER=owner (and whose command line
    holds `needle`): the processes of one Ray these tests started, wherever Ray put them."""
    mark = f"{OWNER}={owner}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline and mark in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or not ours to read
            continue
    return found


# --- folders: the same files as the local engine --------------------------------------------------------


def test_folder_through_ray_writes_what_the_local_engine_writes(ray_local, settings, tmp_path, capsys):
    ray_dir = tmp_path / "ray"
    write_images(ray_dir, ["a.jpg", "b.png", "sub/c.webp", "x.jpg"])
    (ray_dir / "x.txt").write_text("hand written caption", encoding="utf-8")
    (ray_dir / "bad.jpg").write_bytes(b"not an image")
    local_dir = shutil.copytree(ray_dir, tmp_path / "local")
    options = {"trigger": "ohwx", "prefix": "photo of", "existing": "append"}

    local = caption_folder(local_dir, **settings, **options)
    assert (local.captioned, local.failed) == (4, 1)

    capsys.readouterr()
    args = ["caption", str(ray_dir), "--engine", "ray", "--model", settings["model"], "--device", "cpu"]
    args += ["--batch-size", "2", "--style", "caption", "--trigger", "ohwx", "--prefix", "photo of"]
    assert main([*args, "--existing", "append", *GEN_ARGS]) == 1  # a file failed: exit 1, not a crash
    assert "4 captioned, 0 skipped (already captioned), 1 failed of 5 images" in capsys.readouterr().err

    written = caption_files(ray_dir)
    assert written == caption_files(local_dir)
    assert sorted(written) == ["a.txt", "b.txt", "sub/c.txt", "x.txt"]
    assert all(text.decode().startswith("ohwx, photo of") for text in written.values())
    assert b"hand written caption" in written["x.txt"] and written["x.txt"] != b"hand written caption"
    errors = errors_of(ray_dir / "loracap-errors.jsonl")
    assert errors == errors_of(local_dir / "loracap-errors.jsonl")
    assert [(e["path"], e["stage"]) for e in errors] == [("bad.jpg", "decode")]

    # A second run skips every captioned image and rewrites nothing; the bad file fails as before.
    from loracap.scale.ray_engine import caption_with_ray

    mtimes = {p: p.stat().st_mtime_ns for p in ray_dir.rglob("*.txt")}
    again = caption_with_ray(ray_dir, **settings)
    assert (again.skipped, again.captioned, again.failed, again.failed_before) == (4, 0, 1, 1)
    assert [e.path for e in again.errors] == ["bad.jpg"]
    assert caption_files(ray_dir) == written
    assert {p: p.stat().st_mtime_ns for p in ray_dir.rglob("*.txt")} == mtimes

    (ray_dir / "bad.jpg").unlink()
    assert main([*args, *GEN_ARGS]) == 0  # nothing failed: exit 0
    assert "0 captioned, 4 skipped (already captioned), 0 failed of 4 images" in capsys.readouterr().err
    assert caption_files(ray_dir) == written


# --- shards and tables: caption shards, re-runs, export --------------------------------------------------


@pytest.fixture(scope="module")
def webdataset_run(ray_local, tiny_model, tmp_path_factory):
    """Three webdataset shards (8 images, one more member that is no image) captioned once on Ray."""
    from loracap.scale.ray_engine import caption_with_ray

    root = tmp_path_factory.mktemp("wds")
    samples = [["s0_0", "s0_1", "s0_2"], ["s1_0", "s1_bad", "s1_2"], ["s2_0", "s2_1", "s2_2"]]
    expected = write_tars(root / "shards", samples, bad=("s1_bad",))
    spec = str(root / "shards" / "shard-{000..002}.tar")
    settings = ray_settings(tiny_model("florence2"))
    out = root / "out"
    summary = caption_with_ray(spec, out=str(out), shard_rows=2, **settings)
    return {"spec": spec, "out": out, "expected": expected, "summary": summary, "settings": settings}


def test_webdataset_shards_round_trip_through_caption_shards_and_export(webdataset_run, tmp_path):
    from loracap.scale.ray_engine import caption_with_ray

    out, expected, summary = webdataset_run["out"], webdataset_run["expected"], webdataset_run["summary"]
    assert (summary.total, summary.captioned, summary.failed, summary.skipped) == (9, 8, 1, 0)
    assert summary.errors_file == str(out / "errors.jsonl")

    rows = raw_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(expected)  # each good image once, by row_id
    for row in rows:
        key, _, shard = expected[row["id"]]
        assert (row["key"], row["where"], row["model"], row["style"]) == (
            key,
            shard,
            webdataset_run["settings"]["model"],
            "caption",
        )
        assert row["caption"].strip()
    parts = sorted(out.glob("part-*.parquet"))
    assert all(pq.read_metadata(p).num_rows <= 2 for p in parts)  # --shard-rows 2
    bad = row_id("s1_bad", b"this is not an image")
    assert [(e["id"], e["key"], e["stage"]) for e in errors_of(out / "errors.jsonl")] == [
        (bad, "s1_bad", "decode")
    ]
    source = json.loads((out / "loracap-source.json").read_text())
    assert source["kind"] == "webdataset" and len(source["paths"]) == 3

    # A re-run captions nothing: every row is done, the undecodable one too (same bytes, same result).
    again = caption_with_ray(webdataset_run["spec"], out=str(out), shard_rows=2, **webdataset_run["settings"])
    assert (again.total, again.skipped, again.captioned, again.failed) == (9, 9, 0, 0)
    assert sorted(out.glob("part-*.parquet")) == parts

    caption_of = {r["id"]: r["caption"] for r in rows}
    sidecars = tmp_path / "sidecar"
    done = export(ExportConfig(shards=out, to=sidecars, format="sidecar", progress=False))
    assert (done.written, done.kept, done.missing) == (8, 0, [])
    names = sorted(p.name for p in sidecars.iterdir())
    assert names == sorted(
        [f"{k}.png" for k, _, _ in expected.values()] + [f"{k}.txt" for k, _, _ in expected.values()]
    )
    for ident, (key, data, _) in expected.items():
        assert (sidecars / f"{key}.png").read_bytes() == data
        assert (sidecars / f"{key}.txt").read_bytes().decode("utf-8") == caption_of[ident]
    mtimes = {p: p.stat().st_mtime_ns for p in sidecars.glob("*.png")}
    again = export(ExportConfig(shards=out, to=sidecars, format="sidecar", progress=False))
    assert (again.written, again.kept, again.missing) == (0, 8, [])
    assert {p: p.stat().st_mtime_ns for p in sidecars.glob("*.png")} == mtimes

    jsonl = tmp_path / "jsonl"
    done = export(ExportConfig(shards=out, to=jsonl, format="jsonl", progress=False))
    assert (done.written, done.kept) == (8, 0)
    records = [json.loads(line) for line in (jsonl / "metadata.jsonl").read_text().splitlines()]
    by_name = {f"{k}.png": caption_of[ident] for ident, (k, _, _) in expected.items()}
    assert sorted(r["file_name"] for r in records) == sorted(by_name)
    assert {r["file_name"]: r["text"] for r in records} == by_name
    for key, data, _ in expected.values():
        assert (jsonl / f"{key}.png").read_bytes() == data
    again = export(ExportConfig(shards=out, to=jsonl, format="jsonl", progress=False))
    assert (again.written, again.kept) == (0, 8)
    assert len((jsonl / "metadata.jsonl").read_text().splitlines()) == 8  # each image once, not twice

    # A block Ray retried can leave a row in two shards: read_captions and export keep one per id.
    twice = shutil.copytree(out, tmp_path / "twice")
    shutil.copy(parts[0], twice / "part-zz-retried-00000.parquet")
    assert len(raw_rows(twice)) == len(rows) + pq.read_metadata(parts[0]).num_rows
    assert sorted(r["id"] for r in read_captions(twice)) == sorted(expected)
    done = export(ExportConfig(shards=twice, to=tmp_path / "twice-jsonl", format="jsonl", progress=False))
    assert (done.written, done.kept) == (8, 0)
    assert len((tmp_path / "twice-jsonl" / "metadata.jsonl").read_text().splitlines()) == 8

    import datasets

    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(jsonl), split="train", cache_dir=str(tmp_path / "hf-datasets")
    )
    assert len(loaded) == 8
    assert sorted(loaded["text"]) == sorted(by_name.values())


def test_caption_shards_record_each_image_sha256(webdataset_run):
    rows = raw_rows(webdataset_run["out"])
    for row in rows:
        _, data, _ = webdataset_run["expected"][row["id"]]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_parquet_table_round_trip(ray_local, settings, tmp_path, capsys):
    """A table as `datasets` writes images ({bytes, path} structs) with an id column; the re-run through
    the command line."""
    from loracap.scale.ray_engine import caption_with_ray

    names = ["cat", "dog", "bad", "owl", "fox"]
    images = [b"this is not an image" if name == "bad" else png_bytes(i) for i, name in enumerate(names)]
    table = pa.table(
        {
            "name": names,
            "image": [
                {"bytes": data, "path": f"{name}.png"} for name, data in zip(names, images, strict=True)
            ],
            "label": list(range(len(names))),
        }
    )
    data_dir = tmp_path / "table"
    data_dir.mkdir()
    pq.write_table(table, data_dir / "train.parquet")
    expected = {row_id(n, d): (n, d) for n, d in zip(names, images, strict=True) if n != "bad"}
    out = tmp_path / "out"

    summary = caption_with_ray(data_dir, out=str(out), shard_rows=2, id_column="name", **settings)
    assert (summary.total, summary.captioned, summary.failed) == (5, 4, 1)
    rows = raw_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert {r["key"] for r in rows} == {"cat", "dog", "owl", "fox"}
    assert all(r["where"] == str(data_dir / "train.parquet") for r in rows)
    assert all(pq.read_metadata(p).num_rows <= 2 for p in out.glob("part-*.parquet"))
    assert [(e["key"], e["stage"]) for e in errors_of(out / "errors.jsonl")] == [("bad", "decode")]
    source = json.loads((out / "loracap-source.json").read_text())
    assert (source["kind"], source["id_column"]) == ("parquet", "name")

    capsys.readouterr()
    args = ["caption", str(data_dir), "--engine", "ray", "--out", str(out), "--shard-rows", "2"]
    args += ["--image-column", "image", "--id-column", "name", "--model", settings["model"]]
    assert main([*args, "--device", "cpu", "--batch-size", "2", "--style", "caption", *GEN_ARGS]) == 0
    assert "0 captioned, 5 skipped (already captioned), 0 failed of 5 images" in capsys.readouterr().err
    assert sorted(r["id"] for r in raw_rows(out)) == sorted(expected)

    to = tmp_path / "export"
    done = export(ExportConfig(shards=out, to=to, format="sidecar", progress=False))
    assert (done.written, done.missing) == (4, [])
    caption_of = {r["key"]: r["caption"] for r in rows}
    assert sorted(p.name for p in to.iterdir()) == sorted(
        f"{n}{s}" for n in caption_of for s in (".png", ".txt")
    )
    for name, data in expected.values():
        assert (to / f"{name}.png").read_bytes() == data
        assert (to / f"{name}.txt").read_bytes().decode("utf-8") == caption_of[name]
    again = export(ExportConfig(shards=out, to=to, format="sidecar", progress=False))
    assert (again.written, again.kept) == (0, 4)


def test_hugging_face_dataset_saved_to_disk(ray_local, settings, tmp_path):
    import datasets

    from loracap.scale.ray_engine import caption_with_ray

    names = ["a", "b", "c"]
    images = [png_bytes(i) for i in range(3)]
    dataset = datasets.Dataset.from_dict(
        {"name": names, "image": [{"bytes": d, "path": None} for d in images]}
    ).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"

    summary = caption_with_ray(tmp_path / "hf", out=str(out), shard_rows=2, id_column="name", **settings)
    assert (summary.total, summary.captioned, summary.failed) == (3, 3, 0)
    assert sorted(r["id"] for r in raw_rows(out)) == sorted(
        row_id(n, d) for n, d in zip(names, images, strict=True)
    )
    assert json.loads((out / "loracap-source.json").read_text())["kind"] == "hf"


# --- killed actors and killed jobs ------------------------------------------------------------------------


SAMPLES = [[f"k{s}{i}" for i in range(6)] for s in range(6)]  # 36 images in 6 shards: 6 Ray blocks


def test_a_caption_actor_killed_mid_job_loses_and_duplicates_nothing(ray_local, settings, tmp_path):
    from loracap.scale.ray_engine import caption_with_ray

    expected = write_tars(tmp_path / "shards", SAMPLES)
    out = tmp_path / "out"
    result: dict = {}

    def job():
        try:
            result["summary"] = caption_with_ray(tmp_path / "shards", out=str(out), shard_rows=2, **settings)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    ray_local["flag"].touch()  # slow actors: the job lasts long enough to be hit mid-way
    try:
        thread = threading.Thread(target=job)
        thread.start()
        killed, parts_then, actors = None, 0, set()
        deadline = time.monotonic() + 240
        while thread.is_alive() and time.monotonic() < deadline:
            found = own_processes(ray_local["owner"], b"CaptionActor")
            actors.update(found)
            parts = list(out.glob("part-*.parquet")) if out.is_dir() else []
            if killed is None and found and parts:
                killed, parts_then = next(iter(found)), len(parts)
                assert "MapWorker(MapBatches(CaptionActor))" in found[killed]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        thread.join(timeout=60)
    finally:
        ray_local["flag"].unlink()
    assert "error" not in result, result.get("error")
    assert killed is not None, "no caption actor was seen with a shard written"

    rows = raw_rows(out)
    assert parts_then < len(list(out.glob("part-*.parquet")))  # the kill came before the job's end
    assert actors - {killed}, "no caption actor took the killed one's place"
    counts = collections.Counter(r["id"] for r in rows)
    assert {i for i, n in counts.items() if n > 1} == set()  # nothing twice
    assert set(counts) == set(expected)  # nothing lost
    summary = result["summary"]
    assert (summary.total, summary.captioned, summary.failed) == (36, 36, 0)
    assert sorted(r["id"] for r in read_captions(out)) == sorted(expected)


def test_a_job_killed_and_run_again_captions_each_image_once(ray_local, settings, tmp_path):
    """`loracap caption --engine ray` on shards (its own local Ray) killed with its whole process group
    after its first caption shard; the re-run captions the rest, and no Ray process of the killed job is
    left behind."""
    from loracap.scale.ray_engine import caption_with_ray

    shards = tmp_path / "shards"
    expected = write_tars(shards, SAMPLES)
    out = tmp_path / "out"
    owner = f"job-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({OWNER: owner, SLOW_FLAG: str(ray_local["flag"])})
    command = [sys.executable, "-m", "loracap", "caption", str(shards), "--engine", "ray", "--out", str(out)]
    command += ["--shard-rows", "2", "--model", settings["model"], "--style", "caption", "--device", "cpu"]
    command += ["--batch-size", "2", *GEN_ARGS]
    log = tmp_path / "job.log"
    ray_local["flag"].touch()
    try:
        with open(log, "wb") as sink:
            proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + 240
            while not (out.is_dir() and list(out.glob("part-*.parquet"))):
                assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no caption shard in 240 s"
                time.sleep(0.02)
            ours = own_processes(owner)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        ray_local["flag"].unlink()
    assert any("raylet" in c for c in ours.values()), "the job did not start its own Ray"

    # Ray's workers run in sessions of their own: killpg takes the job, its raylet and GCS, and the
    # workers exit once their raylet is gone.
    deadline = time.monotonic() + 60
    while own_processes(owner) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = own_processes(owner)
    for pid in left:  # clean up before failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes of the killed job left running: {left}"

    first = raw_rows(out)
    assert 0 < len(first) < len(expected)  # killed mid-job
    assert len({r["id"] for r in first}) == len(first) and {r["id"] for r in first} <= set(expected)

    again = caption_with_ray(shards, out=str(out), shard_rows=2, **settings)
    assert again.skipped == len(first)
    assert (again.total, again.captioned, again.failed) == (36, 36 - len(first), 0)
    counts = collections.Counter(r["id"] for r in raw_rows(out))
    assert counts == collections.Counter(set(expected))  # every image, each exactly once


# --- refusals ---------------------------------------------------------------------------------------------


def test_settings_that_cannot_work_are_refused_in_one_line_before_ray_starts(
    ray_local, settings, tmp_path, monkeypatch, capsys
):
    from loracap.scale import ray_engine

    def no_ray():
        raise AssertionError("Ray was started for settings that cannot work")

    monkeypatch.setattr(ray_engine, "_start_ray", no_ray)
    write_tars(tmp_path / "shards", [["a", "b"]])
    write_images(tmp_path / "folder", ["a.jpg"])
    model = ["--model", settings["model"], "--device", "cpu", *GEN_ARGS]
    capsys.readouterr()

    assert main(["caption", str(tmp_path / "shards"), "--engine", "ray", *model]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("loracap: error: ") and "webdataset data: give --out FOLDER" in line

    remote = ["--model", "openai:some-model", "--api-base", "http://127.0.0.1:9/v1", *GEN_ARGS]
    assert main(["caption", str(tmp_path / "folder"), "--engine", "ray", *remote]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "loracap: error: --engine ray runs the model in Ray actors; an openai: model runs on its server"
    )
    assert not list((tmp_path / "folder").glob("*.txt")) and not (tmp_path / "shards" / "out").exists()


def test_a_style_the_model_cannot_write_is_one_line_not_a_ray_traceback(
    ray_local, settings, tmp_path, capsys
):
    """The caption actor finds out (it loads the model); the user gets the local engine's one line."""
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    capsys.readouterr()
    args = ["caption", str(tmp_path), "--engine", "ray", "--model", settings["model"], "--style", "tags"]
    assert main([*args, "--device", "cpu", "--batch-size", "2", *GEN_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"loracap: error: {settings['model']} cannot write caption style 'tags'; it can write: caption, "
        "descriptive, detailed, more_detailed, straightforward, training-caption (chat models write any "
        "style)"
    )
    assert "Traceback" not in err and "ActorDiedError" not in err
    assert not list(tmp_path.glob("*.txt"))


def test_ray_vllm_on_a_cluster_without_gpus_is_one_line(ray_local, settings, tmp_path, capsys):
    """vLLM actors need GPUs: a CPU-only Ray cluster is refused before any actor starts."""
    write_images(tmp_path, ["a.jpg"])
    capsys.readouterr()
    assert (
        main(["caption", str(tmp_path), "--engine", "ray-vllm", "--model", settings["model"], "--quiet"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "loracap: error: --engine ray-vllm runs a vLLM actor per GPU, and this Ray cluster has no GPU; use "
        "--engine ray"
    )
    assert not list(tmp_path.glob("*.txt"))


# --- a two-node cluster (last: it replaces the module's local Ray) -------------------------------------


def test_a_two_node_cluster_writes_what_the_local_engine_writes(ray_local, settings, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from loracap.scale.ray_engine import caption_with_ray

    ray_dir = tmp_path / "ray"
    write_images(ray_dir, ["a.jpg", "b.png", "sub/c.webp"])
    (ray_dir / "a.txt").write_text("hand written caption", encoding="utf-8")
    local_dir = shutil.copytree(ray_dir, tmp_path / "local")
    options = {"trigger": "sks", "existing": "prepend"}
    local = caption_folder(local_dir, **settings, **options)
    assert (local.captioned, local.failed) == (3, 0)

    ray.shutdown()  # the module's local Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert ray.cluster_resources()["CPU"] == 2
        summary = caption_with_ray(ray_dir, **settings, **options)
        assert (summary.captioned, summary.failed) == (3, 0)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert caption_files(ray_dir) == caption_files(local_dir)
    assert sorted(caption_files(ray_dir)) == ["a.txt", "b.txt", "sub/c.txt"]
