"""Draw the small example images shipped in examples/images/ (the README's first command captions them).

Everything is procedural and seeded, so re-running reproduces the same pictures:

    python3 examples/make_example_images.py

Scenes are drawn at 2x and downsampled for smooth edges. Six JPEGs at the top level, one PNG with
transparency (a sticker), and one JPEG in a subfolder to show that folders are searched recursively.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "images"
SS = 2  # supersampling factor
JPEG_QUALITY = 85


def _vertical_gradient(size: tuple[int, int], stops: list[tuple[float, tuple[int, int, int]]]) -> Image.Image:
    """RGB image whose rows blend through ``stops`` [(position 0..1, colour), ...] top to bottom."""
    w, h = size
    t = np.linspace(0.0, 1.0, h)
    positions = [p for p, _ in stops]
    rows = np.stack([np.interp(t, positions, [c[i] for _, c in stops]) for i in range(3)], axis=1)
    arr = np.repeat(rows[:, None, :], w, axis=1)
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def _finish(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    return im.resize(size, Image.Resampling.LANCZOS)


def sunset(size=(512, 384)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    horizon = int(h * 0.68)
    im = _vertical_gradient((w, h), [(0.0, (44, 38, 96)), (0.45, (222, 96, 82)), (0.68, (255, 190, 110)),
                                     (0.69, (40, 52, 92)), (1.0, (18, 24, 48))])  # fmt: skip
    glow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(glow).ellipse((w * 0.5 - 190, horizon - 230, w * 0.5 + 190, horizon + 150), fill=150)
    glow = glow.filter(ImageFilter.GaussianBlur(60))
    im = Image.composite(Image.new("RGB", (w, h), (255, 214, 140)), im, glow)
    d = ImageDraw.Draw(im)
    r = 78
    d.ellipse((w / 2 - r, horizon - r * 1.1, w / 2 + r, horizon + r * 0.9), fill=(255, 236, 170))
    d.rectangle((0, horizon, w, h), fill=(36, 46, 84))  # the sea hides the lower part of the sun
    rng = random.Random(1)
    for i in range(26):  # sun reflection: short bright strokes on the water, narrowing with distance
        y = horizon + 8 + i * 10
        half = 70 - i * 2 + rng.randint(-10, 10)
        d.line((w / 2 - half, y, w / 2 + half, y), fill=(250, 190, 120), width=3)
    for _ in range(3):  # a few distant birds
        x, y = rng.randint(120, w - 120), rng.randint(60, horizon - 200)
        d.arc((x - 14, y, x, y + 12), 200, 340, fill=(60, 40, 70), width=3)
        d.arc((x, y, x + 14, y + 12), 200, 340, fill=(60, 40, 70), width=3)
    return _finish(im, size)


def still_life(size=(512, 384)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    table_y = int(h * 0.62)
    im = _vertical_gradient((w, h), [(0.0, (214, 206, 190)), (0.62, (190, 180, 164)), (0.621, (140, 92, 60)),
                                     (1.0, (96, 60, 38))])  # fmt: skip
    d = ImageDraw.Draw(im)
    rng = random.Random(2)
    for _ in range(40):  # wood grain
        y = rng.randint(table_y + 4, h)
        d.line((0, y, w, y + rng.randint(-6, 6)), fill=(120, 78, 50), width=2)
    shadow = Image.new("L", (w, h), 0)
    sd = ImageDraw.Draw(shadow)
    # a red ball, a blue box, a yellow cone
    sd.ellipse((150, table_y + 50, 390, table_y + 90), fill=110)
    sd.polygon([(470, table_y + 60), (700, table_y + 60), (760, table_y + 95), (520, table_y + 95)], fill=110)
    sd.ellipse((770, table_y + 50, 960, table_y + 85), fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(10))
    im = Image.composite(Image.new("RGB", (w, h), (60, 36, 22)), im, shadow)
    d = ImageDraw.Draw(im)
    d.ellipse((170, table_y - 150, 370, table_y + 50), fill=(200, 40, 46))
    d.ellipse((215, table_y - 120, 265, table_y - 80), fill=(240, 130, 130))  # highlight
    d.polygon([(480, table_y - 170), (640, table_y - 200), (700, table_y - 150), (540, table_y - 120)],
              fill=(80, 120, 210))  # fmt: skip
    d.rectangle((480, table_y - 170, 540, table_y + 60), fill=(44, 74, 160))
    d.polygon([(540, table_y - 120), (700, table_y - 150), (700, table_y + 30), (540, table_y + 60)],
              fill=(60, 96, 190))  # fmt: skip
    d.rectangle((480, table_y - 120, 540, table_y + 60), fill=(44, 74, 160))
    d.polygon([(865, table_y - 250), (780, table_y + 60), (950, table_y + 60)], fill=(236, 190, 40))
    d.polygon([(865, table_y - 250), (865, table_y + 60), (950, table_y + 60)], fill=(210, 160, 30))
    return _finish(im, size)


def night_sky(size=(512, 384)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    im = _vertical_gradient((w, h), [(0.0, (6, 8, 28)), (0.7, (22, 30, 70)), (1.0, (40, 48, 90))])
    d = ImageDraw.Draw(im)
    rng = random.Random(3)
    for _ in range(260):
        x, y = rng.uniform(0, w), rng.uniform(0, h * 0.8)
        r = rng.choice([1, 1, 1, 2, 2, 3])
        v = rng.randint(170, 255)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(v, v, min(255, v + 20)))
    # crescent moon: a bright disc with a sky-coloured disc over it
    d.ellipse((720, 90, 860, 230), fill=(250, 244, 210))
    d.ellipse((760, 70, 900, 210), fill=(10, 13, 36))
    # mountain silhouette
    ridge = [(0, h)]
    for x in range(0, w + 1, 16):
        y = h * 0.78 - 70 * math.sin(x / 130) - 40 * math.sin(x / 47 + 1) - rng.uniform(0, 8)
        ridge.append((x, y))
    ridge.append((w, h))
    d.polygon(ridge, fill=(8, 10, 20))
    return _finish(im, size)


def landscape(size=(512, 384)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    im = _vertical_gradient((w, h), [(0.0, (110, 170, 230)), (0.6, (200, 226, 245)), (1.0, (200, 226, 245))])
    d = ImageDraw.Draw(im)
    d.ellipse((820, 70, 920, 170), fill=(255, 246, 200))
    for cx, cy in [(200, 130), (560, 90)]:  # clouds
        for dx, dy, r in [(0, 0, 40), (45, 8, 34), (-45, 10, 30), (20, -20, 32)]:
            d.ellipse((cx + dx - r * 1.6, cy + dy - r, cx + dx + r * 1.6, cy + dy + r), fill=(250, 252, 255))
    hills = [(0.62, 90, 210, (120, 170, 90)), (0.72, 70, 150, (84, 140, 64)), (0.84, 50, 260, (60, 112, 48))]
    for base, amp, period, colour in hills:
        pts = [(0, h)] + [(x, h * base - amp * math.sin(x / period + base * 7)) for x in range(0, w + 1, 8)]
        d.polygon([*pts, (w, h)], fill=colour)
    # a tree: trunk plus overlapping round canopy blobs
    tx, ty = 300, int(h * 0.74)
    d.rectangle((tx - 14, ty - 150, tx + 14, ty + 10), fill=(96, 64, 40))
    for dx, dy, r in [(0, -210, 80), (-60, -160, 62), (60, -160, 62), (0, -140, 60)]:
        d.ellipse((tx + dx - r, ty + dy - r, tx + dx + r, ty + dy + r), fill=(40, 100, 44))
    d.ellipse((tx - 30, ty - 250, tx + 10, ty - 215), fill=(70, 136, 64))
    return _finish(im, size)


def checker_vase(size=(384, 512)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    wall = [(0.0, (232, 226, 214)), (0.75, (212, 204, 190))]
    floor = [(0.751, (160, 150, 140)), (1.0, (130, 122, 112))]
    im = _vertical_gradient((w, h), wall + floor)
    # The vase outline as a mask, filled with a checkerboard that bends with the body's width.
    cx, top, bottom = w // 2, 180, int(h * 0.83)
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    left, right = [], []
    for y in range(top, bottom + 1, 4):
        t = (y - top) / (bottom - top)
        half = 70 + 150 * math.sin(math.pi * (0.15 + 0.8 * t)) ** 1.5
        left.append((cx - half, y))
        right.append((cx + half, y))
    md.polygon(left + right[::-1], fill=255)
    md.rectangle((cx - 60, top - 60, cx + 60, top + 10), fill=255)  # neck
    ys, xs = np.mgrid[0:h, 0:w]
    u = np.arcsin(np.clip((xs - cx) / 230.0, -1, 1))  # wrap horizontally around a cylinder
    checks = ((np.floor(u / 0.35) + np.floor(ys / 48)) % 2).astype(bool)
    shade = np.clip(1.0 - 0.45 * ((xs - cx + 60) / 260.0) ** 2, 0.4, 1.0)[..., None]
    pattern = np.where(checks[..., None], np.array([30, 60, 120]), np.array([236, 230, 214])) * shade
    vase = Image.fromarray(pattern.astype(np.uint8), "RGB")
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).ellipse((cx - 200, bottom - 25, cx + 280, bottom + 30), fill=120)
    shadow = shadow.filter(ImageFilter.GaussianBlur(14))
    im = Image.composite(Image.new("RGB", (w, h), (90, 84, 76)), im, shadow)
    im = Image.composite(vase, im, mask)
    return _finish(im, size)


def silhouette(size=(384, 512)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    im = _vertical_gradient((w, h), [(0.0, (250, 200, 120)), (1.0, (236, 110, 90))])
    halo = Image.new("L", (w, h), 0)
    ImageDraw.Draw(halo).ellipse((w / 2 - 260, 140, w / 2 + 260, 660), fill=140)
    halo = halo.filter(ImageFilter.GaussianBlur(50))
    im = Image.composite(Image.new("RGB", (w, h), (255, 236, 190)), im, halo)
    d = ImageDraw.Draw(im)
    ink = (44, 32, 50)
    cx = w / 2
    d.ellipse((cx - 120, 250, cx + 120, 530), fill=ink)  # head
    d.rectangle((cx - 55, 500, cx + 55, 640), fill=ink)  # neck
    d.chord((cx - 330, 600, cx + 330, 1300), 180, 360, fill=ink)  # shoulders
    d.rectangle((cx - 330, 950, cx + 330, h), fill=ink)
    d.ellipse((cx - 140, 220, cx + 130, 380), fill=ink)  # hair
    d.polygon([(cx + 110, 360), (cx + 150, 420), (cx + 112, 430)], fill=ink)  # nose
    return _finish(im, size)


def sticker(size=(384, 384)) -> Image.Image:
    """A star badge on a transparent background (RGBA PNG)."""
    w, h = size[0] * SS, size[1] * SS
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    cx, cy = w / 2, h / 2
    d.ellipse((cx - 330, cy - 330, cx + 330, cy + 330), fill=(40, 120, 190, 255))
    d.ellipse((cx - 300, cy - 300, cx + 300, cy + 300), fill=(70, 160, 225, 255))
    star = []
    for i in range(10):
        r = 250 if i % 2 == 0 else 105
        a = -math.pi / 2 + i * math.pi / 5
        star.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    d.polygon(star, fill=(255, 214, 60, 255))
    d.ellipse((cx - 360, cy + 230, cx - 250, cy + 340), fill=(240, 90, 90, 200))  # translucent dot
    return _finish(im, size)


def lighthouse(size=(512, 384)) -> Image.Image:
    w, h = size[0] * SS, size[1] * SS
    sea_y = int(h * 0.66)
    im = _vertical_gradient((w, h), [(0.0, (150, 196, 230)), (0.66, (220, 236, 244)), (0.661, (40, 110, 150)),
                                     (1.0, (20, 70, 110))])  # fmt: skip
    d = ImageDraw.Draw(im)
    rock = [(420, sea_y + 20), (560, sea_y - 40), (840, sea_y - 30), (1000, sea_y + 30)]
    d.polygon(rock, fill=(110, 100, 90))
    bx, top, base = 690, 170, sea_y - 35
    for i, y in enumerate(range(top, base, 60)):  # tapered tower in red and white bands
        t0, t1 = (y - top) / (base - top), (min(y + 60, base) - top) / (base - top)
        colour = (200, 40, 40) if i % 2 == 0 else (245, 245, 240)
        d.polygon([(bx - 40 - 30 * t0, y), (bx + 40 + 30 * t0, y), (bx + 40 + 30 * t1, min(y + 60, base)),
                   (bx - 40 - 30 * t1, min(y + 60, base))], fill=colour)  # fmt: skip
    d.rectangle((bx - 50, top - 70, bx + 50, top), fill=(250, 230, 140))  # lamp room
    d.polygon([(bx - 60, top - 70), (bx + 60, top - 70), (bx, top - 130)], fill=(60, 60, 70))
    rng = random.Random(8)
    for _ in range(70):  # wave highlights
        x, y = rng.uniform(0, w), rng.uniform(sea_y + 10, h)
        d.line((x, y, x + rng.uniform(14, 40), y), fill=(180, 220, 235), width=2)
    return _finish(im, size)


JPEGS = {
    "sunset.jpg": sunset,
    "still_life.jpg": still_life,
    "night_sky.jpg": night_sky,
    "landscape.jpg": landscape,
    "checker_vase.jpg": checker_vase,
    "silhouette.jpg": silhouette,
    "more/lighthouse.jpg": lighthouse,
}


def main() -> None:
    for name, draw in JPEGS.items():
        path = OUT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw().save(path, quality=JPEG_QUALITY, optimize=True)
        print(f"{path.relative_to(OUT.parent)}  {path.stat().st_size // 1024} KB")
    path = OUT / "sticker.png"
    sticker().save(path, optimize=True)
    print(f"{path.relative_to(OUT.parent)}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
