"""`loracap report`: every dataset check in one run, written as report.html, report.json and a summary.

    rep = build_report("my_dataset", trigger="ohwx")      # read, score, check; writes nothing
    write_report(rep, "my_dataset/loracap-report")        # report.html + report.json
    rep = report("my_dataset", trigger="ohwx", fail_on=["truncated", "clip<20"])   # both, like the CLI
    rep = report("my_dataset", itm_model="Salesforce/blip-itm-base-coco", fail_on=["itm<0.5"])  # + BLIP ITM

`DatasetReport.data` is the JSON document: every number the HTML shows, with paths relative to the
dataset folder, so a script can gate on it or diff two runs.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import statistics
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracap.config import settings_for
from loracap.dataset import Dataset, caption_lines, read_dataset, store_file_label
from loracap.dataset.buckets import BucketSettings
from loracap.files import atomic_write_text
from loracap.hub import is_cached, resolve_model
from loracap.quality.balance import balance_prompts, rare_tags
from loracap.quality.clipscore import DEFAULT_MODEL, ClipScoreRun, clip_scores
from loracap.quality.explain import check_explain_model
from loracap.quality.gates import Rule, evaluate, parse_rules
from loracap.quality.images import ImageReport, image_report, resolve_side
from loracap.quality.itm import ItmRun, check_itm_model, itm_scores
from loracap.quality.text import TextReport, analyze_text

__all__ = [
    "DEFAULT_OUT_DIR",
    "DatasetReport",
    "build_report",
    "load_terms",
    "load_tokenizer",
    "report",
    "write_report",
]

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = "loracap-report"
EXPLAIN_DIR = "explain"  # inside the report's folder: the explain PNGs the page links to
SCORE_BIN = 5  # CLIP score histogram bin width (scores are 0..100)
ITM_BIN = 0.05  # ITM match probability histogram bin width (probabilities are 0..1)
ITM_LOW = 0.5  # below it the ITM head says "no match": counted in the summary


@dataclass
class DatasetReport:
    root: Path
    dataset: Dataset
    text: TextReport
    images: ImageReport | None
    clip: ClipScoreRun | None
    data: dict[str, Any]
    """The JSON document (see module docstring)."""
    rules: list[Rule] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """One line per broken --fail-on rule; empty when the dataset passes."""
    html_path: Path | None = None
    json_path: Path | None = None
    itm: ItmRun | None = None
    """The image-text matching run, when `itm_model` was given."""

    @property
    def checks(self) -> dict[str, int | None]:
        """Count per check; None for the token-based ones when the token checks were skipped."""
        return self.data["checks"]

    @property
    def passed(self) -> bool:
        return not self.failures


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from a hub id or a folder (a CLIP/SigLIP checkpoint, or a tokenizer folder such as
    google/t5-v1_1-xxl), found the same way models are, so offline mode gives the same one-line fix."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(spec))


def _on_this_machine(spec: str) -> bool:
    """Whether `spec` loads without the network: an existing path, or a hub id already in the HF cache."""
    if Path(spec).expanduser().exists():
        return True
    try:
        return is_cached(spec)
    except ValueError:  # not a hub id (e.g. a path that does not exist): nothing to find
        return False


def _pick_tokenizer(tokenizer: str | None, clip_model: str, clip: bool) -> tuple[str | None, str | None]:
    """(what counts tokens, None) or (None, why the token checks are skipped).

    Scoring downloads `clip_model` anyway, so its tokenizer comes along. Without scoring, fetching a whole
    CLIP checkpoint (or timing out offline) only for token counts is not worth it: use it if it is here.
    """
    if tokenizer:
        return tokenizer, None
    if clip or _on_this_machine(clip_model):
        return clip_model, None
    return None, (
        f"CLIP scoring is off and {clip_model} is not on this machine, so no tokenizer was loaded; "
        "pass --tokenizer ID_OR_FOLDER for token counts and the trigger fusion check"
    )


def load_terms(path: str | Path) -> dict[str, list[str]]:
    """A sensitive-term list from TOML: one array per category, e.g. `gender = ["woman", "man"]`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read term list {path}: {exc}") from exc
    bad = [k for k, v in data.items() if not (isinstance(v, list) and all(isinstance(t, str) for t in v))]
    if bad:
        raise ValueError(f"{path}: each category must be a list of strings; not so for {', '.join(bad)}")
    return data


