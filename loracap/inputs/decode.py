"""Decode one image file (or its bytes) into a plain RGB PIL image, or fail with a one-line reason.

A captioning run over thousands of user files must not die on the one broken download, so every way a
file can be bad ends as ImageDecodeError(path, reason) and the caller logs it and moves on. This runs in
worker threads: nothing here changes Pillow's global settings (no LOAD_TRUNCATED_IMAGES, no warnings
filters, MAX_IMAGE_PIXELS is only read).
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loracap.files import NotARegularFile, describe_os_error, open_regular

# Alpha is flattened onto mid-grey: neither black nor white, so a captioner is not misled into
# "on a white background" / "dark photo" by what is really transparency.
BACKGROUND = (128, 128, 128)

_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # the ones that rotate by 90 degrees
_MAX_REASON_DETAIL = 160


class ImageDecodeError(Exception):
    """A file that could not be turned into an image; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep it picklable across process pools despite the two-argument __init__
        return (type(self), (self.path, self.reason))


# --- optional formats -------------------------------------------------------------------------------

_register_lock = threading.Lock()
_registered: bool | None = None  # None: not tried yet; True/False: pillow-heif importable or not


def register_optional_formats() -> None:
    """Let Pillow open HEIC/HEIF (via pillow-heif) when it is installed. Idempotent and cheap.

    AVIF needs nothing here: Pillow >= 11.2 ships its own AVIF plugin, and pillow-heif 1.x no longer
    provides one (older versions do, and are registered when present).
    """
    global _registered
    if _registered is not None:
        return
    with _register_lock:
        if _registered is not None:
            return
        try:
            import pillow_heif
        except ImportError:
            _registered = False
            return
        pillow_heif.register_heif_opener()
        register_avif = getattr(pillow_heif, "register_avif_opener", None)  # pillow-heif < 1.0 only
        if register_avif is not None and not _pillow_has_avif():
            register_avif()
        _registered = True


def heif_available() -> bool:
    """True when HEIC/HEIF files can be decoded (pillow-heif is importable)."""
    register_optional_formats()
    return bool(_registered)


def _pillow_has_avif() -> bool:
    from PIL import features

    return bool(features.check("avif"))


# --- error mapping ----------------------------------------------------------------------------------


