"""report.html: the report's JSON document drawn as one self-contained page.

Everything is inline (CSS, a few lines of JS for sorting and filtering, SVG charts, JPEG thumbnails as
data URIs), so the file can be mailed, attached to a CI run or opened from a USB stick. The page reads
top-down in the order a user fixes things: the captions that disagree with their images, then what the
text encoder will cut, then duplicates, trigger, tags and images.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from loracap.inputs import ImageDecodeError, load_image, map_ahead
from loracap.quality.plots import column_chart, row_chart

__all__ = ["render_html", "thumbnail_uri"]

LOW_CLIP = 20.0  # scores below this are drawn red: in CLIP ViT-L/14 terms, a caption about something else
THUMB_SIDE = 160
MAX_DUPLICATE_GROUPS = 24
MAX_GROUP_THUMBS = 6
TOP_TAGS = 30


def thumbnail_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be decoded."""
    try:
        image = load_image(path, min_side=side)
    except ImageDecodeError:
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(data: dict[str, Any], root: Path, *, thumbnails: int = 24, workers: int = 2) -> str:
    """The page for `data` (DatasetReport.data); `root` is where the relative paths in it point."""
    worst = [p for p in data["pairs"] if p["clip"] is not None][:thumbnails]
    if not data["clip"]:  # without scores, show the longest captions instead: the next thing to look at
        # In tokens when they were counted, else in characters.
        counted = "skipped" not in data["tokens"]
        worst = sorted(data["pairs"], key=lambda p: -(p["tokens"] if counted else len(p["caption"])))
        worst = worst[:thumbnails]
    groups = (data["images"] or {}).get("duplicate_groups", [])[:MAX_DUPLICATE_GROUPS]
    wanted = list(
        dict.fromkeys([p["path"] for p in worst] + [q for g in groups for q in g["paths"][:MAX_GROUP_THUMBS]])
    )
    thumbs = dict(zip(wanted, map_ahead(lambda rel: thumbnail_uri(root / rel), wanted, workers), strict=True))

    sections = [
        _header(data),
        _cards(data),
        _worst_section(data, worst, thumbs),
        _pairs_section(data),
        _tokens_section(data),
        _duplicates_section(data),
        _trigger_section(data),
        _tags_section(data),
        _sensitive_section(data),
        _images_section(data, groups, thumbs),
        _dataset_section(data),
    ]
    body = "\n".join(s for s in sections if s)
    title = f"loracap report: {escape(Path(data['root']).name)}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body><main>\n{body}\n</main><script>{_JS}</script></body></html>\n"
    )


# --- sections --------------------------------------------------------------------------------------------


def _header(d: dict[str, Any]) -> str:
    failed = d["fail_on"]["failed"]
    rules = d["fail_on"]["rules"]
    if failed:
        banner = (
            '<div class="banner fail"><b>FAILED</b> '
            + "".join(f"<div>{escape(f)}</div>" for f in failed)
            + "</div>"
        )
    elif rules:
        banner = f'<div class="banner pass"><b>PASSED</b> {escape(", ".join(rules))}</div>'
    else:
        banner = ""
    ds = d["dataset"]
    source = f"{ds['layout']} ({ds['source']})" if ds["source"] else ds["layout"]
    return (
        f"<header><h1>{escape(Path(d['root']).name)}</h1>"
        f'<p class="muted">{escape(d["root"])} · captions: {escape(source)} · '
        f"loracap {escape(d['loracap_version'])} · {escape(d['created'])}</p>{banner}{_nav(d)}</header>"
    )


def _nav(d: dict[str, Any]) -> str:
    links = [
        ("worst", "Worst pairs"),
        ("pairs", "All pairs"),
        ("tokens", "Tokens"),
        ("duplicates", "Duplicates"),
    ]
    if d["trigger"]:
        links.append(("trigger", "Trigger"))
    links += [("tags", "Tags"), ("sensitive", "Sensitive terms")]
    if d["images"]:
        links.append(("images", "Images"))
    links.append(("dataset", "Files"))
    return "<nav>" + " ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in links) + "</nav>"