@dataclass
class ReportConfig:
    """Every setting of `loracap report`: from its flags, a TOML file (`--config`) or code (see
    loracap.config). `loracap report --help` says what each does."""

    dir: str | Path | None = None
    out: str | Path | None = None
    """Where report.html and report.json go (default: DIR/loracap-report)."""
    thumbnails: int = 24
    layout: str = "auto"
    ext: str = ".txt"
    metadata_file: str | Path | None = None
    recursive: bool = True
    clip_model: str = DEFAULT_MODEL
    clip: bool = True
    itm_model: str | None = None
    """A BLIP image-text matching checkpoint (e.g. Salesforce/blip-itm-base-coco): each pair also gets its
    match probability ("itm" in report.json). Off when None."""
    explain_model: str | None = None
    """A BLIP, ViT-GPT2 or Florence-2 captioner: for each image of the captions to check first, a PNG of
    where it looked for each word of its own caption (`loracap explain`), in OUT/explain/ and linked from
    the page ("explain" in report.json). Off when None."""
    tokenizer: str | None = None
    t5_tokenizer: str | None = None
    t5_max_length: int = 512
    max_length: int | None = None
    trigger: str | None = None
    terms: str | Path | None = None
    """A TOML file of sensitive terms (see `load_terms`); `sensitive_terms` gives them directly."""
    sensitive_terms: Mapping[str, Iterable[str]] | None = None
    near_threshold: float = 0.8
    common_share: float = 0.9
    images: bool = True
    min_side: int | str = 1024
    resolution: int | str = 1024
    """Training resolution of the bucket preview (pixels, or sd15 / sdxl / flux)."""
    min_bucket_reso: int | None = None
    """Bucket limits and steps as `loracap dreambooth` takes them (defaults: min(256, resolution),
    2 x resolution, 64), so the preview is the trainer's assignment."""
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    hash_threshold: int | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    workers: int = 2
    threads: int | None = None
    """Torch threads for CLIP and ITM scoring (None: the CPUs this process may use less the decode
    threads)."""
    cache: bool = True
    cache_path: str | Path | None = None
    """The score cache (default: clipscore-cache.json and itm-cache.json in loracap's cache folder); when
    given, CLIP and ITM scores share this one file."""
    fail_on: Sequence[str] = ()
    rare_below: int | None = None
    """List the tags (words, for prose) in fewer than this many captions: under-represented."""
    balance_prompts: str | Path | None = None
    """Write prompts for the rare tags there, one per missing image (needs rare_below)."""
    progress: bool = True

    def __post_init__(self) -> None:
        # "1024" from a flag or a file is a size; "sdxl" a preset.
        self.min_side, self.resolution = (
            int(v) if isinstance(v, str) and v.isdigit() else v for v in (self.min_side, self.resolution)
        )
        if self.sensitive_terms is None and self.terms is not None:
            self.sensitive_terms = load_terms(self.terms)


def report_config(config: ReportConfig | str | Path | None = None, **settings: Any) -> ReportConfig:
    """A ReportConfig: `config` itself, or one for the folder `config` with `settings` (flat names)."""
    return settings_for(ReportConfig, config, settings, first="dir", where="report settings")


