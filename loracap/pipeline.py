"""Caption a folder: find images, skip what is done, decode ahead of the model, write as we go.

The model only ever sees batches of decoded images (`backend.prepare` + `backend.generate`); walking
folders, decoding and writing stay here, so the same batch step can run in a server or a Ray actor.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .backends.base import Backend, BackendError, GenerationSettings
from .inputs import (
    find_images,
    load_image,
    prefetch_batches,
    register_optional_formats,
    remove_stale_temp_files,
)
from .postprocess import PostProcess, merge_captions, postprocess
from .request import CaptionRequest, StyleChoice, resolve_request
from .styles import Style
from .writers import atomic_write_text, key_collisions, open_store, sidecar_collisions

EXISTING_POLICIES = ("skip", "overwrite", "prepend", "append")
FORMATS = ("sidecar", "jsonl", "kohya-json")


@dataclass
class FileError:
    path: str
    stage: str  # layout | decode | caption | write
    reason: str


@dataclass
class RunSummary:
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    model: str = ""
    errors_file: str | None = None
    errors: list[FileError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def describe(self) -> str:
        rate = self.captioned / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{self.captioned} captioned, {self.skipped} skipped (already captioned), {self.failed} failed "
            f"of {self.total} images in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )
        if self.errors_file:
            text += f"; errors listed in {self.errors_file}"
        return text


@dataclass
class _Item:
    path: Path
    old: str | None  # existing caption, kept for prepend/append


def caption_folder(
    root: str | Path,
    *,
    model: str | None = None,
    style: str | Path | Style = "caption",
    mode: str | None = None,
    length: str | None = None,
    extras: Sequence[str] = (),
    name: str | None = None,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    tags_ext: str | None = None,
    backend: Backend | None = None,
    recursive: bool = True,
    existing: str = "skip",
    format: str = "sidecar",
    ext: str = ".txt",
    metadata_file: str | Path | None = None,
    options: PostProcess | None = None,
    generation: GenerationSettings | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    device: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    errors_file: str | Path | None = None,
    progress: bool = True,
) -> RunSummary:
    """Caption every image under `root` and write what trainers read. Returns the run's summary.

    `style`: a shipped caption style ("booru-tags", "training-caption"; `mode` is its old name) or a
    style file; `length`, `extras`, `name` shape a chat model's instruction; `prompt` / `prompt_file`
    replace it (for Florence-2 / BLIP: the raw task prompt); `tags_ext` names the file {tags} comes from.
    Raises FileNotFoundError / NotADirectoryError for a missing folder, ValueError for bad options,
    and the backends' ModelUnavailable / BackendError when the model cannot be used.
    """
    if existing not in EXISTING_POLICIES:
        raise ValueError(f"existing must be one of {', '.join(EXISTING_POLICIES)}, not {existing!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    root = Path(root).expanduser().resolve()
    choice = StyleChoice(mode or style, length, extras, name, prompt, prompt_file, tags_ext)
    chosen_style = choice.check()  # before anything is scanned or loaded
    options = options or PostProcess()
    generation = generation or GenerationSettings()
    started = time.perf_counter()

    register_optional_formats()
    images = find_images(root, recursive=recursive)
    remove_stale_temp_files(root, recursive=recursive)
    summary = RunSummary(total=len(images), model=model or getattr(backend, "name", ""))
    errors_path = Path(errors_file) if errors_file else root / "loracap-errors.jsonl"
    store = open_store(
        format,
        root,
        ext=ext,
        metadata_file=Path(metadata_file) if metadata_file else None,
        tags=chosen_style.tags,
    )
    try:
        todo = _plan(images, root, store, format, ext, existing, summary)
        if todo:
            if backend is None:
                backend = _load(model, device=device, dtype=dtype, quant=quant)
                summary.model = backend.name
            request = resolve_request(choice, backend, trigger=options.trigger)
            _run(
                todo,
                root,
                backend,
                store,
                summary,
                request=request,
                existing=existing,
                options=options,
                generation=generation,
                batch_size=batch_size or backend.default_batch_size,
                workers=workers,
                progress=progress,
            )
    finally:
        store.close()
        summary.seconds = time.perf_counter() - started
        summary.errors_file = _write_errors(errors_path, summary.errors)
    return summary


def _load(model: str | None, *, device: str | None, dtype: str | None, quant: str | None) -> Backend:
    from .backends import load_backend
    from .backends.hardware import auto_model

    if model is None:
        choice = auto_model(device)
        model, quant = choice.model, quant or choice.quant
        print(
            f"loracap: no --model given ({choice.reason}): using {model}" + (f" at {quant}" if quant else ""),
            file=sys.stderr,
        )
    return load_backend(model, device=device, dtype=dtype, quant=quant)


def _plan(
    images: list[Path], root: Path, store: Any, format: str, ext: str, existing: str, summary: RunSummary
) -> list[_Item]:
    """Which images to caption: colliding names fail, captioned ones are skipped unless asked."""
    # Sidecar names and kohya keys drop the extension, so a.jpg and a.png collide; jsonl keeps it.
    if format == "sidecar":
        clashes = {target.name: group for target, group in sidecar_collisions(images, ext).items()}
    elif format == "kohya-json":
        clashes = {f"key {key!r}": group for key, group in key_collisions(images, root).items()}
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
        old = store.existing(path)
        if old is not None and existing == "skip":
            summary.skipped += 1
        else:
            todo.append(_Item(path, old))
    return todo


def _run(
    todo: list[_Item],
    root: Path,
    backend: Backend,
    store: Any,
    summary: RunSummary,
    *,
    request: CaptionRequest,
    existing: str,
    options: PostProcess,
    generation: GenerationSettings,
    batch_size: int,
    workers: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    tags = request.tags
    bare = replace(options, trigger=None, prefix="", suffix="")
    bar = tqdm(
        total=len(todo),
        unit="img",
        desc="captioning",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        batches = prefetch_batches(
            todo,
            batch_size,
            path_of=lambda item: item.path,
            prepare=lambda items, images: _prepare(backend, request, items, images),
            # Decode a bit larger than the model's input so its own resize does the final, better filtering.
            min_side=backend.image_side or None,
            workers=workers,
        )
        for batch in batches:
            items = batch.items
            for item, reason in batch.errors:
                _fail(summary, root, item.path, "decode", reason, bar)
            for item, raw in _generate(backend, items, batch.inputs, request, generation, summary, root, bar):
                if not postprocess(raw, bare, tags=tags):  # nothing left but what the user adds
                    _fail(summary, root, item.path, "caption", "the model returned an empty caption", bar)
                    continue
                caption = postprocess(raw, options, tags=tags)
                if item.old is not None and existing in ("prepend", "append"):
                    caption = postprocess(
                        merge_captions(caption, item.old, existing, tags=tags), options, tags=tags
                    )
                try:
                    store.write(item.path, caption)
                    summary.captioned += 1
                except OSError as exc:
                    _fail(summary, root, item.path, "write", f"cannot write caption: {exc}", bar)
            bar.update(len(items) + len(batch.errors))
    finally:
        bar.close()


def _generate(
    backend: Backend,
    items: list[_Item],
    inputs: Any,
    request: CaptionRequest,
    generation: GenerationSettings,
    summary: RunSummary,
    root: Path,
    bar: Any,
):
    """Caption a prepared batch; if the batch fails (out of memory, a bad image), retry one by one."""
    if not items:
        return
    try:
        captions = backend.generate(inputs, generation)
    except (KeyboardInterrupt, BackendError):
        raise
    except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the model, keep the run going
        if len(items) == 1:
            _fail(summary, root, items[0].path, "caption", f"{type(exc).__name__}: {exc}", bar)
            return
    else:
        yield from zip(items, captions, strict=True)
        return
    for item in items:
        try:
            image = load_image(item.path, min_side=backend.image_side or None)
            caption = backend.generate(_prepare(backend, request, [item], [image]), generation)[0]
        except (KeyboardInterrupt, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001
            _fail(summary, root, item.path, "caption", f"{type(exc).__name__}: {exc}", bar)
        else:
            yield item, caption


def _prepare(backend: Backend, request: CaptionRequest, items: list[_Item], images: list) -> Any:
    if request.per_image:  # the prompt names this image's folder or existing tags
        return backend.prepare(images, request.mode, [request.prompt_for(i.path, i.old) for i in items])
    return backend.prepare(images, request.mode, request.prompt)


def _fail(summary: RunSummary, root: Path, path: Path, stage: str, reason: str, bar: Any = None) -> None:
    summary.failed += 1
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    summary.errors.append(FileError(rel, stage, reason))
    message = f"loracap: {stage} error: {path}: {reason}"
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _write_errors(path: Path, errors: list[FileError]) -> str | None:
    """This run's per-file errors as JSON lines; a stale list from an earlier run is removed."""
    if not errors:
        path.unlink(missing_ok=True)
        return None
    atomic_write_text(path, "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in errors))
    return str(path)
