"""loracap.inputs: finding image files and decoding them to RGB. Every fixture is generated here."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from loracap.inputs import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    file_sha256,
    find_images,
    load_image,
    load_image_bytes,
    read_size,
    register_optional_formats,
    remove_stale_temp_files,
    supported_extensions,
    to_rgb,
)

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)


def _close(actual, expected, tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _jpeg_bytes(size=(64, 48), color=RED) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- discovery --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in [
        "b.jpg",
        "A.JPG",
        "c.Png",
        "d.webp",
        "notes.txt",
        "b.txt",
        ".hidden.jpg",
        "sub/e.jpeg",
        "sub/deeper/f.TIFF",
        ".thumbs/g.jpg",
        "__MACOSX/._b.jpg",
        "__MACOSX/h.jpg",
    ]:
        _touch(tmp_path / rel)
    return tmp_path


def test_find_images_recursive_sorted_and_filtered(tree: Path) -> None:
    found = find_images(tree)
    assert all(p.is_absolute() for p in found)
    assert [p.relative_to(tree).as_posix() for p in found] == [
        "A.JPG",
        "b.jpg",
        "c.Png",
        "d.webp",
        "sub/deeper/f.TIFF",
        "sub/e.jpeg",
    ]
    assert find_images(str(tree)) == found  # str accepted, order stable across calls


def test_find_images_non_recursive(tree: Path) -> None:
    names = [p.name for p in find_images(tree, recursive=False)]
    assert names == ["A.JPG", "b.jpg", "c.Png", "d.webp"]


def test_find_images_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _touch(outside / "real.png")
    root = tmp_path / "root"
    root.mkdir()
    try:
        (root / "linked.png").symlink_to(outside / "real.png")
        (root / "linkdir").symlink_to(outside, target_is_directory=True)
        (root / "loop").symlink_to(root, target_is_directory=True)
        (root / "broken.png").symlink_to(tmp_path / "nowhere.png")
        (root / "circular.png").symlink_to(root / "circular.png")
        (root / "folder.png").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not supported here")
    # The file link is followed (and keeps its own path); folder links are folders, never entered. Broken
    # and looping links with an image's name are listed, so they are reported instead of vanishing.
    assert find_images(root) == [root / "broken.png", root / "circular.png", root / "linked.png"]
    _assert_decode_error(root / "broken.png", "broken symbolic link")
    _assert_decode_error(root / "circular.png", "symbolic link loop")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_named_like_an_image_is_reported_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer: forever
    assert find_images(tmp_path) == [tmp_path / "pipe.png"]
    _assert_decode_error(tmp_path / "pipe.png", "FIFO")
    with pytest.raises(OSError, match="FIFO"):
        file_sha256(tmp_path / "pipe.png")


def test_find_images_bad_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images(tmp_path / "missing")
    file = _touch(tmp_path / "a.jpg")
    with pytest.raises(NotADirectoryError, match="a.jpg"):
        find_images(file)


def test_supported_extensions() -> None:
    exts = supported_extensions()
    assert exts >= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in exts)
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        assert ".heic" not in exts
    else:
        assert {".heic", ".heif"} <= exts
    assert (".avif" in exts) == bool(features.check("avif"))


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    stale = [_touch(tmp_path / ".loracap-abc.tmp"), _touch(tmp_path / "sub" / ".loracap-x1.tmp")]
    kept = [
        _touch(tmp_path / ".hidden.txt"),
        _touch(tmp_path / "x.tmp"),
        _touch(tmp_path / "loracap-abc.tmp"),
        _touch(tmp_path / ".loracap-abc.txt"),
        _touch(tmp_path / "a.jpg"),
    ]
    assert remove_stale_temp_files(tmp_path, recursive=False) == 1
    assert not stale[0].exists() and stale[1].exists()
    assert remove_stale_temp_files(tmp_path, recursive=True) == 1
    assert not stale[1].exists()
    assert all(p.exists() for p in kept)
    assert remove_stale_temp_files(tmp_path) == 0


def test_file_sha256(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 123)  # more than one read chunk
    path = _touch(tmp_path / "a.bin", data)
    assert file_sha256(path) == file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert file_sha256(_touch(tmp_path / "empty.bin", b"")) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "gone.bin")


# --- decoding: orientation, modes, formats ----------------------------------------------------------


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    # Stored 80x40 landscape with coloured left/right halves, tagged "rotate 90 CW to display".
    stored = Image.new("RGB", (80, 40), RED)
    stored.paste(BLUE, (40, 0, 80, 40))
    stored.paste(WHITE, (0, 30, 10, 40))  # stored bottom-left marker
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())

    assert read_size(path) == (40, 80)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (40, 80)
    # Rotating 90 CW moves stored left (red) to the top, stored right (blue) to the bottom, and the
    # stored bottom-left corner to the top-left.
    assert _close(im.getpixel((35, 5)), RED)
    assert _close(im.getpixel((20, 75)), BLUE)
    assert _close(im.getpixel((2, 2)), WHITE)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations(tmp_path: Path, orientation: int) -> None:
    upright = Image.new("RGB", (40, 20), (0, 0, 0))
    upright.paste(RED, (0, 0, 10, 5))
    upright.paste(GREEN, (30, 0, 40, 5))
    upright.paste(BLUE, (0, 15, 10, 20))
    # Store the inverse of what the tag asks a viewer to do, so the displayed image is `upright`.
    T = Image.Transpose
    inverse = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
               6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}  # fmt: skip
    stored = upright.transpose(inverse[orientation]) if orientation in inverse else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"  # lossless, so pixels compare exactly
    stored.save(path, exif=exif.tobytes())

    im = load_image(path)
    assert read_size(path) == im.size == (40, 20)
    assert np.array_equal(np.asarray(im), np.asarray(upright))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)
    im = load_image(path)
    assert im.mode == "RGB" and _close(im.getpixel((16, 16)), RED)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    im = load_image(path)
    assert im.mode == "RGB"
    assert im.getpixel((4, 4)) == (128, 128, 128)
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 0)) == (255, 255, 255)


def test_float_tiff_scaled_by_range(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(path)
    im = load_image(path)
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([*RED, *GREEN] + [0] * 762)
    pal.paste(1, (5, 0, 10, 10))
    for name in ("p.png", "p.gif"):
        pal.save(tmp_path / name, transparency=1)
        im = load_image(tmp_path / name)
        assert im.mode == "RGB"
        assert im.getpixel((1, 1)) == RED
        assert im.getpixel((8, 1)) == GREY  # the transparent index shows the background, not green


def test_rgba_and_la_alpha_flattened_on_grey(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 255, 0), (255, 255, 255, 0), (255, 0, 0, 255), (255, 255, 255, 128)])
    rgba.save(tmp_path / "rgba.png")
    im = load_image(tmp_path / "rgba.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == GREY and im.getpixel((1, 0)) == GREY  # fully transparent
    assert im.getpixel((2, 0)) == RED  # opaque untouched
    assert _close(im.getpixel((3, 0)), (192, 192, 192), tol=1)  # half white over grey

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (200, 255)])
    la.save(tmp_path / "la.png")
    im = load_image(tmp_path / "la.png")
    assert im.getpixel((0, 0)) == GREY and im.getpixel((1, 0)) == (200, 200, 200)


@pytest.mark.parametrize("mode", ["L", "1", "P", "I"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"m.{'tif' if mode == 'I' else 'png'}"
    Image.new("RGB", (8, 8), (90, 90, 90)).convert(mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (8, 8)


def test_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGBA", (6, 4), (*GREEN, 255)).save(path, format="PNG")
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (6, 4) and im.getpixel((0, 0)) == GREEN


def test_animated_files_give_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    for name, extra in [("a.gif", {}), ("a.png", {}), ("a.webp", {"lossless": True}), ("a.tif", {})]:
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **extra)
        assert load_image(tmp_path / name).getpixel((5, 5)) == RED, name


def test_heic_and_avif(tmp_path: Path) -> None:
    register_optional_formats()
    register_optional_formats()  # idempotent
    saved = []
    for fmt, name in [("HEIF", "photo.heic"), ("AVIF", "photo.avif")]:
        try:
            Image.new("RGB", (64, 32), RED).save(tmp_path / name, format=fmt, quality=90)
        except (KeyError, OSError, ValueError):
            continue  # no encoder for this format in this environment
        saved.append(name)
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (64, 32) and _close(im.getpixel((32, 16)), RED, tol=20)
        assert read_size(tmp_path / name) == (64, 32)
    if not saved:
        pytest.skip("neither a HEIF nor an AVIF encoder is available")
    assert set(find_images(tmp_path)) == {tmp_path / n for n in saved}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "La", "RGBa", "PA", "I;16", "F", "CMYK", "1"])
def test_to_rgb_in_memory(mode: str) -> None:
    im = Image.new(mode, (3, 2))
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert im.mode == mode  # the caller's image is left alone
    if "A" in mode or "a" in mode:
        assert out.getpixel((0, 0)) == GREY  # all-zero alpha: nothing but background
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


# --- decoding: bad files ----------------------------------------------------------------------------


def _assert_decode_error(path: Path, reason_part: str) -> None:
    for fn in (load_image, read_size):
        with pytest.raises(ImageDecodeError) as info:
            fn(path)
        assert reason_part in info.value.reason
        assert str(info.value) == f"{path}: {info.value.reason}"
        assert info.value.path == path


def test_bad_files_raise_decode_error(tmp_path: Path) -> None:
    _assert_decode_error(_touch(tmp_path / "empty.jpg", b""), "empty file (0 bytes)")
    text = _touch(tmp_path / "text.png", b"just some notes\n" * 20)
    _assert_decode_error(text, "not a recognised image format")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_decode_error(_touch(tmp_path / "noise.jpg", noise), "not a recognised image format")
    _assert_decode_error(tmp_path / "missing.jpg", "not found")
    (tmp_path / "folder.jpg").mkdir()
    _assert_decode_error(tmp_path / "folder.jpg", "a folder, not a file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _touch(tmp_path / "secret.jpg", _jpeg_bytes())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            # Running as root, where permissions are not enforced: simulate the refusal instead.
            import loracap.inputs.decode as decode

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(path))

            monkeypatch.setattr(decode, "open_regular", refuse)
        _assert_decode_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_truncated_jpeg(tmp_path: Path) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path = _touch(tmp_path / "cut.jpg", data[: len(data) // 2])
    assert read_size(path) == (200, 200)  # the header is intact...
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load_image(path)  # ...the pixels are not
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global Pillow state untouched


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px: past Pillow's own 2x hard limit
    _assert_decode_error(path, "decompression bomb: 10000 pixels > limit 1000")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_between_warn_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # Pillow only warns here; we refuse
    _assert_decode_error(path, "decompression bomb: 10000 pixels > limit 6000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # guard disabled by the user: honoured
    assert load_image(path).size == (100, 100)


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("a/b.jpg", "bad")))
    assert (err.path, err.reason, str(err)) == (Path("a/b.jpg"), "bad", f"{Path('a/b.jpg')}: bad")


# --- max_side and threads ---------------------------------------------------------------------------


def test_max_side_shrinks_large_and_keeps_small(tmp_path: Path) -> None:
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 1000), BLUE).save(wide, quality=85)
    im = load_image(wide, max_side=512)
    assert im.mode == "RGB" and im.size == (512, 171)
    assert _close(im.getpixel((256, 85)), BLUE)
    assert load_image(wide).size == (3000, 1000)

    tall = tmp_path / "tall.png"  # no DCT scaling for PNG: the plain resize path
    Image.new("RGBA", (300, 1200), (0, 0, 0, 0)).save(tall)
    assert load_image(tall, max_side=400).size == (100, 400)

    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg_bytes((100, 100)))
    assert load_image(small, max_side=512).size == (100, 100)
    assert load_image(small, max_side=100).size == (100, 100)


def test_min_side_keeps_the_shorter_side(tmp_path: Path) -> None:
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (3000, 1000), BLUE).save(wide, quality=85)
    assert load_image(wide, min_side=384).size == (1152, 384)
    assert load_image(wide, min_side=2000).size == (3000, 1000)  # never enlarged
    # Both: the gentler reduction wins, so the shorter side never drops below min_side.
    assert load_image(wide, max_side=512, min_side=384).size == (1152, 384)
    assert load_image(wide, max_side=1500, min_side=100).size == (1500, 500)
    with pytest.raises(ValueError):
        load_image(wide, max_side=0)


def test_max_side_applies_after_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "r.jpg"
    Image.new("RGB", (2000, 1000), GREEN).save(path, exif=exif.tobytes())
    assert load_image(path, max_side=300).size == (150, 300)


def test_concurrent_loads(tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(_jpeg_bytes((400 + i, 300), (i * 20, 100, 200)))
        paths.append(path)
    with ThreadPoolExecutor(max_workers=6) as pool:
        sizes = list(pool.map(lambda p: load_image(p, max_side=200).size, paths))
    assert sizes == [(200, round(300 * 200 / (400 + i))) for i in range(12)]


# --- decoding from bytes ----------------------------------------------------------------------------


def _rotated_jpeg_bytes() -> bytes:
    stored = Image.new("RGB", (80, 40), RED)
    stored.paste(BLUE, (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _rgba_png_bytes() -> bytes:
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 255, 0), (255, 255, 255, 0), (255, 0, 0, 255), (255, 255, 255, 128)])
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "make", "kwargs"),
    [
        ("rotated.jpg", _rotated_jpeg_bytes, {}),
        ("rotated.jpg", _rotated_jpeg_bytes, {"max_side": 30}),
        ("rgba.png", _rgba_png_bytes, {}),
        ("wide.jpg", lambda: _jpeg_bytes((640, 200), BLUE), {"min_side": 50}),
    ],
)
def test_load_image_bytes_matches_load_image(tmp_path: Path, name: str, make, kwargs: dict) -> None:
    data = make()
    from_file = load_image(_touch(tmp_path / name, data), **kwargs)
    from_bytes = load_image_bytes(data, **kwargs)
    assert from_bytes.mode == "RGB" and from_bytes.size == from_file.size
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_file))


def test_load_image_bytes_applies_the_rules() -> None:
    im = load_image_bytes(_rotated_jpeg_bytes())
    assert im.size == (40, 80) and _close(im.getpixel((20, 5)), RED)  # EXIF rotation applied
    im = load_image_bytes(_rgba_png_bytes())
    assert im.getpixel((0, 0)) == GREY and im.getpixel((2, 0)) == RED  # alpha on mid-grey


def test_load_image_bytes_bad_data() -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image_bytes(b"")
    assert info.value.reason == "empty image data (0 bytes)" and info.value.path == Path("<bytes>")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError) as info:
        load_image_bytes(noise, label="<upload>")
    assert info.value.reason == "not a recognised image format"
    assert str(info.value) == f"{Path('<upload>')}: not a recognised image format"
    with pytest.raises(ValueError):
        load_image_bytes(_jpeg_bytes(), max_side=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_load_image_bytes_max_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    data = buf.getvalue()

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels decoded")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "load", no_decoding)  # the refusal comes from the header alone
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(ImageDecodeError, match="decompression bomb: 10000 pixels > limit 9999"):
            load_image_bytes(data, max_pixels=9999)
    assert load_image_bytes(data, max_pixels=10000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # no max_pixels: Pillow's limit, read now
    with pytest.raises(ImageDecodeError, match="10000 pixels > limit 6000"):
        load_image_bytes(data)