def build_report(config: ReportConfig | str | Path, **settings: Any) -> DatasetReport:
    """Run every check on a dataset: `build_report(ReportConfig(...))`, or the folder with keyword
    settings (`build_report("data", clip=False, trigger="ohwx")`; `loracap report --help` says what each
    does). Nothing is written (see `write_report`).

    Token counts use `tokenizer` (default: `clip_model`'s, the CLIP window SD 1.x/SDXL train with), plus
    `t5_tokenizer` when given (Flux/SD3). With `clip=False` and no `tokenizer`, `clip_model`'s is used only
    when it is a folder or already in the Hugging Face cache; otherwise the token checks are skipped
    (`data["tokens"]` is `{"skipped": why}`, their counts None). `fail_on` rules are parsed before any work.
    """
    config = report_config(config, **settings)
    if config.dir is None:
        raise ValueError("no dataset folder: give DIR (or dir = ... in the --config file)")
    tok_name, skipped = _pick_tokenizer(config.tokenizer, config.clip_model, config.clip)
    rules = parse_rules(
        config.fail_on,
        trigger=bool(config.trigger),
        clip=config.clip,
        tokens=tok_name is not None,
        itm=bool(config.itm_model),
    )
    if config.itm_model:  # found (downloaded once) and checked now, not after an hour of CLIP scoring
        check_itm_model(config.itm_model)
    if config.explain_model:  # the same: a model explain cannot read is said before any work
        check_explain_model(config.explain_model)
    if config.t5_tokenizer and tok_name is None:
        raise ValueError(
            f"--t5-tokenizer counts T5 tokens next to the CLIP window, which is skipped: {skipped}"
        )
    root = Path(config.dir)
    started = time.perf_counter()
    ds = read_dataset(
        root,
        layout=config.layout,
        ext=config.ext,
        metadata_file=config.metadata_file,
        recursive=config.recursive,
    )
    read_seconds = time.perf_counter() - started
    tok = load_tokenizer(tok_name) if tok_name else None
    t5 = load_tokenizer(config.t5_tokenizer) if config.t5_tokenizer else None
    tokenizer_seconds = time.perf_counter() - started - read_seconds
    captions = ds.captions
    started = time.perf_counter()
    text = analyze_text(
        captions,
        tok,
        trigger=config.trigger,
        t5_tokenizer=t5,
        t5_max_length=config.t5_max_length,
        max_length=config.max_length,
        near_threshold=config.near_threshold,
        common_share=config.common_share,
        sensitive_terms=config.sensitive_terms,
    )
    text_seconds = time.perf_counter() - started
    started = time.perf_counter()
    img = (
        image_report(
            ds.images,
            min_side=config.min_side,
            buckets=BucketSettings.at(
                resolve_side(config.resolution),
                min_bucket_reso=config.min_bucket_reso,
                max_bucket_reso=config.max_bucket_reso,
                bucket_reso_steps=config.bucket_reso_steps,
                no_upscale=config.bucket_no_upscale,
            ),
            threshold=config.hash_threshold,
            workers=config.workers,
            progress=config.progress,
        )
        if config.images
        else None
    )
    image_seconds = time.perf_counter() - started
    run = None
    # read_dataset strips every caption, so an empty one is "".
    # Each line of a caption is an alternative a trainer draws on its own: each is scored, and an image
    # gets the mean of its lines (`_by_image`).
    scorable = [(path, line) for path, caption in ds.pairs for line in caption_lines(caption)]
    # The image checks hashed every decodable file already: the cache keys use the same digest.
    digests = {i.path: i.sha256 for i in img.images} if img else None
    scoring = {
        "device": config.device,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "workers": config.workers,
        "threads": config.threads,
        "cache": config.cache,
        "cache_path": config.cache_path,
        "progress": config.progress,
        "digests": digests,
    }
    if config.clip:
        run = clip_scores(scorable, model=config.clip_model, **scoring)
    matched = itm_scores(scorable, model=config.itm_model, **scoring) if config.itm_model else None
    scores = [s.value for s in _by_image(run.pairs, "score").values() if s.value is not None] if run else []
    probabilities = (
        [s.value for s in _by_image(matched.pairs, "probability").values() if s.value is not None]
        if matched
        else []
    )
    started = time.perf_counter()
    data = _document(
        ds,
        text,
        img,
        run,
        scores,
        tokenizer=tok_name,
        t5_tokenizer=config.t5_tokenizer,
        skipped=skipped,
        itm=matched,
        probabilities=probabilities,
    )
    data["timing"] = {
        "image_checks_s": round(image_seconds, 3),
        "clip_s": data["clip"]["seconds"] if data["clip"] else None,  # the same number, kept for old readers
        # Where the rest of the time goes (report.json is written after it, so its writing is logged).
        "read_s": round(read_seconds, 3),
        "tokenizer_load_s": round(tokenizer_seconds, 3),
        "text_checks_s": round(text_seconds, 3),
        "text": _rounded(text.timing),
        "images": _rounded(img.timing) if img else None,
        "document_s": round(time.perf_counter() - started, 3),
    }
    if config.rare_below is not None:
        rare = rare_tags(text.tags.counts, config.rare_below)
        data["tags"]["rare"] = {"below": config.rare_below, "tags": [{"tag": t, "count": n} for t, n in rare]}
    failures = evaluate(rules, data["checks"], scores, probabilities)
    data["fail_on"] = {"rules": [str(r) for r in rules], "failed": failures}
    return DatasetReport(root, ds, text, img, run, data, rules, failures, itm=matched)