def _detail(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= _MAX_REASON_DETAIL else text[: _MAX_REASON_DETAIL - 3] + "..."


def _bomb_reason(pixels: int, limit: int) -> str:
    return f"decompression bomb: {pixels} pixels > limit {limit}"


@contextmanager
def _as_decode_error(path: Path) -> Iterator[None]:
    """Translate whatever a bad file makes Pillow (or a plugin) raise into ImageDecodeError.

    Pillow's plugins raise a zoo of types on malformed input (OSError, SyntaxError, ValueError,
    struct.error, EOFError, IndexError, ...), so this deliberately ends by catching Exception: one
    hostile file must never take down a batch.
    """
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow raises this itself at 2x the limit; report it the same way as our own 1x check.
        limit = Image.MAX_IMAGE_PIXELS
        m = re.search(r"\((\d+) pixels\)", str(e))
        if m and limit:
            raise ImageDecodeError(path, _bomb_reason(int(m.group(1)), limit)) from e
        raise ImageDecodeError(path, f"decompression bomb: {_detail(e)}") from e
    except NotARegularFile as e:  # a FIFO, socket, device or folder named like an image
        raise ImageDecodeError(path, describe_os_error(path, e)) from e
    except FileNotFoundError as e:
        reason = describe_os_error(path, e) if os.path.islink(path) else "file not found"
        raise ImageDecodeError(path, reason) from e
    except IsADirectoryError as e:
        raise ImageDecodeError(path, "is a directory, not a file") from e
    except PermissionError as e:
        raise ImageDecodeError(path, "permission denied") from e
    except UnidentifiedImageError as e:
        reason = "not a recognised image format"
        if path.suffix.lower() in (".heic", ".heif") and not heif_available():
            reason += " (install pillow-heif to read HEIC/HEIF)"
        raise ImageDecodeError(path, reason) from e
    except MemoryError as e:
        raise ImageDecodeError(path, "out of memory while decoding") from e
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:
            # A real I/O failure (EIO, ELOOP, ESTALE, ...) rather than bad content: Pillow's own errors
            # carry no errno.
            raise ImageDecodeError(path, f"cannot read file: {describe_os_error(path, e)}") from e
        # Nearly every decode failure on a real-world file is a cut-off download or copy, and Pillow's
        # own messages say so inconsistently ("image file is truncated", "broken data stream",
        # EOFError, ...), hence one wording that always names the likely cause.
        raise ImageDecodeError(path, f"truncated or corrupt image data ({_detail(e)})") from e


def _open_checked(
    path: Path, fp: IO[bytes], size: int, limit: int | None, *, empty: str = "empty file (0 bytes)"
) -> Image.Image:
    """Image.open plus the emptiness and decompression-bomb checks, before any pixel is decoded.

    ``fp`` is an open file or a BytesIO of ``size`` bytes; ``limit`` is the largest pixel count accepted
    (None: no limit); ``empty`` is the reason given when there are no bytes at all.
    """
    if size == 0:
        raise ImageDecodeError(path, empty)
    im = Image.open(fp)
    # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; for a batch tool a huge image is a
    # per-file error instead (it could exhaust memory in every worker at once). Callers read
    # MAX_IMAGE_PIXELS at call time so callers/tests can change the limit.
    if im.width < 1 or im.height < 1:
        raise ImageDecodeError(path, f"invalid image size {im.width}x{im.height}")
    pixels = im.width * im.height
    if limit is not None and pixels > limit:
        raise ImageDecodeError(path, _bomb_reason(pixels, limit))
    return im


def _file_size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


# --- size -------------------------------------------------------------------------------------------


def _orientation(im: Image.Image) -> int:
    # A broken EXIF block should not cost the user the whole image: treat it as "no rotation".
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:
        return 1


def read_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image will be displayed (EXIF rotation applied), from the header only."""
    register_optional_formats()
    path = Path(path)
    with (
        _as_decode_error(path),
        open_regular(path) as f,
        _open_checked(path, f, _file_size(f), Image.MAX_IMAGE_PIXELS) as im,
    ):
        width, height = im.size
        if _orientation(im) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        return width, height


# --- pixels -----------------------------------------------------------------------------------------


def _scaled_to_l(arr: np.ndarray, lo: float, hi: float) -> Image.Image:
    """Map [lo, hi] linearly onto 0..255 (never clipping a valid value to white)."""
    arr = arr.astype(np.float32, copy=False)
    if hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    # (hi == lo is a flat image with no range to stretch: its value is kept, clipped to 0..255.)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """I;16*, I and F images (16-bit PNG/TIFF, scientific TIFFs) to 8-bit grey."""
    if im.mode.startswith("I;16"):
        # Fixed 16-bit range, not the data range: a mid-grey 32768 must stay mid-grey.
        return _scaled_to_l(np.asarray(im.convert("I")), 0.0, 65535.0)
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    # Prefer the conventional range the values fit in (16-bit ints, 0..1 floats) so brightness is
    # preserved; only stretch by the data range when the values fit neither.
    if im.mode == "I" and lo >= 0 and hi <= 65535:
        return _scaled_to_l(arr, 0.0, 65535.0)
    if im.mode == "F" and lo >= 0 and hi <= 1:
        return _scaled_to_l(arr, 0.0, 1.0)
    return _scaled_to_l(arr, lo, hi)


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite an RGBA image over the mid-grey background (out = rgb*a + bg*(1-a))."""
    background = Image.new("RGB", im.size, BACKGROUND)
    background.paste(im, mask=im.getchannel("A"))
    return background


def to_rgb(im: Image.Image) -> Image.Image:
    """Any-mode PIL image to mode "RGB": alpha flattened on mid-grey, 16-bit/float scaled, CMYK etc.

    For images already in memory (load_image uses it too). Returns ``im`` itself when it is already
    plain RGB, else a new image; the input is never modified. EXIF orientation is NOT applied here:
    an in-memory image may already have been rotated by its owner.
    """
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" in im.info:
        # PNG/GIF colour-key transparency (tRNS) on a non-palette image: make it a real alpha band.
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return im
    if mode == "La":  # premultiplied grey+alpha: Pillow only converts it to LA
        im, mode = im.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im if mode == "RGBA" else im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(im).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow's own conversions. CMYK is converted
    # naively (no ICC colour management): close enough for captioning.
    return im.convert("RGB")


def _shrink_scale(size: tuple[int, int], max_side: int | None, min_side: int | None) -> float | None:
    """The factor (< 1) to shrink ``size`` by, or None to keep it.

    max_side: the longer side becomes max_side. min_side: the shorter side becomes min_side. With both,
    the gentler reduction wins, so the shorter side never drops below min_side. Never enlarges.
    """
    scales = []
    if max_side is not None:
        scales.append(max_side / max(size))
    if min_side is not None:
        scales.append(min_side / min(size))
    if not scales or max(scales) >= 1:
        return None
    return max(scales)


def _scaled(size: tuple[int, int], scale: float, rounding: Callable[[float], float]) -> tuple[int, int]:
    # ceil for draft(), which must not undershoot the target; round for the final resize.
    return max(1, int(rounding(size[0] * scale))), max(1, int(rounding(size[1] * scale)))


def _check_sides(max_side: int | None, min_side: int | None) -> None:
    for name, value in (("max_side", max_side), ("min_side", min_side)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _decode(im: Image.Image, max_side: int | None, min_side: int | None) -> Image.Image:
    """The shared body of load_image and load_image_bytes: an image from _open_checked to plain RGB.

    Runs inside the caller's _as_decode_error, which turns whatever a bad image raises here into
    ImageDecodeError.
    """
    stored_size = im.size
    scale = _shrink_scale(stored_size, max_side, min_side)
    if scale is not None:
        # JPEG only (a no-op elsewhere): let libjpeg decode at 1/2, 1/4 or 1/8 scale, picking the
        # smallest scale that still leaves the image at least the target size. Several times
        # faster and smaller than decoding a 24 MP photo in full only to shrink it.
        im.draft("RGB", _scaled(stored_size, scale, math.ceil))
    im.load()  # frame 0 of animated/multi-page files: Image.open leaves us positioned there
    orientation = _orientation(im)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    rgb = to_rgb(im)
    if scale is not None:
        # The target comes from the file's own size, not the drafted one: draft rounds up, and
        # going via it could make the short side differ by a pixel from a non-JPEG of equal size.
        target = _scaled(stored_size, scale, round)
        if orientation in _SWAPPING_ORIENTATIONS:
            target = target[::-1]
        # What thumbnail() does, minus its in-place update of a file-backed image: a cheap integer
        # reduce() first, then Lanczos for the rest.
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    if rgb.mode != "RGB":  # defensive: a plugin handing back something unexpected
        rgb = rgb.convert("RGB")
    return rgb


def load_image(path: str | Path, max_side: int | None = None, *, min_side: int | None = None) -> Image.Image:
    """Fully decode ``path`` to a mode "RGB" image, upright per EXIF, first frame of animations.

    The format is detected from the content, never the extension. Shrinking (aspect kept, never
    enlarging; models resize anyway, this saves memory and decode time): with ``max_side`` the longer
    side becomes exactly ``max_side``; with ``min_side`` the shorter side becomes exactly ``min_side``
    (what a model that resizes to min_side x min_side needs); with both, the gentler of the two.
    Raises ImageDecodeError for every kind of bad file.
    """
    _check_sides(max_side, min_side)
    register_optional_formats()
    path = Path(path)
    with (
        _as_decode_error(path),
        open_regular(path) as f,
        _open_checked(path, f, _file_size(f), Image.MAX_IMAGE_PIXELS) as im,
    ):
        return _decode(im, max_side, min_side)


def load_image_bytes(
    data: bytes,
    max_side: int | None = None,
    *,
    min_side: int | None = None,
    max_pixels: int | None = None,
    label: str = "<bytes>",
) -> Image.Image:
    """The bytes of an image file (an upload, a data: URL) to a mode "RGB" image, like `load_image`.

    Same rules as load_image: format from the content, EXIF rotation, alpha on mid-grey, first frame,
    ``max_side``/``min_side`` shrinking. ``max_pixels`` is the decompression-bomb limit (default:
    Pillow's MAX_IMAGE_PIXELS, read now), checked on the header before any pixel is decoded. Pillow
    itself still refuses anything over twice its own MAX_IMAGE_PIXELS while opening, whatever
    ``max_pixels`` says. Raises ImageDecodeError with ``Path(label)`` as its path for bad data.
    """
    _check_sides(max_side, min_side)
    register_optional_formats()
    path = Path(label)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with (
        _as_decode_error(path),
        _open_checked(path, io.BytesIO(data), len(data), limit, empty="empty image data (0 bytes)") as im,
    ):
        return _decode(im, max_side, min_side)
