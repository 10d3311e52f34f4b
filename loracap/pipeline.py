"""Caption a folder: find images, skip what is done, decode ahead of the model, write as we go.

The model only ever sees batches of decoded images (`backend.prepare` + `backend.generate`); walking
folders, decoding and writing stay here, so the same batch step can run in a server or a Ray actor.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .backends.base import Backend, BackendError, GenerationSettings, join_alternatives, per_image
from .backends.batch_size import BatchSize, is_out_of_memory, parse_batch_size
from .backends.resources import parse_threads, use_threads
from .config import parts, settings_for
from .dataset import open_store, sidecar_collisions
from .files import atomic_write_text, read_regular_bytes
from .inputs import (
    DecodedBatch,
    content_fingerprint,
    decode_batch,
    find_images,
    load_image,
    map_ahead,
    register_optional_formats,
    remove_stale_temp_files,
)
from .postprocess import PostProcess, merge_captions, postprocess
from .request import CaptionRequest, StyleChoice, resolve_request
from .styles import Style

log = logging.getLogger(__name__)

EXISTING_POLICIES = ("skip", "overwrite", "prepend", "append")
# Write errors that no other file in the folder would escape: the run stops at the first one.
_NOTHING_MORE_FITS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
FORMATS = ("sidecar", "jsonl", "kohya-json")
ENGINES = ("local", "ray", "vllm", "ray-vllm", "onnx")


@dataclass
class FileError:
    path: str
    stage: str  # layout | decode | caption | write
    reason: str
    fingerprint: str | None = None
    """For a file that could not be decoded: what it held (`content_fingerprint`), so the next run knows
    it again while it is unchanged instead of loading a model to fail on it once more."""


@dataclass
class RunSummary:
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    failed_before: int = 0
    """Of `failed`: files the last run could not decode either, unchanged since, so not tried again."""
    seconds: float = 0.0
    model: str = ""
    errors_file: str | None = None
    errors: list[FileError] = field(default_factory=list)
    write_error: str | None = None
    """Why the run stopped writing (a full disk, a read-only folder): it stopped there."""
    saved_elsewhere: str | None = None
    """The folder holding what could not be written, laid out as the dataset: copy it over the dataset."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.write_error is None

    def describe(self) -> str:
        rate = self.captioned / self.seconds if self.seconds > 0 else 0.0
        again = f" ({self.failed_before} as before: unchanged, not retried)" if self.failed_before else ""
        text = (
            f"{self.captioned} captioned, {self.skipped} skipped (already captioned), {self.failed} failed"
            f"{again} of {self.total} images in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )
        if self.errors_file:
            text += f"; errors listed in {self.errors_file}"
        return text

    def write_problem(self) -> str | None:
        """One line on a run that could not write, and where its captions went; None if it could."""
        if self.write_error is None:
            return None
        if self.saved_elsewhere:
            kept = f"what it could not write is in {self.saved_elsewhere}: copy that into the dataset folder"
        else:
            kept = "they could not be saved anywhere else either; a re-run captions them again"
        return f"cannot write captions ({self.write_error}), so the run stopped; {kept}"


@dataclass
class _Item:
    path: Path
    old: str | None  # existing caption, kept for prepend/append


@dataclass
class CaptionConfig:
    """Every setting of `loracap caption`: from its flags, a TOML file (`--config`) or code.

    Flat names as the flags have them; the caption style, the clean-up and the decoding settings are
    parts (`style_choice`, `postprocess`, `generation`) whose fields are settings too (see loracap.config).
    """

    dir: str | Path | None = None
    """The folder of images; with engine "ray" also webdataset shards, parquet or a Hugging Face dataset."""
    model: str | None = None
    """Hub id, local folder, cached id, or openai:MODEL; None: chosen by free accelerator memory."""
    style_choice: StyleChoice = field(default_factory=StyleChoice)
    postprocess: PostProcess = field(default_factory=PostProcess)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    recursive: bool = True
    existing: str = "skip"
    """What to do with captioned images: skip, overwrite, prepend, append."""
    format: str = "sidecar"
    ext: str = ".txt"
    metadata_file: str | Path | None = None
    errors_file: str | Path | None = None
    """Per-file errors as JSON lines (default: DIR/loracap-errors.jsonl)."""
    batch_size: int | str | None = "auto"
    """Images per model call, or "auto" (None too): as many as fit in free memory by what the first batch
    measured, at most 64 (see loracap.backends.batch_size). Out of memory, it halves for the rest of a run."""
    workers: int = 2
    """Threads decoding images ahead of the model."""
    threads: int | None = None
    """Torch threads for the model; None: the CPUs this process may use less the decode threads on a CPU,
    at most 4 on a GPU (see loracap.backends.resources.use_threads). Process-wide, set when a run starts."""
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    retry_failed: bool = False
    """Try again the files the last run could not decode, even when they have not changed."""
    api_base: str | None = None
    """For openai:MODEL: the server's URL (default: $OPENAI_BASE_URL)."""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 4
    engine: str = "local"
    """local (this process), ray (Ray Data: all local GPUs/cores, or the cluster at RAY_ADDRESS), vllm
    (the chat model in vLLM, one CUDA GPU), ray-vllm (Ray Data with a vLLM actor per GPU) or onnx (the
    model exported to ONNX once, into loracap's cache, and run on onnxruntime in this process)."""
    out: str | Path | None = None
    """engine "ray" on shards or tables: the folder of caption shards (parquet) and errors.jsonl."""
    image_column: str | None = None
    """Shards and tables: the image column (webdataset: the member suffix); default found."""
    id_column: str | None = None
    """Tables: the column that names each row (its key); default none (the image's hash alone)."""
    shard_rows: int = 1000
    """Rows per caption shard written under `out`."""
    ray_actors: int | None = None
    """Model copies (Ray actors); default one per GPU, or one on CPUs."""
    progress: bool = True

    def check(self) -> Style:
        """ValueError for a setting that cannot work, before any folder is scanned or model loaded."""
        if self.dir is None:
            raise ValueError("no folder to caption: give DIR (or dir = ... in the --config file)")
        if self.existing not in EXISTING_POLICIES:
            raise ValueError(f"existing must be one of {', '.join(EXISTING_POLICIES)}, not {self.existing!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.shard_rows < 1 or (self.ray_actors is not None and self.ray_actors < 1):
            raise ValueError("--shard-rows and --ray-actors must be at least 1")
        parse_batch_size(self.batch_size)
        parse_threads(self.threads)
        if self.generation.captions_per_image > 1 and self.existing in ("prepend", "append"):
            raise ValueError(
                f"--existing {self.existing} joins one new caption to the old one; with --captions-per-image "
                "use --existing overwrite (or skip)"
            )
        if self.style_choice.tagger and self.engine in ("ray", "ray-vllm"):
            raise ValueError("--tagger runs with --engine local or vllm; the Ray engine has no tagger pass")
        return self.style_choice.check()

    def load_backend(self) -> Backend:
        """The model these settings name; without one, the one that fits this machine (said on stderr)."""
        from .backends import load_backend
        from .backends.hardware import auto_model
        from .backends.registry import REMOTE_PREFIX

        model, quant = self.model, self.quant
        if model is not None and model.startswith(REMOTE_PREFIX):
            return load_backend(
                model,
                api_base=self.api_base,
                api_key_env=self.api_key_env,
                concurrency=self.concurrency,
                timeout_s=self.timeout,
                max_retries=self.max_retries,
            )
        if model is None:
            choice = auto_model(self.device)
            model, quant = choice.model, quant or choice.quant
            at = f" at {quant}" if quant else ""
            log.info("no --model given (%s): using %s%s", choice.reason, model, at)
        if self.engine == "onnx":
            from .onnx_export import exported_folder

            model = str(exported_folder(model, quant=quant))
        engine = "vllm" if self.engine in ("vllm", "ray-vllm") else "local"
        return load_backend(model, device=self.device, dtype=self.dtype, quant=quant, engine=engine)


# Keyword shortcuts of caption_folder / Captioner that are older names of a setting.
_ALIASES = {"mode": "style", "options": "postprocess"}


def caption_config(config: CaptionConfig | str | Path | None = None, **settings: Any) -> CaptionConfig:
    """A CaptionConfig: `config` itself, or one for the folder `config` with `settings` (flat names, or
    whole parts such as `postprocess=PostProcess(...)`); `settings` change a given config too."""
    # None for a whole part or for the style means "not given", as the old keyword defaults did.
    optional = (*parts(CaptionConfig), "style")
    settings = {_ALIASES.get(k, k): v for k, v in settings.items()}
    settings = {k: v for k, v in settings.items() if v is not None or k not in optional}
    return settings_for(CaptionConfig, config, settings, first="dir", where="caption settings")


def caption_folder(
    config: CaptionConfig | str | Path, *, backend: Backend | None = None, **settings: Any
) -> RunSummary:
    """Caption every image in the folder and write what trainers read. Returns the run's summary.

    `caption_folder(CaptionConfig(...))`, or the folder with keyword settings, as `loracap caption`'s flags
    name them: `caption_folder("data", style="tags", trigger="ohwx", max_new_tokens=60)` (`options=` a
    PostProcess and `generation=` GenerationSettings work too). `backend`: an already loaded model to use.
    Raises FileNotFoundError / NotADirectoryError for a missing folder, ValueError for bad settings,
    and the backends' ModelUnavailable / BackendError when the model cannot be used.

    Once there is something to caption with a local model, the run sets torch's thread count for the
    process (`threads`, chosen from the CPUs this process may use when None) and leaves it so afterwards.
    """
    config = caption_config(config, **settings)
    own_backend = None  # a model this run loaded, and closes (a remote one holds connections)
    try:
        with folder_run(config, config.model or getattr(backend, "name", "")) as run:
            if run.todo:
                # --tagger's model first: a missing one is said before minutes of chat model loading.
                tagger = _load_tagger(config)
                if backend is None:
                    backend = own_backend = config.load_backend()
                    run.summary.model = backend.name
                request = resolve_request(config.style_choice, backend, trigger=config.postprocess.trigger)
                if tagger is not None:  # tagged once the model took the request: a refusal costs no tagging
                    request = replace(request, hints=_tag_hints(run, config, tagger))
                    tagger = None  # its memory back before the chat model runs
                _run(run, backend, request, config)
    finally:
        if own_backend is not None and hasattr(own_backend, "close"):
            own_backend.close()
    return run.summary


@dataclass
class FolderRun:
    """One `loracap caption` run over a folder, whichever engine captions it: what to caption (`todo`),
    where captions go (`store`), and the summary; `write` and `fail` record each image's outcome."""

    config: CaptionConfig
    root: Path
    store: Any
    summary: RunSummary
    style: Style
    todo: list[_Item] = field(default_factory=list)

    def write(self, item: _Item, caption: str, *, tags: bool) -> None:
        """Write `item`'s new caption (merged with its old one for --existing prepend/append). A full disk
        or read-only folder raises (nothing else could be written either); another write error fails the
        image and the run goes on."""
        existing, options = self.config.existing, self.config.postprocess
        if item.old is not None and existing in ("prepend", "append"):
            caption = merge_captions(caption, item.old, existing, tags=tags, options=options)
        try:
            self.store.write(item.path, caption)
            self.summary.captioned += 1
        except OSError as exc:
            if exc.errno in _NOTHING_MORE_FITS:
                raise  # no other image's caption can be written either: stop, keep what was made
            self.fail(item.path, "write", f"cannot write caption: {exc}")

    def fail(self, path: Path, stage: str, reason: str) -> None:
        _fail(self.summary, self.root, path, stage, reason)


@contextmanager
def folder_run(config: CaptionConfig, model: str) -> Iterator[FolderRun]:
    """Plan a folder run (settings checked before anything is scanned; images found; captioned ones,
    name clashes and files that failed last time sorted out), and on the way out close the store, save
    elsewhere what could not be written, time the run and write the error list."""
    chosen_style = config.check()  # before anything is scanned or loaded
    if config.generation.captions_per_image > 1 and config.format == "kohya-json":
        log.warning(
            "sd-scripts reads the lines of a meta_cap.json caption as alternatives (one drawn per step) only "
            "with --enable_wildcard; without it, it trains on all %d lines as one caption",
            config.generation.captions_per_image,
        )
    root = Path(config.dir).expanduser().resolve()
    started = time.perf_counter()
    register_optional_formats()
    images = find_images(root, recursive=config.recursive)
    remove_stale_temp_files(root, recursive=config.recursive)
    summary = RunSummary(total=len(images), model=model)
    errors_path = Path(config.errors_file) if config.errors_file else root / "loracap-errors.jsonl"
    failed_before = {} if config.retry_failed else _undecodable_before(errors_path)
    store = open_store(
        config.format,
        root,
        ext=config.ext,
        metadata_file=Path(config.metadata_file) if config.metadata_file else None,
        tags=chosen_style.tags,
    )
    run = FolderRun(config, root, store, summary, chosen_style)
    write_error: OSError | None = None
    try:
        run.todo = _plan(
            images, root, store, config.format, config.ext, config.existing, summary, failed_before
        )
        yield run
    except OSError as exc:
        if exc.errno not in _NOTHING_MORE_FITS:
            raise
        write_error = exc
    finally:
        try:
            store.close()
        except OSError as exc:  # the final metadata write: its captions are kept elsewhere below
            write_error = write_error or exc
        if write_error is not None:
            summary.write_error = f"{write_error.strerror or write_error}: {write_error.filename or root}"
            summary.saved_elsewhere = _save_elsewhere(store.unsaved(), root)
        summary.seconds = time.perf_counter() - started
        summary.errors_file = _write_errors(errors_path, summary.errors)


def _plan(
    images: list[Path],
    root: Path,
    store: Any,
    format: str,
    ext: str,
    existing: str,
    summary: RunSummary,
    failed_before: dict[str, FileError],
) -> list[_Item]:
    """Which images to caption: colliding names fail, captioned ones are skipped unless asked, and files
    the last run could not decode are failed again without a model while they stay unchanged."""
    # Sidecar names drop the extension, so a.jpg and a.png collide; jsonl and kohya-json keys keep it.
    if format == "sidecar":
        clashes = {target.name: group for target, group in sidecar_collisions(images, ext).items()}
    else:
        clashes = {}
    shared: set[Path] = set()
    for target, group in clashes.items():
        names = ", ".join(p.name for p in group)
        for path in group:
            shared.add(path)
            _fail(
                summary,
                root,
                path,
                "layout",
                f"{names} would share one caption ({target}); rename all but one",
            )
    todo = []
    for path in images:
        if path in shared:
            continue
        try:
            old = store.existing(path)
        except OSError as exc:  # a folder or FIFO named a.txt, undecodable bytes, a link out of the dataset
            replaceable = getattr(exc, "replaceable", True)
            if existing == "overwrite" and replaceable:
                todo.append(_Item(path, None))  # nothing of it is read; the new caption takes its place
                continue
            why = f"cannot read the existing caption {store.target(path)}: {exc.strerror or exc}"
            advice = "; left as it is" + (" (--existing overwrite replaces it)" if replaceable else "")
            _fail(summary, root, path, "layout", why + advice)
            continue
        if old is not None and existing == "skip":
            summary.skipped += 1
            continue
        before = failed_before.get(_relative(path, root))
        if before is not None and before.fingerprint == content_fingerprint(path):
            summary.failed_before += 1
            _fail(summary, root, path, "decode", before.reason, fingerprint=before.fingerprint)
            continue
        todo.append(_Item(path, old))
    return todo


def _undecodable_before(errors_path: Path) -> dict[str, FileError]:
    """The files the run that wrote `errors_path` could not decode, by path; {} when there is no list."""
    try:
        lines = read_regular_bytes(errors_path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    known: dict[str, FileError] = {}
    for line in lines:
        try:
            error = FileError(**json.loads(line))
        except (ValueError, TypeError):  # a hand-edited or older list: what cannot be read is retried
            continue
        if error.stage == "decode" and error.fingerprint:
            known[error.path] = error
    return known


def _run(run: FolderRun, backend: Backend, request: CaptionRequest, config: CaptionConfig) -> None:
    """The local engine: decode ahead of the model in threads, caption batch by batch, write as we go."""
    from tqdm.auto import tqdm

    workers = config.workers
    placement = getattr(backend, "placement", None)
    if placement is not None:  # a local model; a remote one runs no torch here
        use_threads(config.threads, workers=workers, device=placement.device.type)
    sizer = BatchSize(parse_batch_size(config.batch_size), backend, workers=workers)
    tags = request.tags
    todo = run.todo
    watch = _BrokenModelWatch(len(todo), sizer.size)
    bar = tqdm(
        total=len(todo),
        unit="img",
        desc="captioning",
        disable=not config.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    generation, options = config.generation, config.postprocess
    try:
        for batch in _decoded_batches(todo, sizer, backend, request, workers):
            items = batch.items
            for item, reason in batch.errors:
                run.fail(item.path, "decode", reason)
            steps = caption_batch(backend, request, items, batch.inputs, generation, options, sizer)
            for item, caption, error in steps:
                if error is not None:
                    for failed, reason in watch.failed(item, error):
                        run.fail(failed.path, "caption", reason)
                    continue
                for failed, reason in watch.captioned():
                    run.fail(failed.path, "caption", reason)
                run.write(item, caption, tags=tags)
            bar.update(len(items) + len(batch.errors))
        for failed, reason in watch.captioned():  # the run ended before the model was judged broken
            run.fail(failed.path, "caption", reason)
    finally:
        bar.close()


def _load_tagger(config: CaptionConfig) -> Backend | None:
    from .backends.wd_tagger import load_tagger

    tagger = config.style_choice.tagger
    return load_tagger(tagger, device=config.device) if tagger else None


def _tag_hints(run: FolderRun, config: CaptionConfig, tagger: Backend) -> dict[Path, str]:
    """`--tagger`: each image still to caption through the WD tagger first, its tags cleaned up as a tag
    caption is (underscores, removed and replaced tags; the trigger, prefix and suffix belong to the
    caption, not the hints). They become the image's {tags}. An image the tagger cannot read or tag fails
    here and leaves `run.todo`, so it is reported once; one with no tag above the thresholds gets none."""
    from tqdm.auto import tqdm

    request = resolve_request(StyleChoice("tags"), tagger)
    sizer = BatchSize(parse_batch_size(config.batch_size), tagger, workers=config.workers)
    watch = _BrokenModelWatch(len(run.todo), sizer.size)
    bare = replace(config.postprocess, trigger=None, prefix="", suffix="")
    one_tag_list = replace(config.generation, captions_per_image=1)  # a tagger writes no alternatives
    hints: dict[Path, str] = {}
    bar = tqdm(total=len(run.todo), unit="img", desc="tagging", disable=not config.progress, file=sys.stderr)
    with bar:
        for batch in _decoded_batches(run.todo, sizer, tagger, request, config.workers):
            for item, reason in batch.errors:
                run.fail(item.path, "decode", reason)
            steps = _generate(tagger, batch.items, batch.inputs, request, one_tag_list, sizer)
            for item, raws, error in steps:
                if error is None:
                    hints[item.path] = postprocess((raws or [""])[0], bare, tags=True)
                failures = watch.captioned() if error is None else watch.failed(item, f"tagger: {error}")
                for failed, reason in failures:
                    run.fail(failed.path, "caption", reason)
            bar.update(len(batch.items) + len(batch.errors))
    for failed, reason in watch.captioned():  # the pass ended before the tagger was judged broken
        run.fail(failed.path, "caption", reason)
    run.todo = [item for item in run.todo if item.path in hints]
    return hints


def _decoded_batches(
    todo: list[_Item], sizer: BatchSize, backend: Backend, request: CaptionRequest, workers: int
) -> Iterator[DecodedBatch[_Item]]:
    """The run's batches, decoded `workers` threads ahead of the model. A batch size still to be measured
    is measured on the first batch, decoded alone; the rest are cut as they are queued, so a size that
    changes (measured, or halved after an out-of-memory) applies to all but the few already decoded."""

    def prepare(items: list[_Item], images: list) -> Any:
        return prepare_batch(backend, request, items, images)

    def decode(items: list[_Item]) -> DecodedBatch[_Item]:
        # Decoded a bit larger than the model's input, so its own resize does the final, better filtering.
        return decode_batch(items, lambda item: item.path, prepare, backend.image_side or None)

    def cut(items: list[_Item]) -> Iterator[list[_Item]]:
        start = 0
        while start < len(items):
            size = sizer.size
            yield items[start : start + size]
            start += size

    first: list[_Item] = []
    if sizer.probing:
        first = todo[: sizer.size]
        yield decode(first)
    yield from map_ahead(decode, cut(todo[len(first) :]), workers, name="loracap-decode")


def caption_batch(
    backend: Backend,
    request: CaptionRequest,
    items: list[Any],
    inputs: Any,
    generation: GenerationSettings,
    options: PostProcess,
    sizer: BatchSize,
    load: Callable[[Any], Any] | None = None,
) -> Iterator[tuple[Any, str | None, str | None]]:
    """The batch step every engine runs (`loracap caption` here, the Ray engine's actors): a prepared batch
    through the model (`_generate`: out-of-memory halving, one-by-one retry of a failing batch), then the
    clean-up. `items` have `.path` and `.old` (what the per-image prompt and the retry need); `load(item)`
    gives an item's image again for a retry (default: decoded from `item.path`).

    Yields (item, caption, None), or (item, None, reason) for an image the model failed on or left empty.
    With `generation.captions_per_image` above 1 a caption is several, a line each (`clean_captions`)."""
    for item, raws, error in _generate(backend, items, inputs, request, generation, sizer, load):
        caption = None if error else clean_captions(raws or [], options, tags=request.tags)
        if error is None and caption is None:  # nothing left but what the clean-up adds
            error = "the model returned an empty caption"
        yield item, caption, error


def clean_captions(raws: list[str], options: PostProcess, *, tags: bool) -> str | None:
    """An image's raw captions cleaned up, each on its own line (the trigger, prefix and suffix in every
    line), in the model's order; captions the clean-up empties or makes a copy of an earlier line are left
    out, since a line twice only makes it drawn more often. None when nothing is left."""
    bare = replace(options, trigger=None, prefix="", suffix="")
    lines = [postprocess(raw, options, tags=tags) for raw in raws if postprocess(raw, bare, tags=tags)]
    return join_alternatives(list(dict.fromkeys(lines))) if lines else None


def _generate(
    backend: Backend,
    items: list[_Item],
    inputs: Any,
    request: CaptionRequest,
    generation: GenerationSettings,
    sizer: BatchSize,
    load: Callable[[Any], Any] | None = None,
) -> Iterator[tuple[_Item, list[str] | None, str | None]]:
    """Caption a prepared batch. If it runs out of memory, the batch size halves for the rest of the run
    and these images are captioned at the new size; if it fails otherwise (a bad image), they are retried
    one by one, so that only the image that breaks the model fails.

    Yields (item, its raw captions, None): `generation.captions_per_image` of them; or (item, None, reason)
    for an image the model failed on."""
    if not items:
        return
    size = sizer.size  # a batch prepared before the size was halved is captioned in smaller pieces
    if len(items) <= size:
        try:
            raws = sizer.run(lambda: backend.generate(inputs, generation), inputs, len(items))
            captions = per_image(raws, len(items))
        except (KeyboardInterrupt, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the model, keep the run going
            if len(items) == 1:
                yield items[0], None, f"{type(exc).__name__}: {exc}"
                return
            size = sizer.size if is_out_of_memory(exc) and sizer.shrink(len(items)) else 1
        else:
            for item, caption in zip(items, captions, strict=True):
                yield item, caption, None
            return
    for start in range(0, len(items), size):
        yield from _generate_again(backend, items[start : start + size], request, generation, sizer, load)


def _generate_again(
    backend: Backend,
    items: list[_Item],
    request: CaptionRequest,
    generation: GenerationSettings,
    sizer: BatchSize,
    load: Callable[[Any], Any] | None,
) -> Iterator[tuple[_Item, list[str] | None, str | None]]:
    """`_generate` on images decoded (or given by `load`) and prepared once more, as a batch of their own."""
    try:
        if load is None:
            images = [load_image(item.path, min_side=backend.image_side or None) for item in items]
        else:
            images = [load(item) for item in items]
        inputs = prepare_batch(backend, request, items, images)
    except (KeyboardInterrupt, BackendError):
        raise
    except Exception as exc:  # noqa: BLE001
        if len(items) == 1:
            yield items[0], None, f"{type(exc).__name__}: {exc}"
            return
        for item in items:  # each on its own: only the image that cannot be read again fails
            yield from _generate_again(backend, [item], request, generation, sizer, load)
        return
    yield from _generate(backend, items, inputs, request, generation, sizer, load)


class _BrokenModelWatch:
    """Until the model captions one image, hold back its per-image errors.

    When the first images all fail with one and the same error (a checkpoint that cannot generate at
    these settings, say), the model is at fault, not the images: the run stops with that error in one
    line instead of listing it for every file. Once any image is captioned, errors are reported as usual.
    """

    def __init__(self, todo: int, batch_size: int) -> None:
        # Two batches' worth (at least 8 images) is enough evidence; a run with fewer images judges by
        # all of them, and one image alone never stops a run.
        self.enough = max(2, min(todo, max(8, 2 * batch_size)))
        self.held: list[tuple[_Item, str]] = []
        self.trusted = False

    def failed(self, item: _Item, reason: str) -> list[tuple[_Item, str]]:
        """Record a model failure; returns the failures to report now."""
        if self.trusted:
            return [(item, reason)]
        self.held.append((item, reason))
        if len(self.held) >= self.enough and len({r for _, r in self.held}) == 1:
            raise BackendError(
                f"the model failed on each of the first {len(self.held)} images with the same error, "
                f"so the run stopped (nothing was written): {reason}"
            )
        return []

    def captioned(self) -> list[tuple[_Item, str]]:
        """An image was captioned: the model works; returns the held failures to report now."""
        self.trusted = True
        held, self.held = self.held, []
        return held


def prepare_batch(backend: Backend, request: CaptionRequest, items: list[Any], images: list) -> Any:
    """The model's inputs for decoded images: the style's prompt, or one per image where it names the
    image's folder or existing tags."""
    if request.per_image:  # the prompt names this image's folder or existing tags
        return backend.prepare(images, request.mode, [request.prompt_for(i.path, i.old) for i in items])
    return backend.prepare(images, request.mode, request.prompt)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _fail(
    summary: RunSummary, root: Path, path: Path, stage: str, reason: str, *, fingerprint: str | None = None
) -> None:
    summary.failed += 1
    if stage == "decode" and fingerprint is None:
        fingerprint = content_fingerprint(path)  # the next run knows this file while it stays the same
    summary.errors.append(FileError(_relative(path, root), stage, reason, fingerprint))
    log.error("%s error: %s: %s", stage, path, reason)


def _write_errors(path: Path, errors: list[FileError]) -> str | None:
    """This run's per-file errors as JSON lines; a stale list from an earlier run is removed.

    None when there are none, or when the list cannot be written (they were printed as they happened)."""
    try:
        if not errors:
            path.unlink(missing_ok=True)
            return None
        atomic_write_text(path, "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in errors))
    except OSError as exc:
        log.error("cannot write the error list %s: %s", path, exc.strerror or exc)
        return None
    return str(path)


def _save_elsewhere(unsaved: dict[str, str], root: Path) -> str | None:
    """Write what the dataset folder could not take into a folder laid out like it, on another file
    system if need be: loracap's cache, else the system's temporary folder. Returns that folder."""
    from .hub import loracap_cache_dir

    if not unsaved:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for base in (loracap_cache_dir() / "unsaved", Path(tempfile.gettempdir()) / "loracap-unsaved"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"{root.name}-{stamp}-", dir=base))  # never another run's
            for name, text in unsaved.items():
                target = folder / name if not Path(name).is_absolute() else folder / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(target, text)
        except OSError:
            continue
        return str(folder)
    return None