def write_report(rep: DatasetReport, out: str | Path | None = None, *, thumbnails: int = 24) -> Path:
    """Write report.html and report.json into `out` (default `<root>/loracap-report`); returns the folder."""
    from loracap.quality.html import render_html

    folder = _folder(rep, out)
    folder.mkdir(parents=True, exist_ok=True)
    rep.json_path = folder / "report.json"
    rep.html_path = folder / "report.html"
    for path, render in (
        (rep.json_path, lambda: json.dumps(rep.data, indent=1, ensure_ascii=False) + "\n"),
        (rep.html_path, lambda: render_html(rep.data, rep.root, thumbnails=thumbnails)),
    ):
        started = time.perf_counter()
        atomic_write_text(path, render())
        log.debug("wrote %s in %.3f s", path.name, time.perf_counter() - started)  # after report.json's times
    return folder


def report(config: ReportConfig | str | Path, **settings: Any) -> DatasetReport:
    """`build_report` then `write_report` (to `out`, with `thumbnails`): what `loracap report DIR` does,
    minus the terminal summary."""
    config = report_config(config, **settings)
    if config.balance_prompts is not None and config.rare_below is None:
        raise ValueError(
            "--balance-prompts needs --rare-below N: prompts for the tags in fewer than N captions"
        )
    rep = build_report(config)
    if config.balance_prompts is not None:
        write_balance_prompts(rep, config)
    if config.explain_model:
        write_explanations(rep, config)
    write_report(rep, config.out, thumbnails=config.thumbnails)
    return rep


def _folder(rep: DatasetReport, out: str | Path | None) -> Path:
    """Where the report's files go: `out`, or DIR/loracap-report."""
    return Path(out) if out is not None else rep.root / DEFAULT_OUT_DIR


def write_explanations(rep: DatasetReport, config: ReportConfig) -> Path:
    """The explain PNGs of `config.explain_model` for the images the page shows first (its "captions to
    check first" tiles), in OUT/explain/; what was written is `rep.data["explain"]`. Returns the folder."""
    from loracap.quality.explain import Explainer, explain_files
    from loracap.quality.html import worst_pairs

    folder = _folder(rep, config.out) / EXPLAIN_DIR
    paths = [p["path"] for p in worst_pairs(rep.data, config.thumbnails)]
    explainer = Explainer(config.explain_model, device=config.device, dtype=config.dtype)
    done = explain_files(explainer, rep.root, paths, folder, progress=config.progress)
    rep.data["explain"] = {
        "model": config.explain_model,
        "images": [
            {"path": path, "file": f"{EXPLAIN_DIR}/{name}", "caption": done.captions[path]}
            for path, name in done.files.items()
        ],
        "errors": [{"path": path, "reason": reason} for path, reason in done.errors.items()],
    }
    return folder


def write_balance_prompts(rep: DatasetReport, config: ReportConfig) -> Path:
    """The prompts for the report's rare tags, one a line, with the trigger where the dataset uses one (in
    at least half of its captions)."""
    trigger = config.trigger
    section = rep.data.get("trigger") or {}
    if trigger and section.get("captions") and section.get("with_trigger", 0) * 2 < section["captions"]:
        trigger = None
    rare = [(r["tag"], r["count"]) for r in rep.data["tags"]["rare"]["tags"]]
    prompts = balance_prompts(
        rare, config.rare_below, tags=rep.data["tags"]["mode"] == "tags", trigger=trigger
    )
    path = Path(config.balance_prompts)
    atomic_write_text(path, "".join(f"{p}\n" for p in prompts))
    rep.data["tags"]["rare"]["prompts"] = {"file": str(path), "count": len(prompts)}
    return path


# --- the JSON document ---------------------------------------------------------------------------------


