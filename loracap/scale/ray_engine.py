"""`loracap caption --engine ray`: the same batch step as `loracap caption`, on Ray Data.

    source rows ──> decode (CPU tasks) ──> CaptionActor (model loaded once; one per GPU, or CPU actors)
                                                         └──> this process: writes as results arrive

The decode stage runs loracap's own decoder (EXIF rotation, alpha, bombs refused) in stateless CPU tasks,
as many as the cluster's CPUs allow, shrinking each image for the model's processor. Each actor loads the
model once (`CaptionConfig.load_backend`) and runs `loracap.pipeline.prepare_batch` and `caption_batch`
(generation with out-of-memory halving and one-by-one retry, then the clean-up: styles, trigger, tag
clean-up) on its batches. Ray restarts an actor that dies and retries its block.

Writing stays in the driver (this process), as results stream in: for a folder, the same sidecar, jsonl
or kohya files as the local engine, through the same plan (so `--existing` and resume mean the same);
for shards and tables, parquet shards under `--out` (`loracap.scale.shards`). Bad images are per-row
errors, never a failed job.

Ray: `RAY_ADDRESS` (or `ray://head:10001`) joins a running cluster; otherwise a local Ray starts with this
machine's CPUs and GPUs. Folder sources must be on a file system every node sees.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loracap.pipeline import CaptionConfig, RunSummary, caption_config, folder_run
from loracap.scale.shards import ShardWriter, done_ids, write_source
from loracap.scale.sources import Source, id_from_digest, open_source, ray_dataset

log = logging.getLogger(__name__)

__all__ = ["caption_with_ray", "decode_side"]

DEFAULT_RAY_BATCH = {"gpu": 32, "cpu": 8}
FOLDER_BLOCK = 256
"""Images of a folder per Ray block."""
"""Rows per actor call when --batch-size is auto; the actor's own batch sizing splits them further."""


@dataclass
class _Row:
    """What the batch step needs of an item: `path` (for per-image prompts and messages), `old` caption."""

    path: Path
    old: str | None
    image: Any = None


def caption_with_ray(config: CaptionConfig | str | Path, **settings: Any) -> RunSummary:
    """Caption `config.dir` (a folder, shards or a table; see loracap.scale.sources) on Ray; returns the
    summary. ValueError for settings that cannot work, before Ray starts."""
    config = caption_config(config, **settings)
    config.check()
    source = open_source(config.dir, image_column=config.image_column, id_column=config.id_column)
    if source.kind != "folder" and not config.out:
        raise ValueError(
            f"{config.dir} is {source.kind} data: give --out FOLDER for the caption shards (then `loracap "
            "export` writes trainer files)"
        )
    if config.model is not None and config.model.startswith("openai:"):
        raise ValueError("--engine ray runs the model in Ray actors; an openai: model runs on its server")
    try:
        import ray  # noqa: F401  (a probe: is the extra installed?)
    except ImportError:
        raise ValueError('--engine ray needs Ray: pip install "loracap[ray]"') from None
    _start_ray()
    try:
        if source.kind == "folder":
            return _caption_folder(config)
        return _caption_table(config, source)
    except Exception as exc:
        # An actor that cannot start (a model that cannot be had, a style it cannot write) fails the job
        # inside Ray's wrappers; the user gets the one line the local engine gives.
        cause = _user_error(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise


def _user_error(exc: BaseException) -> BaseException | None:
    """The loracap error inside Ray's exception wrappers, if there is one. An actor that died in its
    constructor carries its error only as text, so that is read too."""
    from loracap.backends import BackendError, ModelUnavailable

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (BackendError, ModelUnavailable)):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    match = re.search(r"loracap\.[\w.]*\.(BackendError|ModelUnavailable): (.+)", str(exc))
    if match:
        kind = BackendError if match.group(1) == "BackendError" else ModelUnavailable
        return kind(match.group(2).strip())
    return None


# --- the two outputs ----------------------------------------------------------------------------------