def _cards(d: dict[str, Any]) -> str:
    c, ds = d["checks"], d["dataset"]
    cards = [
        ("images", ds["images"], False),
        ("captioned", ds["captioned"], False),
        ("no caption", c["missing-caption"], c["missing-caption"] > 0),
        ("caption, no image", c["orphan-caption"], c["orphan-caption"] > 0),
    ]
    if d["clip"] and d["clip"]["mean"] is not None:
        cards.append(("mean CLIP score", f"{d['clip']['mean']:.1f}", d["clip"]["mean"] < LOW_CLIP))
        low = sum(1 for p in d["pairs"] if p["clip"] is not None and p["clip"] < LOW_CLIP)
        cards.append((f"CLIP score < {LOW_CLIP:g}", low, low > 0))
    cards += [
        ("truncated", _count(c["truncated"]), bool(c["truncated"])),
        ("empty captions", c["empty-caption"], c["empty-caption"] > 0),
        ("duplicate captions", c["duplicate-caption"], c["duplicate-caption"] > 0),
        ("duplicate images", c["duplicate-image"], c["duplicate-image"] > 0),
    ]
    if d["trigger"]:
        cards.append(("fused trigger", _count(c["fused-trigger"]), bool(c["fused-trigger"])))
        cards.append(("no trigger", c["no-trigger"], c["no-trigger"] > 0))
    if d["images"]:
        cards.append((f"below {d['images']['min_side']} px", c["small-image"], c["small-image"] > 0))
    return (
        '<section class="cards">'
        + "".join(
            f'<div class="card{" bad" if bad else ""}"><div class="num">{escape(str(v))}</div>'
            f'<div class="label">{escape(label)}</div></div>'
            for label, v, bad in cards
        )
        + "</section>"
    )


def _worst_section(d: dict[str, Any], worst: list[dict[str, Any]], thumbs: dict[str, str | None]) -> str:
    if d["clip"]:
        clip = d["clip"]
        intro = (
            f"Lowest CLIP score first ({escape(clip['model'])}, 100·max(cos, 0)): the captions most "
            f"likely to describe something other than their image. {clip['scored']} pairs scored, "
            f"{clip['computed']} computed and {clip['cached']} from the cache in {clip['seconds']:.1f} s."
        )
        heading = "Captions to check first"
        hist = clip["histogram"]
        edges = [i * hist["bin_width"] for i in range(len(hist["counts"]))]
        chart = column_chart(
            [str(e) for e in edges],
            hist["counts"],
            flagged=[e < LOW_CLIP for e in edges],
            title="CLIP score histogram",
        )
        chart = _figure(chart, f"CLIP score histogram (bins of {hist['bin_width']})")
    else:
        intro, heading, chart = (
            "CLIP scoring was turned off (--no-clip); the longest captions are shown.",
            "Longest captions",
            "",
        )
    tiles = []
    for p in worst:
        uri = thumbs.get(p["path"])
        img = f'<img src="{uri}" alt="{escape(p["path"])}">' if uri else '<div class="noimg">no preview</div>'
        score = f"{p['clip']:.1f}" if p["clip"] is not None else "–"
        bad = p["clip"] is not None and p["clip"] < LOW_CLIP
        tiles.append(
            f'<figure class="tile">{img}<figcaption>'
            f'<span class="score{" bad" if bad else ""}">{score}</span> '
            + (f'<span class="muted">{p["tokens"]} tok</span>' if p["tokens"] is not None else "")
            + f"<br><b>{escape(p['path'])}</b>"
            f'<div class="cap">{escape(p["caption"])}</div></figcaption></figure>'
        )
    return (
        f'<section id="worst"><h2>{heading}</h2><p>{intro}</p>{chart}'
        f'<div class="tiles">{"".join(tiles) or "<p>no pairs</p>"}</div></section>'
    )