def _document(
    ds: Dataset,
    text: TextReport,
    img: ImageReport | None,
    run: ClipScoreRun | None,
    scores: list[float],
    *,
    tokenizer: str | None,
    t5_tokenizer: str | None,
    skipped: str | None = None,
    itm: ItmRun | None = None,
    probabilities: Sequence[float] = (),
) -> dict[str, Any]:
    """The report.json document; `scores`: the CLIP scores of the pairs that have one; `skipped`: why the
    token checks were skipped, if they were (their numbers are then None, never 0: "none truncated" would
    be a claim); `itm` and `probabilities`: the ITM run and its match probabilities, when there is one."""
    from importlib.metadata import version

    root = ds.root
    # How the writers name files, so a relative --metadata-file reads "metadata.jsonl" here as it does in
    # the dataset's problems, not "ds/metadata.jsonl".
    rel = functools.partial(store_file_label, root=root)
    paths = [rel(p) for p, _ in ds.pairs]
    captions = ds.captions
    tokens = text.tokens
    by_path = {rel(path): s for path, s in _by_image(run.pairs, "score").items()} if run else {}
    itm_by_path = {rel(path): s for path, s in _by_image(itm.pairs, "probability").items()} if itm else {}

    pairs = []
    truncated = set(tokens.truncated) if tokens else set()
    empty = set(tokens.empty) if tokens else {i for i, c in enumerate(captions) if not c.strip()}
    fused = set(text.trigger.fused) | set(text.trigger.glued) if text.trigger else set()
    without = set(text.trigger.without) if text.trigger else set()
    for i, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        scored, matched = by_path.get(path), itm_by_path.get(path)
        pairs.append(
            {
                "path": path,
                "caption": caption,
                "clip": _round(scored.value) if scored else None,
                "clip_error": scored.error if scored else None,
                "itm": _round(matched.value, 4) if matched else None,
                "itm_error": matched.error if matched else None,
                "tokens": tokens.counts[i] if tokens else None,
                "t5_tokens": tokens.t5_counts[i] if tokens and tokens.t5_counts else None,
                "truncated": i in truncated if tokens else None,
                "empty": i in empty,
                "trigger": None
                if not text.trigger
                else ("fused" if i in fused else "missing" if i in without else "ok"),
            }
        )
        if scored and len(scored.lines) > 1:  # alternatives: the page shows the mean, these say which
            pairs[-1]["clip_lines"] = [_round(v) for v in scored.lines]
    # Lowest CLIP score first (the captions to fix), unscored pairs last; lowest ITM first without CLIP.
    order = "clip" if run or not itm else "itm"
    pairs.sort(key=lambda p: (p[order] is None, p[order] if p[order] is not None else 0.0, p["path"]))

    trig = text.trigger
    checks = {
        "missing-caption": len(ds.missing),
        "orphan-caption": len(ds.orphans),
        "caption-error": len(ds.problems),
        "empty-caption": len(empty),
        "truncated": len(tokens.truncated) if tokens else None,
        "t5-truncated": len(tokens.t5_truncated) if tokens else None,
        "duplicate-caption": len(text.duplicates.exact),
        "near-duplicate-caption": len(text.duplicates.near),
        "duplicate-image": len(img.duplicate_groups) if img else 0,
        "small-image": len(img.small_images) if img else 0,
        "image-error": len(img.errors) if img else 0,
        "single-image-bucket": len(img.single_image_buckets) if img else 0,
        "common-tag": len(text.tags.common),
        "sensitive-term": sum(c.occurrences for c in text.sensitive.terms.values()),
        "no-trigger": len(trig.without) if trig else 0,
        "fused-trigger": len(fused) if tokens else None,
        "clip-error": run.failed if run else 0,
        "itm-error": itm.failed if itm else 0,
    }
    return {
        "loracap_version": version("loracap"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "root": str(root),
        "checks": checks,
        "dataset": {
            "layout": ds.layout,
            "source": rel(ds.source) if ds.source else None,
            "images": ds.image_count,
            "captioned": len(ds.pairs),
            "missing": [rel(p) for p in ds.missing],
            "orphans": list(ds.orphans),
            "problems": [{"path": p.path, "reason": p.reason} for p in ds.problems],
        },
        "clip": _clip_section(run, scores, rel),
        "itm": _itm_section(itm, probabilities, rel),
        "pairs": pairs,
        "tokens": _token_section(tokens, paths, tokenizer, t5_tokenizer) if tokens else {"skipped": skipped},
        "duplicates": {
            "threshold": text.duplicates.threshold,
            "exact": [
                {"paths": [paths[i] for i in g.indices], "caption": captions[g.indices[0]]}
                for g in text.duplicates.exact
            ],
            "near": [
                {
                    "paths": [paths[i] for i in g.indices],
                    "similarity": _round(g.similarity, 3),
                    "captions": [captions[i] for i in g.indices],
                }
                for g in text.duplicates.near
            ],
        },
        "trigger": _trigger_section(trig, paths, captions) if trig else None,
        "tags": _tag_section(text),
        "sensitive": {
            "categories": {
                k: {"occurrences": v.occurrences, "captions": v.captions}
                for k, v in text.sensitive.categories.items()
            },
            "terms": {
                term: {
                    "category": text.sensitive.category_of[term],
                    "occurrences": c.occurrences,
                    "captions": c.captions,
                }
                for term, c in sorted(
                    text.sensitive.terms.items(), key=lambda kv: (-kv[1].occurrences, kv[0])
                )
            },
        },
        "images": _image_section(img, rel) if img else None,
    }


@dataclass(frozen=True)
class _ImageScore:
    """An image's CLIP score (or ITM probability) over its caption's lines, each scored on its own."""

    value: float | None
    """The mean of its lines' values: what training sees on average, drawing one line at a time."""
    error: str | None
    lines: list[float | None]


def _by_image(pairs: Sequence[Any], value: str) -> dict[Path, _ImageScore]:
    """Scored pairs (one per caption line) gathered per image, in input order."""
    groups: dict[Path, list[Any]] = {}
    for pair in pairs:
        groups.setdefault(pair.path, []).append(pair)
    images = {}
    for path, group in groups.items():
        values = [getattr(p, value) for p in group]
        known = [v for v in values if v is not None]
        error = next((p.error for p in group if p.error is not None), None)
        images[path] = _ImageScore(statistics.fmean(known) if known else None, error, values)
    return images


def _rounded(timing: Mapping[str, float]) -> dict[str, float]:
    return {name: round(seconds, 3) for name, seconds in timing.items()}


def _round(value: float | None, digits: int = 2) -> float | None:
    if value is None or isinstance(value, int):  # token counts stay whole numbers
        return value
    return round(float(value), digits)


def _stats(values: Sequence[float], digits: int = 2) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None, "p05": None, "p95": None}
    ordered = sorted(values)
    q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]  # noqa: E731 - nearest-rank
    return {
        "mean": _round(statistics.fmean(ordered), digits),
        "median": _round(statistics.median(ordered), digits),
        "min": _round(ordered[0], digits),
        "max": _round(ordered[-1], digits),
        "p05": _round(q(0.05), digits),
        "p95": _round(q(0.95), digits),
    }


