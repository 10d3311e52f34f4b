"""loracap.quality.images: duplicates, size checks and the kohya bucket preview, on generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageEnhance

from loracap.dataset.buckets import BucketSettings, make_bucket_resolutions, select_bucket
from loracap.quality.images import (
    ImageInfo,
    aspect_histogram,
    bucket_preview,
    default_threshold,
    find_duplicate_groups,
    image_report,
    resolution_histogram,
)
from loracap.quality.unionfind import UnionFind

pytest.importorskip("imagehash")


def _picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A structured image that phash tells apart: smooth random colour field, shapes, light noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    w, h = size
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 3)), y0 + int(rng.integers(h // 8, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def _groups(report) -> set[frozenset[str]]:
    return {frozenset(p.name for p in g.paths) for g in report.duplicate_groups}


def _info(name: str, bits: list[int], size=(64, 64), sha: str | None = None) -> ImageInfo:
    phash = np.zeros(64, dtype=bool)
    phash[bits] = True
    return ImageInfo(Path(name), size[0], size[1], sha or name, phash)


# --- duplicates -------------------------------------------------------------------------------------


def test_planted_near_duplicates_grouped_distinct_images_not(tmp_path: Path):
    original = _picture(1)
    paths = [_save(original, tmp_path / "orig.png")]
    small = original.resize((200, 150), Image.Resampling.LANCZOS)
    paths.append(_save(small, tmp_path / "orig_small.jpg", quality=60))
    paths.append(_save(ImageEnhance.Brightness(original).enhance(1.12), tmp_path / "orig_bright.png"))
    paths += [_save(_picture(seed), tmp_path / f"other{seed}.png") for seed in range(2, 8)]

    report = image_report(paths, min_side=1, workers=2)

    assert report.errors == []
    assert _groups(report) == {frozenset({"orig.png", "orig_small.jpg", "orig_bright.png"})}
    (group,) = report.duplicate_groups
    assert not group.exact
    assert group.max_distance <= default_threshold(8)
    assert group.keep.name in ("orig.png", "orig_bright.png")  # the full-size copies, not the shrunken one


def test_exact_byte_copies_are_a_group(tmp_path: Path):
    a = _save(_picture(11), tmp_path / "a.png")
    b = tmp_path / "sub" / "b.png"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    c = _save(_picture(12), tmp_path / "c.png")

    # threshold 0 still groups exact copies; the digest alone would too.
    report = image_report([a, b, c], min_side=1, threshold=0)

    assert _groups(report) == {frozenset({"a.png", "b.png"})}
    assert report.duplicate_groups[0].exact
    assert report.duplicate_groups[0].max_distance == 0


def test_exact_digest_groups_even_when_hashes_differ():
    infos = [_info("a", [], sha="same"), _info("b", list(range(32)), sha="same"), _info("c", list(range(40)))]
    (group,) = find_duplicate_groups(infos, threshold=2)
    assert [p.name for p in group.paths] == ["a", "b"]
    assert group.exact and group.max_distance == 32


def test_grouping_is_transitive():
    # a~b (5 bits), b~c (5 bits), a/c 10 bits apart: still one group; d is far from all.
    infos = [
        _info("a", []),
        _info("d", list(range(20, 60))),
        _info("b", [0, 1, 2, 3, 4]),
        _info("c", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ]
    (group,) = find_duplicate_groups(infos, threshold=6)
    assert [p.name for p in group.paths] == ["a", "b", "c"]
    assert group.max_distance == 10
    assert not group.exact
    assert find_duplicate_groups(infos, threshold=4) == []


def brute_force_groups(infos: list[ImageInfo], threshold: int) -> list[tuple]:
    """find_duplicate_groups by definition: every pair's Hamming distance, union-find, then each group's
    members, exactness, largest distance and the file to keep."""
    uf = UnionFind(len(infos))
    for a in range(len(infos)):
        for b in range(a + 1, len(infos)):
            distance = int(np.count_nonzero(infos[a].phash != infos[b].phash))
            if distance <= threshold or infos[a].sha256 == infos[b].sha256:
                uf.union(a, b)
    groups = []
    for members in uf.groups().values():
        if len(members) > 1:
            worst = max(
                int(np.count_nonzero(infos[a].phash != infos[b].phash)) for a in members for b in members
            )
            keep = max(members, key=lambda k: (infos[k].width * infos[k].height, -k))
            digests = {infos[k].sha256 for k in members}
            groups.append((tuple(infos[k].path for k in members), len(digests) == 1, worst, infos[keep].path))
    return groups


@st.composite
def _clustered_hashes(draw):
    """Hashes of one size, drawn around a few centres so that many pairs fall near any threshold, with
    repeated hashes and repeated digests."""
    side = draw(st.sampled_from([2, 3, 4, 5, 8, 16]))
    bits = side * side
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 40))
    centres = rng.integers(0, 2, size=(max(1, n // 5), bits)).astype(bool)
    infos = []
    for i in range(n):
        phash = centres[rng.integers(len(centres))].copy()
        phash[rng.integers(0, bits, size=int(rng.integers(0, bits // 4 + 2)))] ^= True
        sha = f"d{rng.integers(0, n)}" if rng.random() < 0.2 else f"u{i}"
        infos.append(ImageInfo(Path(f"{i}.png"), int(rng.integers(1, 4)), 1, sha, phash))
    threshold = draw(st.integers(0, bits))
    return infos, threshold


@settings(max_examples=300, deadline=None)
@given(_clustered_hashes())
def test_duplicate_groups_equal_comparing_every_pair(case):
    infos, threshold = case
    found = find_duplicate_groups(infos, threshold)
    assert [(g.paths, g.exact, g.max_distance, g.keep) for g in found] == brute_force_groups(infos, threshold)


def test_duplicate_groups_without_numpy_bitwise_count(monkeypatch):
    # numpy < 2 has no bitwise_count: the byte table gives the same distances.
    rng = np.random.default_rng(3)
    infos = [
        _info(f"{i}", list(rng.choice(64, size=int(rng.integers(0, 12)), replace=False))) for i in range(60)
    ]
    expected = brute_force_groups(infos, 6)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    found = find_duplicate_groups(infos, 6)
    assert [(g.paths, g.exact, g.max_distance, g.keep) for g in found] == expected
    assert expected  # hashes with few bits set: some pairs are close


def test_transitive_chain_of_real_edits(tmp_path: Path):
    # Blends a -> b in small steps: neighbours are near-duplicates, the ends are not.
    a, b = _picture(21), _picture(22)
    steps = [Image.blend(a, b, t) for t in np.linspace(0, 1, 25)]
    paths = [_save(im, tmp_path / f"step{k}.png") for k, im in enumerate(steps)]
    report = image_report(paths, min_side=1)
    infos = report.images
    ends = int(np.count_nonzero(infos[0].phash != infos[-1].phash))
    assert ends > default_threshold(8)
    assert _groups(report) == {frozenset(p.name for p in paths)}


def test_exif_rotated_copy_is_grouped_and_sized_upright(tmp_path: Path):
    original = _picture(31, size=(320, 240))
    orig = _save(original, tmp_path / "orig.jpg", quality=92)
    # Pixels stored rotated 90 degrees counter-clockwise, with EXIF orientation 6 ("rotate 90 CW to view").
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = original.transpose(Image.Transpose.ROTATE_90)
    rotated = _save(stored, tmp_path / "rotated_exif.jpg", quality=92, exif=exif)
    raw = _save(stored, tmp_path / "rotated_no_exif.jpg", quality=92)  # really shows sideways

    report = image_report([orig, rotated, raw], min_side=1)

    assert _groups(report) == {frozenset({"orig.jpg", "rotated_exif.jpg"})}
    sizes = {i.path.name: (i.width, i.height) for i in report.images}
    assert sizes == {
        "orig.jpg": (320, 240),
        "rotated_exif.jpg": (320, 240),
        "rotated_no_exif.jpg": (240, 320),
    }


def test_hash_size_changes_bits_and_threshold(tmp_path: Path):
    paths = [_save(_picture(s), tmp_path / f"{s}.png") for s in (41, 42)]
    report = image_report(paths, min_side=1, hash_size=16)
    assert all(i.phash.size == 256 for i in report.images)
    assert default_threshold(16) == 24
    assert report.duplicate_groups == []
    with pytest.raises(ValueError, match="threshold"):
        image_report(paths, threshold=65)


# --- sizes ------------------------------------------------------------------------------------------


def test_small_images_flagged_per_preset(tmp_path: Path):
    paths = [
        _save(_picture(51, (600, 400)), tmp_path / "tiny.jpg"),  # short 400
        _save(_picture(52, (600, 800)), tmp_path / "mid.jpg"),  # short 600
        _save(_picture(53, (1536, 1024)), tmp_path / "big.jpg"),  # short 1024
    ]
    small = {p: {s.path.name for s in image_report(paths, min_side=p).small_images} for p in ("sd15", "sdxl")}
    assert small == {"sd15": {"tiny.jpg"}, "sdxl": {"tiny.jpg", "mid.jpg"}}
    assert {s.path.name for s in image_report(paths, min_side="flux").small_images} == small["sdxl"]
    assert {s.path.name for s in image_report(paths, min_side=601).small_images} == {"tiny.jpg", "mid.jpg"}
    with pytest.raises(ValueError, match="unknown preset"):
        image_report(paths, min_side="sd3")


def test_histograms():
    sizes = [(300, 200), (512, 512), (1024, 768), (1536, 1024), (5000, 4000), (720, 1280), (1920, 1080)]
    res = {b.label: b.count for b in resolution_histogram(sizes)}
    assert res == {
        "<256": 1,
        "256-511": 0,
        "512-767": 2,
        "768-1023": 1,
        "1024-1535": 2,
        "1536-2047": 0,
        "2048-3071": 0,
        "3072-4095": 1,
        ">=4096": 0,
    }
    aspect = {b.label: b.count for b in aspect_histogram(sizes)}
    assert aspect == {
        "9:21": 0,
        "9:16": 1,
        "2:3": 0,
        "3:4": 0,
        "1:1": 1,
        "4:3": 2,  # 1024x768 and 5000x4000 (1.25)
        "3:2": 2,
        "16:9": 1,
        "21:9": 0,
    }
    assert sum(b.count for b in aspect_histogram(sizes)) == len(sizes)


# --- buckets ----------------------------------------------------------------------------------------


def test_bucket_resolutions_sdxl():
    resos = make_bucket_resolutions(BucketSettings(resolution=1024))
    assert (1024, 1024) in resos
    for w, h in resos:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 2048 and 256 <= h <= 2048
        assert w * h <= 1024 * 1024
        assert (h, w) in resos
    # SD1.5 at 512: square 512, nothing over 512^2.
    sd15 = make_bucket_resolutions(BucketSettings(resolution=512, max_bucket_reso=1024))
    assert (512, 512) in sd15 and max(w * h for w, h in sd15) <= 512 * 512


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1024, 1024), (1024, 1024)),
        ((3000, 3000), (1024, 1024)),
        ((1536, 1024), (1216, 832)),
        ((1024, 1536), (832, 1216)),
        ((1920, 1080), (1344, 768)),
    ],
)
def test_select_bucket_known_sizes(size, bucket):
    settings = BucketSettings()
    got, resized = select_bucket(*size, settings)
    assert got == bucket
    # The resized image covers the bucket in both sides (it is centre-cropped to it afterwards).
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert min(resized[0] - bucket[0], resized[1] - bucket[1]) <= 1


def test_select_bucket_no_upscale():
    settings = BucketSettings(no_upscale=True)
    assert select_bucket(1536, 1024, settings) == ((1216, 832), (1248, 832))
    assert select_bucket(600, 400, settings) == ((576, 384), (600, 400))  # never enlarged


def test_bucket_counts_and_single_buckets(tmp_path: Path):
    paths = [
        _save(_picture(61, (1024, 1024)), tmp_path / "sq1.jpg"),
        _save(_picture(62, (2048, 2048)), tmp_path / "sq2.jpg"),
        _save(_picture(63, (1536, 1024)), tmp_path / "land.jpg"),
        _save(_picture(64, (1024, 1536)), tmp_path / "port.jpg"),
    ]
    report = image_report(paths)
    counts = {(b.width, b.height): b.count for b in report.buckets}
    assert counts == {(1024, 1024): 2, (1216, 832): 1, (832, 1216): 1}
    assert (report.buckets[0].width, report.buckets[0].height) == (1024, 1024)  # most populated first
    assert {b.paths[0].name for b in report.single_image_buckets} == {"land.jpg", "port.jpg"}
    assignment = {a.path.name: a for a in report.assignments}
    assert assignment["land.jpg"].bucket == (1216, 832)
    assert assignment["sq1.jpg"].aspect_error == 0
    # Other kohya settings (SD 1.5 at 512): the same files land in that run's buckets.
    settings = BucketSettings(resolution=512, max_bucket_reso=1024)
    other = image_report(paths, buckets=settings)
    assert other.bucket_settings is settings
    assert {(b.width, b.height): b.count for b in other.buckets}[(512, 512)] == 2


def test_bucket_preview_on_infos_only():
    infos = [_info(f"i{k}", [k], size=(1920, 1080)) for k in range(3)]
    assignments, buckets = bucket_preview(infos, BucketSettings(resolution=512, max_bucket_reso=1024))
    assert len(assignments) == 3
    (bucket,) = buckets
    assert bucket.count == 3 and not bucket.single
    assert bucket.width * bucket.height <= 512 * 512 and bucket.width > bucket.height


def test_bad_bucket_settings():
    with pytest.raises(ValueError):
        BucketSettings(resolution=4096, max_bucket_reso=2048)
    with pytest.raises(ValueError):
        BucketSettings(bucket_reso_steps=0)


# --- bad files --------------------------------------------------------------------------------------


def test_bad_files_are_per_file_errors(tmp_path: Path):
    good = write_images(tmp_path, ["a.png", "b.jpg"], size=(96, 64))
    whole = _save(_picture(71), tmp_path / "whole.jpg", quality=90)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"

    report = image_report([*good, truncated, empty, whole, missing], min_side=1)

    reasons = {e.path.name: e.reason for e in report.errors}
    assert set(reasons) == {"truncated.jpg", "empty.png", "missing.png"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["missing.png"] == "file not found"
    assert [i.path.name for i in report.images] == ["a.png", "b.jpg", "whole.jpg"]
    assert sum(b.count for b in report.buckets) == 3
    assert sum(b.count for b in report.resolution_histogram) == 3


def test_empty_input():
    report = image_report([])
    assert report.images == report.errors == report.duplicate_groups == report.buckets == []
    assert all(b.count == 0 for b in report.aspect_histogram)
