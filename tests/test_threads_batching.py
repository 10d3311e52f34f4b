"""Torch threads from the CPUs a process may use, and the batch size from free memory (issue 14).

The cgroup and /proc readers are given fake files; the runs use a real tiny Florence-2, with memory
readings faked where the test needs them to be known, and out-of-memory injected around the real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import write_images
from PIL import Image

import loracap
from loracap.backends import batch_size as batch_module
from loracap.backends import resources
from loracap.backends.batch_size import AUTO_CAP, PROBE_IMAGES, is_out_of_memory, parse_batch_size
from loracap.backends.resources import available_cpus, available_memory, choose_threads, cpu_quota
from loracap.cli import main

GENERATION = loracap.GenerationSettings(min_new_tokens=2, max_new_tokens=6)
GIB = 2**30


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Runs here set torch's process-wide thread count: give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


# ------------------------------------------------------------------------------------- CPUs and memory


def test_cgroup_v2_cpu_quota_is_read_down_to_the_process_cgroup(tmp_path, eight_cpus):
    proc = _files(tmp_path, {"proc-cgroup": "0::/\n"}) / "proc-cgroup"
    root = tmp_path / "cg"
    _files(root, {"cpu.max": "max 100000\n"})
    assert cpu_quota(root, proc) is None and available_cpus(root, proc) == 8
    _files(root, {"cpu.max": "150000 100000\n"})  # docker --cpus 1.5: rounded up
    assert cpu_quota(root, proc) == 1.5 and available_cpus(root, proc) == 2

    # Without a cgroup namespace the process's own cgroup is a folder further down: the tightest counts.
    nested = _files(tmp_path, {"nested": "0::/kubepods/pod1\n"}) / "nested"
    _files(root, {"cpu.max": "max 100000", "kubepods/cpu.max": "400000 100000"})
    _files(root, {"kubepods/pod1/cpu.max": "300000 100000"})
    assert available_cpus(root, nested) == 3


def test_cgroup_v1_cpu_quota_and_the_affinity_mask(tmp_path, monkeypatch, eight_cpus):
    proc = _files(tmp_path, {"proc-cgroup": "3:cpu,cpuacct:/\n1:memory:/\n"}) / "proc-cgroup"
    root = tmp_path / "cg"
    _files(root, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert available_cpus(root, proc) == 8  # -1: no quota
    _files(root, {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n"})
    assert available_cpus(root, proc) == 1  # half a CPU is still one
    _files(root, {"cpu,cpuacct/cpu.cfs_quota_us": "600000\n"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)  # taskset -c 0-2
    assert available_cpus(root, proc) == 3
    assert available_cpus(tmp_path / "no-cgroups", tmp_path / "missing") == 3


def test_free_memory_is_meminfo_cut_to_the_cgroup_limit(tmp_path):
    meminfo = _files(tmp_path, {"meminfo": "MemTotal: 64000000 kB\nMemAvailable: 8388608 kB\n"}) / "meminfo"
    proc = _files(tmp_path, {"proc-cgroup": "0::/\n"}) / "proc-cgroup"
    root = tmp_path / "cg"
    assert available_memory(root, proc, meminfo) == 8 * GIB  # no cgroup files: MemAvailable
    _files(root, {"memory.max": "max\n", "memory.current": str(GIB)})
    assert available_memory(root, proc, meminfo) == 8 * GIB
    # A 3 GiB limit with 2.5 GiB used, 1 GiB of it file cache the kernel would drop first: 1.5 GiB left.
    _files(root, {"memory.max": str(3 * GIB), "memory.current": str(5 * GIB // 2)})
    _files(root, {"memory.stat": f"anon 1000\ninactive_file {GIB}\n"})
    assert available_memory(root, proc, meminfo) == 3 * GIB // 2

    v1 = tmp_path / "v1"
    proc_v1 = _files(tmp_path, {"proc-v1": "4:memory:/docker/abc\n"}) / "proc-v1"
    _files(v1, {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "5"})
    _files(v1, {"memory/docker/abc/memory.limit_in_bytes": str(2 * GIB)})
    _files(v1, {"memory/docker/abc/memory.usage_in_bytes": str(GIB)})
    assert available_memory(v1, proc_v1, meminfo) == GIB
    assert available_memory(v1, proc_v1, tmp_path / "no-meminfo") == GIB
    assert available_memory(tmp_path / "none", proc, tmp_path / "no-meminfo") is None


def test_threads_leave_the_decode_workers_their_cores_on_a_cpu():
    assert choose_threads(8, 2, "cpu") == 6
    assert choose_threads(2, 2, "cpu") == 1  # issue 14's box: torch's default 2 was the slowest
    assert choose_threads(1, 4, "cpu") == 1
    assert choose_threads(8, 0, "cpu") == 7  # the decode pool runs one thread at least
    assert choose_threads(32, 2, "cuda") == 4  # the CPU only feeds the GPU
    assert choose_threads(2, 2, "cuda") == 1


# ----------------------------------------------------------------------------------- runs set threads


def test_a_run_sets_the_thread_count_asked_or_chosen(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data = tmp_path / "data"
    write_images(data, ["a.jpg", "b.jpg"])
    model = str(tiny_model("florence2"))

    torch.set_num_threads(2)
    loracap.caption_folder(data, model=model, threads=1, generation=GENERATION, progress=False)
    assert torch.get_num_threads() == 1
    assert "using 1 torch threads of" in capsys.readouterr().err

    monkeypatch.setattr(resources, "available_cpus", lambda *a, **k: 5)
    torch.set_num_threads(1)
    summary = loracap.caption_folder(
        data, model=model, existing="overwrite", workers=2, generation=GENERATION, progress=False
    )
    assert summary.captioned == 2 and torch.get_num_threads() == 3  # 5 CPUs less 2 decode threads
    assert "using 3 torch threads of 5 available CPUs" in capsys.readouterr().err

    # OMP_NUM_THREADS is the user's choice too: torch read it at start-up, and it is kept.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    loracap.caption_folder(data, model=model, existing="overwrite", generation=GENERATION, progress=False)
    assert torch.get_num_threads() == 1
    assert "from OMP_NUM_THREADS" in capsys.readouterr().err


def test_threads_and_batch_size_flags_reach_the_run(tmp_path, tiny_model, monkeypatch):
    import loracap.pipeline

    seen = []
    monkeypatch.setattr(loracap.pipeline, "caption_folder", lambda config: seen.append(config) or _ok())
    data = tmp_path / "data"
    data.mkdir()
    assert main(["caption", str(data), "--threads", "3", "--batch-size", "auto"]) == 0
    assert main(["caption", str(data), "--batch-size", "12"]) == 0
    assert main(["caption", str(data)]) == 0
    config_file = _files(tmp_path, {"run.toml": 'batch_size = "auto"\nthreads = 2\n'}) / "run.toml"
    assert main(["caption", str(data), "--config", str(config_file)]) == 0
    assert [(c.threads, c.batch_size) for c in seen] == [(3, "auto"), (None, 12), (None, "auto"), (2, "auto")]
    for bad in (["--batch-size", "0"], ["--batch-size", "many"], ["--threads", "two"]):
        with pytest.raises(SystemExit) as exit:
            main(["caption", str(data), *bad])
        assert exit.value.code == 2

    # The flag reaches torch in a real run.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="threads must be"):
        loracap.caption_folder(data, threads=0)
    write_images(data, ["a.jpg"])
    torch.set_num_threads(2)
    args = ["--threads", "1", "--min-new-tokens", "2", "--max-new-tokens", "6", "--quiet"]
    assert main(["caption", str(data), "--model", str(tiny_model("florence2")), *args]) == 0
    assert torch.get_num_threads() == 1


def test_report_threads_reach_clip_scoring(tmp_path, tiny_model):
    data = tmp_path / "data"
    write_images(data, ["a.jpg"])
    (data / "a.txt").write_text("a photo")
    torch.set_num_threads(2)
    loracap.report(
        data, clip_model=str(tiny_model("clip")), images=False, cache=False, threads=1, progress=False
    )
    assert torch.get_num_threads() == 1


def _ok():
    return loracap.RunSummary()


# --------------------------------------------------------------------------------------- batch size


def test_batch_size_settings_parse():
    assert (
        parse_batch_size(None) is None
        and parse_batch_size("auto") is None
        and parse_batch_size("Auto") is None
    )
    assert parse_batch_size(8) == 8 and parse_batch_size("16") == 16
    for bad in (0, -1, "0", "many", 2.5, True):
        with pytest.raises(ValueError, match="batch size"):
            parse_batch_size(bad)


def test_out_of_memory_is_told_from_other_failures():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    cpu = "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: you tried to allocate"
    assert is_out_of_memory(RuntimeError(cpu))
    assert not is_out_of_memory(RuntimeError("device-side assert triggered"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not what torch raises


class _Recording:
    """A real loaded backend that records the size of each batch it is asked to caption, and fails like a
    model would: out of memory on a batch larger than `fits` (`oom` is what it raises), and on any batch
    holding a magenta image (a real per-image failure)."""

    def __init__(self, backend, fits=10**6, oom=torch.OutOfMemoryError):
        self.backend, self.fits, self.oom = backend, fits, oom
        self.sizes: list[int] = []
        self.out_of_memory = 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def prepare(self, images, mode, prompt=None):
        poisoned = any(im.getpixel((0, 0)) == (255, 0, 255) for im in images)
        return self.backend.prepare(images, mode, prompt), len(images), poisoned

    def generate(self, inputs, settings):
        prepared, size, poisoned = inputs
        if size > self.fits:
            self.out_of_memory += 1
            raise self.oom("not enough memory: you tried to allocate 123456789 bytes")
        if poisoned:
            raise RuntimeError("device-side assert triggered")
        self.sizes.append(size)
        return self.backend.generate(prepared, settings)


def _one_by_one(data: Path, backend, tmp_path: Path) -> dict[str, str]:
    """The captions of `data` captioned one image at a time, into a copy."""
    import shutil

    alone = shutil.copytree(data, tmp_path / "alone")
    loracap.caption_folder(
        alone, backend=backend, batch_size=1, existing="overwrite", generation=GENERATION, progress=False
    )
    return _captions(alone)


def _captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


@pytest.fixture
def fake_memory(monkeypatch, tmp_path):
    """Memory readings the test sets: `free` bytes free; a batch grows the peak RSS by `per_image` an
    image. What the model really allocates on this machine would make the choice vary from run to run."""
    readings = {"free": 0, "per_image": 0, "batch": 0}
    rss = GIB

    def status(key):
        if key == "VmRSS":
            return rss
        if key == "VmHWM":
            return rss + readings["per_image"] * readings["batch"]
        return 0  # RssFile

    clear_refs = tmp_path / "clear_refs"
    clear_refs.touch()
    monkeypatch.setattr(batch_module, "_CLEAR_REFS", clear_refs)  # Linux's peak reset, wherever this runs
    monkeypatch.setattr(batch_module, "_status", status)
    monkeypatch.setattr(batch_module, "available_memory", lambda: readings["free"])
    return readings


def _sized(backend: _Recording, readings: dict) -> _Recording:
    """Tell the fake memory readings how large the batch now running is."""
    generate = backend.generate

    def measured(inputs, settings):
        readings["batch"] = inputs[1]
        return generate(inputs, settings)

    backend.generate = measured
    return backend


def test_auto_batch_size_follows_free_memory(tmp_path, tiny_model, fake_memory, capsys):
    from loracap.backends import load_backend

    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_images(data, [f"{i:02d}.jpg" for i in range(14)])
    real = load_backend(str(tiny_model("florence2")), device="cpu")
    fake_memory["per_image"] = 100 * 2**20  # 100 MB an image

    fake_memory["free"] = GIB  # half of it for batches: 512 MB, 5 images (and their decoded inputs)
    small = _sized(_Recording(real), fake_memory)
    loracap.caption_folder(data, backend=small, generation=GENERATION, progress=False)
    assert small.sizes[0] == PROBE_IMAGES and 1 < max(small.sizes[1:]) <= 5, small.sizes
    assert sum(small.sizes) == 14
    err = capsys.readouterr().err
    assert f"batch size {max(small.sizes[1:])} (auto:" in err and "MB an image" in err

    fake_memory["free"] = 8 * GIB  # room for every image left
    large = _sized(_Recording(real), fake_memory)
    loracap.caption_folder(data, backend=large, existing="overwrite", generation=GENERATION, progress=False)
    assert large.sizes == [PROBE_IMAGES, 12]

    fake_memory["free"], fake_memory["per_image"] = 1000 * GIB, 1  # a tiny model: at most AUTO_CAP
    capped = _sized(_Recording(real), fake_memory)
    loracap.caption_folder(data, backend=capped, existing="overwrite", generation=GENERATION, progress=False)
    assert f"batch size {AUTO_CAP} (auto:" in capsys.readouterr().err

    batched = _captions(data)
    assert len(batched) == 14 and batched == _one_by_one(data, real, tmp_path)


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_halves_the_batch_for_the_rest_of_the_run(tmp_path, tiny_model, capsys, oom):
    from loracap.backends import load_backend

    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_images(data, [f"{i:02d}.jpg" for i in range(20)])
    Image.new("RGB", (48, 40), (255, 0, 255)).save(data / "10-odd.png")  # the model fails on this one
    real = load_backend(str(tiny_model("florence2")), device="cpu")
    backend = _Recording(real, fits=3, oom=oom)
    summary = loracap.caption_folder(
        data, backend=backend, batch_size=8, workers=1, generation=GENERATION, progress=False
    )

    # 8 ran out, then 4; from then on 2 at a time, also for the batches of 8 decoded before the first
    # failure; without the size kept, every batch of 8 would run out again.
    assert backend.out_of_memory == 2 and max(backend.sizes) == 2
    assert (summary.captioned, summary.failed) == (20, 1)
    assert [e.path for e in summary.errors] == ["10-odd.png"]  # a real per-image failure stays its own
    err = capsys.readouterr().err
    assert "out of memory on a batch of 8 images: batch size 4 from here on" in err
    assert "out of memory on a batch of 4 images: batch size 2 from here on" in err

    (data / "10-odd.png").unlink()
    batched = _captions(data)
    assert len(batched) == 20 and batched == _one_by_one(data, real, tmp_path)


def test_an_auto_size_stays_below_one_that_ran_out_of_memory(tmp_path, tiny_model, fake_memory, capsys):
    from loracap.backends import load_backend

    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_images(data, [f"{i:02d}.jpg" for i in range(9)])
    fake_memory["free"], fake_memory["per_image"] = 8 * GIB, 2**20
    # Even the probe of 2 runs out: it is halved to 1, and the memory measured does not lift it again.
    backend = _sized(
        _Recording(load_backend(str(tiny_model("florence2")), device="cpu"), fits=1), fake_memory
    )
    summary = loracap.caption_folder(data, backend=backend, generation=GENERATION, progress=False)
    assert summary.captioned == 9 and backend.sizes == [1] * 9 and backend.out_of_memory == 1
    assert "batch size 1 (auto:" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["florence2", "blip", "vit-gpt2"])
def test_an_auto_sized_run_captions_as_one_image_at_a_time(tmp_path, tiny_model, arch):
    from loracap.backends import load_backend

    torch.set_num_threads(1)
    data = tmp_path / "data"
    write_images(data, [f"{i:02d}.jpg" for i in range(7)], size=(64, 48))
    backend = _Recording(load_backend(str(tiny_model(arch)), device="cpu"))
    loracap.caption_folder(data, backend=backend, generation=GENERATION, progress=False)
    assert backend.sizes[0] == PROBE_IMAGES and len(backend.sizes) > 1  # the first batch, then the rest
    batched = _captions(data)
    assert len(batched) == 7 and batched == _one_by_one(data, backend.backend, tmp_path)