def _clip_section(run: ClipScoreRun | None, scores: list[float], rel) -> dict[str, Any] | None:
    if run is None:
        return None
    histogram = [0] * (100 // SCORE_BIN)
    for s in scores:
        histogram[min(int(s // SCORE_BIN), len(histogram) - 1)] += 1
    return {
        "model": run.model,
        "scored": len(scores),
        "computed": run.computed,
        "cached": run.cached,
        "failed": run.failed,
        "truncated": run.truncated,
        "seconds": round(run.seconds, 3),
        **_stats(scores),
        "histogram": {"bin_width": SCORE_BIN, "counts": histogram},
        "errors": [{"path": rel(e.path), "reason": e.error} for e in run.errors],
    }


def _itm_section(itm: ItmRun | None, probabilities: Sequence[float], rel) -> dict[str, Any] | None:
    if itm is None:
        return None
    bins = round(1 / ITM_BIN)
    histogram = [0] * bins
    for p in probabilities:
        histogram[min(int(p * bins), bins - 1)] += 1
    return {
        "model": itm.model,
        "scored": len(probabilities),
        "below": {"threshold": ITM_LOW, "count": sum(p < ITM_LOW for p in probabilities)},
        "computed": itm.computed,
        "cached": itm.cached,
        "failed": itm.failed,
        "truncated": itm.truncated,
        "seconds": round(itm.seconds, 3),
        **_stats(probabilities, 4),
        "histogram": {"bin_width": ITM_BIN, "counts": histogram},
        "errors": [{"path": rel(e.path), "reason": e.error} for e in itm.errors],
    }


def _token_section(tokens, paths: list[str], tokenizer: str, t5_tokenizer: str | None) -> dict[str, Any]:
    section = {
        "tokenizer": tokenizer,
        "max_length": tokens.max_length,
        "content_limit": tokens.content_limit,
        **_stats(tokens.counts),
        "counts": dict(zip(paths, tokens.counts, strict=True)),
        "truncated": [{"path": paths[i], "tokens": tokens.counts[i]} for i in tokens.truncated],
        "empty": [paths[i] for i in tokens.empty],
        "t5": None,
    }
    if tokens.t5_counts is not None:
        section["t5"] = {
            "tokenizer": t5_tokenizer,
            "max_length": tokens.t5_max_length,
            **_stats(tokens.t5_counts),
            "truncated": [{"path": paths[i], "tokens": tokens.t5_counts[i]} for i in tokens.t5_truncated],
        }
    return section


def _trigger_section(trig, paths: list[str], captions: list[str]) -> dict[str, Any]:
    fused_hits = [h for h in trig.hits if h.fused or h.glued]
    return {
        "trigger": trig.trigger,
        "tokens": trig.trigger_tokens,
        "with_trigger": trig.with_trigger,
        "captions": len(captions),
        "positions": dict(trig.positions),
        "without": [paths[i] for i in trig.without],
        "fused": [
            {
                "path": paths[h.index],
                "text": _context(captions[h.index], h.start, h.end),
                "spelled": h.text,
                "tokens": h.tokens,
                "glued": h.glued,
            }
            for h in fused_hits
        ],
        "case_mismatch": [paths[i] for i in trig.case_mismatch],
    }


def _context(caption: str, start: int, end: int, margin: int = 20) -> str:
    """The match with a little text either side, so the fusion is visible in a table cell."""
    left = max(0, start - margin)
    right = min(len(caption), end + margin)
    return ("…" if left else "") + caption[left:right] + ("…" if right < len(caption) else "")


def _tag_section(text: TextReport) -> dict[str, Any]:
    tags = text.tags
    ranked = sorted(tags.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "mode": tags.mode,
        "captions": tags.captions,
        "distinct": len(tags.counts),
        "gini": _round(tags.gini, 4),
        "entropy": _round(tags.entropy, 4),
        "top_k": tags.top_k,
        "top_k_share": _round(tags.top_k_share, 4),
        "common": [{"tag": t, "share": _round(share, 4)} for t, share in tags.common],
        "singletons": tags.singletons,
        "counts": dict(ranked),
    }


def _image_section(img: ImageReport, rel) -> dict[str, Any]:
    s = img.bucket_settings
    return {
        "scanned": len(img.images) + len(img.errors),
        "errors": [{"path": rel(e.path), "reason": e.reason} for e in img.errors],
        "min_side": img.min_side,
        "small": [{"path": rel(i.path), "width": i.width, "height": i.height} for i in img.small_images],
        "duplicate_groups": [
            {
                "paths": [rel(p) for p in g.paths],
                "exact": g.exact,
                "max_distance": g.max_distance,
                "keep": rel(g.keep),
            }
            for g in img.duplicate_groups
        ],
        "resolution_histogram": [{"label": b.label, "count": b.count} for b in img.resolution_histogram],
        "aspect_histogram": [{"label": b.label, "count": b.count} for b in img.aspect_histogram],
        "buckets": {
            "resolution": s.resolution,
            "min_bucket_reso": s.min_bucket_reso,
            "max_bucket_reso": s.max_bucket_reso,
            "bucket_reso_steps": s.bucket_reso_steps,
            "no_upscale": s.no_upscale,
            "buckets": [{"width": b.width, "height": b.height, "count": b.count} for b in img.buckets],
            "single_image": [rel(b.paths[0]) for b in img.single_image_buckets],
        },
    }


# --- terminal summary ------------------------------------------------------------------------------------


def summary_lines(rep: DatasetReport) -> list[str]:
    """The short summary `loracap report` prints: one line per section, problems first in each."""
    d, c = rep.data, rep.checks
    ds = d["dataset"]
    source = f"{ds['layout']} {ds['source']}" if ds["source"] else ds["layout"]
    lines = [
        f"{ds['images']} images, {ds['captioned']} captioned ({source}); "
        f"{c['missing-caption']} without caption, {c['orphan-caption']} caption(s) without image"
    ]
    if d["clip"]:
        clip = d["clip"]
        if clip["scored"]:
            worst = d["pairs"][0]
            lines.append(
                f"CLIP score ({clip['model']}): mean {clip['mean']:.1f}, lowest {clip['min']:.1f} "
                f"({worst['path']}); {clip['computed']} computed, {clip['cached']} cached "
                f"in {clip['seconds']:.1f}s"
            )
        else:
            lines.append(f"CLIP score ({clip['model']}): nothing scored")
    if d["itm"]:
        itm = d["itm"]
        if itm["scored"]:
            worst = min((p for p in d["pairs"] if p["itm"] is not None), key=lambda p: (p["itm"], p["path"]))
            below = itm["below"]
            lines.append(
                f"ITM match ({itm['model']}): mean {itm['mean']:.3f}, lowest {itm['min']:.3f} "
                f"({worst['path']}), {below['count']} below {below['threshold']:g}; {itm['computed']} "
                f"computed, {itm['cached']} cached in {itm['seconds']:.1f}s"
            )
        else:
            lines.append(f"ITM match ({itm['model']}): nothing scored")
    t = d["tokens"]
    if "skipped" in t:
        lines.append(f"tokens: {c['empty-caption']} empty; token checks skipped: {t['skipped']}")
    else:
        lines.append(
            f"tokens ({t['max_length']}-token window): {c['truncated']} truncated, "
            f"{c['empty-caption']} empty, longest {t['max'] if t['max'] is not None else 0}"
            + (f"; T5 ({t['t5']['max_length']}): {c['t5-truncated']} truncated" if t["t5"] else "")
        )
    lines.append(
        f"duplicates: {c['duplicate-caption']} identical caption group(s), "
        f"{c['near-duplicate-caption']} near; {c['duplicate-image']} image group(s)"
    )
    if d["trigger"]:
        tr = d["trigger"]
        if c["fused-trigger"] is None:  # no tokenizer: only a trigger glued into a longer word is known
            glued = sum(p["trigger"] == "fused" for p in d["pairs"])
            fusion = f"{glued} glued to a word (tokenizer fusion not checked)"
        else:
            fusion = f"{c['fused-trigger']} fused with neighbouring text"
        lines.append(
            f"trigger {tr['trigger']!r}: in {tr['with_trigger']}/{tr['captions']} captions, {fusion}"
        )
    tags = d["tags"]
    common = ", ".join(x["tag"] for x in tags["common"][:5]) or "none"
    lines.append(
        f"{tags['mode']}: {tags['distinct']} distinct, {len(tags['singletons'])} seen once, "
        f"in ~every caption: {common}; gini {tags['gini']:.2f}"
    )
    if "rare" in tags:
        rare = tags["rare"]
        names = ", ".join(f"{r['tag']} ({r['count']})" for r in rare["tags"][:8]) or "none"
        more = f" and {len(rare['tags']) - 8} more" if len(rare["tags"]) > 8 else ""
        lines.append(f"rare (in fewer than {rare['below']} captions): {names}{more}")
        if "prompts" in rare:
            lines.append(f"balance prompts: {rare['prompts']['count']} written to {rare['prompts']['file']}")
    if d.get("explain"):
        ex = d["explain"]
        failed = f", {len(ex['errors'])} failed" if ex["errors"] else ""
        lines.append(f"explain ({ex['model']}): {len(ex['images'])} image(s) in {EXPLAIN_DIR}/{failed}")
    if d["images"]:
        im = d["images"]
        lines.append(
            f"images: {c['small-image']} below {im['min_side']} px, {c['image-error']} unreadable, "
            f"{len(im['buckets']['buckets'])} bucket(s), {c['single-image-bucket']} holding one image"
        )
    return lines