def _pairs_section(d: dict[str, Any]) -> str:
    rows = []
    for p in d["pairs"]:
        flags = []
        if p["truncated"]:
            flags.append("truncated")
        if p["empty"]:
            flags.append("empty")
        if p["trigger"] in ("fused", "missing"):
            flags.append(f"trigger {p['trigger']}")
        if p["clip_error"]:
            flags.append("not scored")
        clip = p["clip"]
        rows.append(
            [
                _cell(p["path"]),
                _cell(
                    "–" if clip is None else f"{clip:.1f}",
                    sort=-1 if clip is None else clip,
                    bad=clip is not None and clip < LOW_CLIP,
                ),
                _cell(
                    _count(p["tokens"]),
                    sort=-1 if p["tokens"] is None else p["tokens"],
                    bad=bool(p["truncated"]),
                ),
                _cell(", ".join(flags), bad=bool(flags)),
                _cell(p["caption"], cls="cap"),
            ]
        )
    table = _table(["image", "CLIP", "tokens", "flags", "caption"], rows, filterable=True)
    hint = '<p class="muted">Click a column to sort; type to filter.</p>'
    return f'<section id="pairs"><h2>All pairs</h2>{hint}{table}</section>'


def _tokens_section(d: dict[str, Any]) -> str:
    t = d["tokens"]
    if "skipped" in t:  # a note, not zeros: nothing was counted
        return (
            f'<section id="tokens"><h2>Token lengths</h2><p>Token checks skipped: {escape(t["skipped"])}.</p>'
            + _list_table("Empty captions", ["image"], [[_cell(p["path"])] for p in d["pairs"] if p["empty"]])
            + "</section>"
        )
    counts = list(t["counts"].values())
    parts = [
        f'<section id="tokens"><h2>Token lengths</h2><p>Counted with <code>{escape(t["tokenizer"])}</code>: '
        f"a {t['max_length']}-token window, {t['content_limit']} for the caption itself. Words past it are "
        f"cut off in training (kohya's <code>--max_token_length 150/225</code> widens it for SD 1.x/SDXL). "
        f"Mean {_num(t['mean'])}, median {_num(t['median'])}, 95th percentile {_num(t['p95'])}, "
        f"longest {_num(t['max'])}.</p>"
    ]
    if counts:
        width = max(1, -(-max(counts) // 24))  # about 24 bins
        bins = [0] * (max(counts) // width + 1)
        for n in counts:
            bins[n // width] += 1
        labels = [str(i * width) for i in range(len(bins))]
        chart = column_chart(
            labels,
            bins,
            flagged=[(i + 1) * width - 1 > t["max_length"] for i in range(len(bins))],
            title="tokens per caption",
        )
        parts.append(
            f"<figure>{chart}<figcaption>tokens per caption (red: over the window)</figcaption></figure>"
        )
    parts.append(
        _list_table(
            "Truncated captions",
            ["image", "tokens"],
            [[_cell(x["path"]), _cell(str(x["tokens"]), sort=x["tokens"])] for x in t["truncated"]],
        )
    )
    parts.append(_list_table("Empty captions", ["image"], [[_cell(p)] for p in t["empty"]]))
    if t["t5"]:
        t5 = t["t5"]
        parts.append(
            f"<h3>T5 ({escape(str(t5['tokenizer']))}, {t5['max_length']} tokens)</h3>"
            f"<p>Mean {_num(t5['mean'])}, "
            f"longest {_num(t5['max'])}.</p>"
        )
        parts.append(
            _list_table(
                "Over the T5 window",
                ["image", "tokens"],
                [[_cell(x["path"]), _cell(str(x["tokens"]), sort=x["tokens"])] for x in t5["truncated"]],
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _duplicates_section(d: dict[str, Any]) -> str:
    dup = d["duplicates"]
    exact = [
        [
            _cell(str(len(g["paths"])), sort=len(g["paths"])),
            _cell(", ".join(g["paths"])),
            _cell(g["caption"], cls="cap"),
        ]
        for g in dup["exact"]
    ]
    near = [
        [
            _cell(f"{g['similarity']:.2f}", sort=g["similarity"]),
            _cell(", ".join(g["paths"])),
            _cell(" | ".join(dict.fromkeys(g["captions"])), cls="cap"),
        ]
        for g in dup["near"]
    ]
    return (
        '<section id="duplicates"><h2>Duplicate captions</h2><p>Images with the same caption are hard '
        "for the model to tell apart; near duplicates (same words or tags, Jaccard ≥ "
        f"{dup['threshold']:g}) usually come from a template or a tagger on similar images.</p>"
        + _list_table("Identical", ["images", "files", "caption"], exact)
        + _list_table("Near-identical", ["similarity", "files", "captions"], near)
        + "</section>"
    )


def _trigger_section(d: dict[str, Any]) -> str:
    tr = d["trigger"]
    if not tr:
        return ""
    positions = ", ".join(f"{k}: {v}" for k, v in sorted(tr["positions"].items())) or "none"
    if tr["tokens"] is None:  # no tokenizer: only a trigger glued into a longer word can be seen
        alone = "The tokenizer fusion check was skipped (no tokenizer); glued occurrences are still listed. "
    else:
        alone = f"On its own it is <code>{escape(' '.join(tr['tokens']))}</code>. "
    fused = [
        [
            _cell(f["path"]),
            _cell(f["text"], cls="cap"),
            _cell(" ".join(f["tokens"]) or "–"),
            _cell("glued to a word" if f["glued"] else "other tokens", bad=True),
        ]
        for f in tr["fused"]
    ]
    return (
        f'<section id="trigger"><h2>Trigger “{escape(tr["trigger"])}”</h2>'
        f"<p>In {tr['with_trigger']} of {tr['captions']} captions. {alone}"
        f"First occurrence: {escape(positions)}.</p>"
        "<p>A fused trigger (“ohwxwoman”, or punctuation the tokenizer merges into it) becomes other "
        "tokens in training than in your prompt, so the LoRA learns the concept under the wrong ones.</p>"
        + _list_table("Fused or glued", ["image", "where", "tokens there", "why"], fused)
        + _list_table("Without the trigger", ["image"], [[_cell(p)] for p in tr["without"]])
        + _list_table(
            "Other letter case (matters for T5, not CLIP)",
            ["image"],
            [[_cell(p)] for p in tr["case_mismatch"]],
        )
        + "</section>"
    )


def _tags_section(d: dict[str, Any]) -> str:
    tags = d["tags"]
    unit = "tags" if tags["mode"] == "tags" else "words"
    top = list(tags["counts"].items())[:TOP_TAGS]
    chart = row_chart([t for t, _ in top], [n for _, n in top], title=f"most frequent {unit}")
    common = ", ".join(f"{escape(x['tag'])} ({x['share']:.0%})" for x in tags["common"]) or "none"
    singles = ", ".join(escape(s) for s in tags["singletons"][:300])
    more = len(tags["singletons"]) - 300
    rows = [
        [_cell(t), _cell(str(n), sort=n), _cell(f"{n / max(tags['captions'], 1):.0%}", sort=n)]
        for t, n in tags["counts"].items()
    ]
    return (
        f'<section id="tags"><h2>{unit.capitalize()}</h2><p>{tags["distinct"]} distinct {unit} over '
        f"{tags['captions']} captions. Imbalance: Gini {tags['gini']:.2f} (0 even, 1 one {unit[:-1]} "
        f"dominates), normalised entropy {tags['entropy']:.2f} (1 even), top {tags['top_k']} share "
        f"{tags['top_k_share']:.0%}.</p><p><b>In nearly every caption</b> (learned into the trigger, since "
        f"nothing contrasts them): {common}</p>"
        + _figure(chart, f"captions containing each of the {len(top)} most frequent {unit}")
        + f"<details><summary>{len(tags['singletons'])} {unit} seen once</summary><p>{singles}"
        f"{f' … and {more} more' if more > 0 else ''}</p></details>"
        f"<details><summary>All {unit}</summary>"
        f"{_table([unit[:-1], 'captions', 'share'], rows)}</details></section>"
    )


def _sensitive_section(d: dict[str, Any]) -> str:
    s = d["sensitive"]
    cats = [
        [
            _cell(k),
            _cell(str(v["captions"]), sort=v["captions"]),
            _cell(str(v["occurrences"]), sort=v["occurrences"]),
        ]
        for k, v in s["categories"].items()
    ]
    terms = [
        [
            _cell(t),
            _cell(v["category"]),
            _cell(str(v["captions"]), sort=v["captions"]),
            _cell(str(v["occurrences"]), sort=v["occurrences"]),
        ]
        for t, v in s["terms"].items()
    ]
    return (
        '<section id="sensitive"><h2>Sensitive terms</h2><p>Gender, age, ethnicity and religion words '
        "(the list is configurable with <code>--terms FILE</code>). A term in most captions will be learned "
        "as part of the subject; leave it out for a neutral LoRA, or balance it across the set.</p>"
        + _table(["category", "captions", "occurrences"], cats)
        + _list_table("Terms found", ["term", "category", "captions", "occurrences"], terms)
        + "</section>"
    )


def _images_section(d: dict[str, Any], groups: list[dict[str, Any]], thumbs: dict[str, str | None]) -> str:
    im = d["images"]
    if not im:
        return ""
    blocks = []
    for g in groups:
        shown = g["paths"][:MAX_GROUP_THUMBS]
        pics = "".join(
            '<figure class="tile small">'
            + (
                f'<img src="{thumbs[p]}" alt="{escape(p)}">'
                if thumbs.get(p)
                else '<div class="noimg">no preview</div>'
            )
            + f"<figcaption>{'<b>keep</b> ' if p == g['keep'] else ''}{escape(p)}</figcaption></figure>"
            for p in shown
        )
        extra = len(g["paths"]) - len(shown)
        kind = "identical files" if g["exact"] else f"up to {g['max_distance']} bits apart"
        blocks.append(
            f'<div class="group"><div class="muted">{len(g["paths"])} images, {kind}'
            f'{f", {extra} more" if extra > 0 else ""}</div><div class="tiles">{pics}</div></div>'
        )
    hidden = len(im["duplicate_groups"]) - len(groups)
    res = column_chart(
        [b["label"] for b in im["resolution_histogram"]],
        [b["count"] for b in im["resolution_histogram"]],
        title="shorter side",
    )
    asp = column_chart(
        [b["label"] for b in im["aspect_histogram"]],
        [b["count"] for b in im["aspect_histogram"]],
        title="aspect ratio",
    )
    b = im["buckets"]
    buckets = [
        [
            _cell(f"{x['width']}×{x['height']}", sort=x["width"] / x["height"]),
            _cell(str(x["count"]), sort=x["count"], bad=x["count"] == 1),
        ]
        for x in b["buckets"]
    ]
    small = [
        [_cell(x["path"]), _cell(f"{x['width']}×{x['height']}", sort=min(x["width"], x["height"]))]
        for x in im["small"]
    ]
    errors = [[_cell(e["path"]), _cell(e["reason"])] for e in im["errors"]]
    return (
        f'<section id="images"><h2>Images</h2><h3>Duplicate groups ({len(im["duplicate_groups"])})</h3>'
        "<p>Perceptual-hash neighbours and byte-identical files: a duplicate is trained twice as often as "
        "its neighbours. Keep the one marked <b>keep</b> (most pixels).</p>"
        + ("".join(blocks) or "<p>none</p>")
        + (f'<p class="muted">{hidden} more group(s) in report.json</p>' if hidden > 0 else "")
        + f'<div class="charts"><figure>{res}<figcaption>shorter side (px)</figcaption></figure>'
        f"<figure>{asp}<figcaption>aspect ratio (width:height)</figcaption></figure></div>"
        + _list_table(
            f"Below {im['min_side']} px on the shorter side (upscaled in training: blurry)",
            ["image", "size"],
            small,
        )
        + "<h3>Buckets</h3><p>Where kohya's aspect-ratio bucketing puts each image at resolution "
        f"{b['resolution']} (steps of {b['bucket_reso_steps']}, "
        f"{b['min_bucket_reso']}–{b['max_bucket_reso']} px"
        f"{', no upscale' if b['no_upscale'] else ''}). A bucket with one image trains it in batches of one."
        "</p>"
        + _table(["bucket", "images"], buckets)
        + _list_table("Unreadable images", ["image", "reason"], errors)
        + "</section>"
    )


def _dataset_section(d: dict[str, Any]) -> str:
    ds = d["dataset"]
    problems = [[_cell(p["path"]), _cell(p["reason"])] for p in ds["problems"]]
    clip_errors = [[_cell(e["path"]), _cell(e["reason"])] for e in (d["clip"] or {}).get("errors", [])]
    return (
        '<section id="dataset"><h2>Files</h2>'
        + _list_table("Images without a caption", ["image"], [[_cell(p)] for p in ds["missing"]])
        + _list_table("Captions without an image", ["caption"], [[_cell(p)] for p in ds["orphans"]])
        + _list_table("Caption files that could not be read", ["file", "reason"], problems)
        + _list_table("Pairs that could not be scored", ["image", "reason"], clip_errors)
        + "</section>"
    )


# --- tables ----------------------------------------------------------------------------------------------


def _cell(text: str, *, sort: float | None = None, bad: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in (cls, "bad" if bad else "") if c)
    attrs = (f' data-v="{sort:g}"' if sort is not None else "") + (f' class="{classes}"' if classes else "")
    return f"<td{attrs}>{escape(text)}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, filterable: bool = False) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    search = (
        '<input class="filter" type="search" placeholder="filter…" aria-label="filter rows">'
        if filterable
        else ""
    )
    table = f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'{search}<div class="scroll">{table}</div>'


def _list_table(title: str, headers: Sequence[str], rows: list[Sequence[str]]) -> str:
    if not rows:
        return f'<h3>{escape(title)}</h3><p class="muted">none</p>'
    return f"<h3>{escape(title)} ({len(rows)})</h3>{_table(headers, rows)}"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _count(value: int | None) -> str:
    """A count, or "–" where it was not counted (token counts without a tokenizer)."""
    return "–" if value is None else str(value)


_CSS = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 64px}
h1{margin:8px 0 0;font-size:26px}
h2{margin:36px 0 8px;font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#777}code{background:#eceef2;padding:0 4px;border-radius:3px}
nav{margin:10px 0;display:flex;flex-wrap:wrap;gap:10px}nav a{color:#2f5d8a;text-decoration:none}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0}.fail{background:#fde2e1;color:#8a1c17}
.pass{background:#dff3e4;color:#1d5e2e}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:10px;margin-top:14px}
.card{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0001}
.card .num{font-size:24px;font-weight:600}.card .label{color:#666;font-size:12px}.card.bad .num{color:#c62828}
.tiles{display:flex;flex-wrap:wrap;gap:12px}.tile{margin:0;width:220px;background:#fff;border-radius:8px;
padding:8px;box-shadow:0 1px 2px #0001}.tile img{max-width:100%;max-height:180px;display:block;margin:auto}
.tile.small{width:170px}
.noimg{height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.tile .cap{font-size:12px;color:#444;max-height:9em;overflow:auto}
.score{font-weight:700}.score.bad,td.bad{color:#c62828}
.group{margin:10px 0;padding:8px;background:#fff;border-radius:8px}
figure{margin:8px 0}figcaption{font-size:12px;color:#666}.charts{display:flex;flex-wrap:wrap;gap:18px}
.scroll{max-height:480px;overflow:auto;background:#fff;border-radius:6px;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{position:sticky;top:0;background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap}
th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}td.cap{max-width:560px}
.filter{margin:6px 0;padding:4px 8px;width:260px}details{margin:8px 0}summary{cursor:pointer}
"""

# Sorting: numbers by data-v when present, text otherwise; filtering: rows containing the typed text.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var dir = th.dataset.dir === "asc" ? "desc" : "asc";
    table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = dir;
    function key(row) {
      var cell = row.cells[col];
      if (cell.dataset.v !== undefined) return parseFloat(cell.dataset.v);
      return cell.textContent.toLowerCase();
    }
    var rows = Array.prototype.slice.call(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b), cmp = x < y ? -1 : x > y ? 1 : 0;
      return dir === "asc" ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.querySelectorAll("input.filter").forEach(function (input) {
  var table = input.nextElementSibling.querySelector("table");
  input.addEventListener("input", function () {
    var q = input.value.toLowerCase();
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
    });
  });
});
"""