def _caption_folder(config: CaptionConfig) -> RunSummary:
    import ray.data

    with folder_run(config, config.model or "") as run:
        if not run.todo:
            return run.summary
        items = {str(item.path): item for item in run.todo}
        rows = [{"key": key, "path": key, "old": item.old or ""} for key, item in items.items()]
        # Results reach this process (and the files) a block at a time; each block costs Ray a task per
        # stage, so blocks of ~256 images (1,000 images: 9 s with them, 20 s with blocks of 16).
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // FOLDER_BLOCK))
        tags = run.style.tags
        bar = _progress(config, len(rows))
        for batch in _captions(config, dataset, folder=True):
            for key, caption, stage, reason in zip(
                batch["key"], batch["caption"], batch["stage"], batch["reason"], strict=True
            ):
                item = items[str(key)]
                if stage:
                    run.fail(item.path, str(stage), str(reason))
                else:
                    run.write(item, str(caption), tags=tags)
                bar.update()
        bar.close()
        run.summary.model = config.model or run.summary.model
    return run.summary


def _caption_table(config: CaptionConfig, source: Source) -> RunSummary:
    out = Path(config.out)
    started = time.perf_counter()
    done = done_ids(out, retry_failed=config.retry_failed)
    summary = RunSummary(model=config.model or "")
    writer = ShardWriter(out, rows=config.shard_rows)
    write_source(out, source)
    style = config.style_choice
    recorded = {"model": config.model or "", "style": style.style or "", "prompt": style.prompt or ""}
    bar = _progress(config, None)
    try:
        dataset = ray_dataset(source)
        for batch in _captions(config, dataset, folder=False, done=done):
            for i in range(len(batch["id"])):
                row = {name: _text(batch[name][i]) for name in batch}
                summary.total += 1
                if row["stage"] == "done":
                    summary.skipped += 1
                    continue
                if row["stage"]:
                    summary.failed += 1
                    writer.error(row)
                else:
                    summary.captioned += 1
                    writer.add({**row, **recorded})
                bar.update()
    finally:
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - started
        summary.errors_file = str(out / "errors.jsonl") if summary.failed else None
    return summary


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- the Ray pipeline ---------------------------------------------------------------------------------


def _captions(config: CaptionConfig, dataset: Any, *, folder: bool, done: set[str] | None = None) -> Any:
    """The dataset through decode tasks and caption actors, as numpy batches of key, id, caption, stage
    (empty when captioned; "decode"/"caption" for a failure; "done" for a row captioned before), reason."""
    import ray

    side = decode_side(config)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if _use_gpu(config) else 0
    if config.engine == "ray-vllm" and not gpus:
        raise ValueError(
            "--engine ray-vllm runs a vLLM actor per GPU, and this Ray cluster has no GPU; use --engine ray"
        )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = config.ray_actors or gpus or 1  # one actor per GPU, or one CPU actor
    # CPU actors leave CPUs to the decode tasks: each takes what its share of the rest allows.
    actor_cpus = 1 if gpus else max(1, (cpus - min(config.workers, cpus - 1)) // actors)
    batch = (
        config.batch_size
        if isinstance(config.batch_size, int)
        else DEFAULT_RAY_BATCH["gpu" if gpus else "cpu"]
    )
    decode = _Decode(side, folder=folder, done=done)
    decoded = dataset.map_batches(decode, batch_format="numpy", batch_size=batch, num_cpus=1)
    captioned = decoded.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"config": config, "threads": config.threads or actor_cpus},
        batch_format="numpy",
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
        max_restarts=-1,
        max_task_retries=-1,
    )
    return captioned.iter_batches(batch_format="numpy", batch_size=None)


class _Decode:
    """A decode task: bytes (or a folder file) -> RGB pixels shrunk for the model, per row; a row that does
    not decode carries its reason instead. Rows whose id is in `done` pass through as "done"."""

    def __init__(self, side: int, *, folder: bool, done: set[str] | None) -> None:
        self.side, self.folder, self.done = side, folder, done or set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from loracap.inputs import ImageDecodeError, load_image, load_image_bytes

        names = ("key", "id", "sha256", "old", "where", "pixels", "stage", "reason")
        out: dict[str, list[Any]] = {k: [] for k in names}
        for i, key in enumerate(batch["key"]):
            key = str(key)
            where = str(batch["where"][i]) if "where" in batch else key
            pixels, stage, reason = np.zeros((1, 1, 3), np.uint8), "", ""
            if self.folder:
                ident, digest = key, ""
            else:
                data = bytes(batch["image"][i])
                digest = hashlib.sha256(data).hexdigest()  # once: the id and the shards' sha256 column
                ident = id_from_digest(key, digest)
            if ident in self.done:
                stage = "done"
            else:
                try:
                    if self.folder:
                        image = load_image(key, min_side=self.side or None)
                    else:
                        image = load_image_bytes(data, min_side=self.side or None, label=key or ident)
                    pixels = np.asarray(image, dtype=np.uint8)
                except ImageDecodeError as exc:
                    stage, reason = "decode", exc.reason
            out["key"].append(key)
            out["id"].append(ident)
            out["sha256"].append(digest)
            out["old"].append(str(batch["old"][i]) if "old" in batch else "")
            out["where"].append(where)
            out["pixels"].append(pixels)
            out["stage"].append(stage)
            out["reason"].append(reason)
        result = {k: np.array(v, dtype=object) for k, v in out.items() if k != "pixels"}
        result["pixels"] = _ragged(out["pixels"])
        return result


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    holder = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        holder[i] = array
    return holder


class CaptionActor:
    """Holds one loaded model and runs loracap's batch step on each batch Ray hands it."""

    def __init__(self, config: CaptionConfig, threads: int) -> None:
        from loracap.backends.batch_size import BatchSize, parse_batch_size
        from loracap.backends.resources import use_threads
        from loracap.request import resolve_request

        self.config = config
        self.backend = config.load_backend()
        placement = getattr(self.backend, "placement", None)
        if placement is not None:
            use_threads(threads, workers=0, device=placement.device.type)
        self.request = resolve_request(config.style_choice, self.backend, trigger=config.postprocess.trigger)
        self.sizer = BatchSize(parse_batch_size(config.batch_size), self.backend, workers=0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from loracap.pipeline import caption_batch, prepare_batch

        count = len(batch["key"])
        captions = [""] * count
        stages = [str(s) for s in batch["stage"]]
        reasons = [str(r) for r in batch["reason"]]
        todo = [i for i in range(count) if not stages[i]]
        rows = [
            _Row(
                Path(str(batch["key"][i])), str(batch["old"][i]) or None, Image.fromarray(batch["pixels"][i])
            )
            for i in todo
        ]
        if rows:
            inputs = prepare_batch(self.backend, self.request, rows, [r.image for r in rows])
            config = self.config
            steps = caption_batch(
                self.backend,
                self.request,
                rows,
                inputs,
                config.generation,
                config.postprocess,
                self.sizer,
                load=lambda row: row.image,
            )
            by_row = {id(row): i for row, i in zip(rows, todo, strict=True)}
            for row, caption, error in steps:
                i = by_row[id(row)]
                if error is None:
                    captions[i] = caption
                else:
                    stages[i], reasons[i] = "caption", error
        return {
            "key": batch["key"],
            "id": batch["id"],
            "sha256": batch["sha256"],
            "where": batch["where"],
            "caption": np.array(captions, dtype=object),
            "stage": np.array(stages, dtype=object),
            "reason": np.array(reasons, dtype=object),
        }


# --- setup ------------------------------------------------------------------------------------------------


def decode_side(config: CaptionConfig) -> int:
    """The side images are decoded at for the model (its processor's input side), read from the model's
    processor files without loading its weights; 0 (full size) when they do not say."""
    from loracap.backends import processor_side

    try:
        return processor_side(config.model)
    except Exception as exc:  # noqa: BLE001 - decoding at full size is slower, never wrong
        log.debug("cannot read the input side of %s (%s): decoding at full size", config.model, exc)
        return 0


def _use_gpu(config: CaptionConfig) -> bool:
    return config.device in (None, "auto", "cuda") or str(config.device).startswith("cuda")


def _start_ray() -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray on this machine (once per process)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        context = ray.init(address=address, log_to_driver=False, configure_logging=False)
        url = getattr(context, "dashboard_url", None)
        where = f"the cluster at {address}" if address else "a local Ray"
        log.info("captioning on %s%s", where, f"; dashboard: http://{url}" if url else "")
    ray.data.DataContext.get_current().enable_progress_bars = False


def _progress(config: CaptionConfig, total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="captioning (ray)",
        disable=not config.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
