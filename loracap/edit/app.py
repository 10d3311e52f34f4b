"""`loracap edit DIR`: review and fix a dataset's captions in the browser, served on this machine.

    loracap edit ./my_dataset                         # http://127.0.0.1:7861, opened in the browser
    loracap edit ./my_dataset --model ./my-captioner --port 8080 --no-browser

One page (loracap/web/templates/edit.html, its CSS and JS inlined, nothing from a CDN) over a JSON API
(FastAPI). The dataset is indexed in SQLite under DIR/.loracap/ (`index.Index`) in a background thread, so
the first page shows while a big folder is still being read. Every write goes through the dataset's own
layout (sidecar, metadata.jsonl, kohya JSON) atomically, and is refused when the caption on disk is no
longer the one the page loaded (409, with both versions). Bulk edits are previewed, then applied and
logged for undo (`bulk.UndoLog`). Re-captioning runs one background job at a time with loracap's batch
step and streams its progress as server-sent events; its captions land as proposals to accept or reject.

Binds 127.0.0.1 by default; on any other address every request needs the token printed at start
(header X-Loracap-Token, or ?token= on the page's URL). Files are served only by id, only from inside the
dataset folder (a symlink out is refused). Bad requests get a 4xx with a one-line reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from loracap.edit.bulk import BulkOp, UndoLog, apply_op
from loracap.edit.index import FLAGS, LOW_CLIP, Index
from loracap.edit.index import Query as Selection
from loracap.quality.explain import check_explain_model, parse_layers

log = logging.getLogger(__name__)

__all__ = ["EditConfig", "create_app", "edit"]

MAX_PAGE = 500
MAX_TEXT = 20_000
THUMB_SIDE = 256
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class EditConfig:
    """Every setting of `loracap edit`."""

    dir: str | Path | None = None
    """The dataset folder."""
    host: str = "127.0.0.1"
    """Any other address than this machine's needs the token printed at start."""
    port: int = 7861
    browser: bool = True
    """Open the page in the default browser."""
    model: str | None = None
    """The captioner re-captioning offers first (any `loracap caption --model`)."""
    tokenizer: str | None = None
    """The CLIP tokenizer for the token counter (hub id or folder; default openai/clip-vit-large-patch14 if
    it is in the Hugging Face cache)."""
    layout: str = "auto"
    ext: str = ".txt"
    metadata_file: str | Path | None = None
    token: str | None = None
    """The access token (default: made at start when the address is not loopback)."""
    device: str | None = None
    """Where re-captioning and CLIP scoring run (default: the best there is)."""
    clip_model: str | None = None
    """The CLIP model scores are computed with on request (default: `loracap report`'s)."""
    styles: list[str] = field(default_factory=lambda: ["caption", "detailed", "tags", "booru-tags"])
    explain_model: str | None = None
    """A BLIP, ViT-GPT2 or Florence-2 captioner: GET /api/explain/{id} is a PNG of where it looked for each
    word of its caption of that image (`loracap explain`), and the page offers it for the focused image.
    Loaded on the first request."""


# --- request bodies -----------------------------------------------------------------------------------


class CaptionEdit(BaseModel):
    base: str | None = Field(None, max_length=MAX_TEXT)
    text: str = Field(..., max_length=MAX_TEXT)


class TokenRequest(BaseModel):
    text: str = Field(..., max_length=MAX_TEXT)


class QueryBody(BaseModel):
    q: str = Field("", max_length=500)
    tags: list[str] = Field(default_factory=list, max_length=100)
    without: list[str] = Field(default_factory=list, max_length=100)
    flag: str = ""


class SelectionBody(BaseModel):
    ids: list[int] | None = Field(None, max_length=200_000)
    query: QueryBody | None = None


class OpBody(BaseModel):
    kind: str
    tag: str = Field("", max_length=500)
    old: str = Field("", max_length=500)
    new: str = Field("", max_length=500)
    pattern: str = Field("", max_length=500)
    replacement: str = Field("", max_length=2000)
    text: str = Field("", max_length=2000)
    trigger: str = Field("", max_length=200)


class BulkBody(BaseModel):
    selection: SelectionBody
    op: OpBody


class RecaptionBody(BaseModel):
    ids: list[int] = Field(..., min_length=1, max_length=100_000)
    model: str | None = Field(None, max_length=500)
    style: str | None = Field(None, max_length=200)


class ClipBody(BaseModel):
    model: str | None = Field(None, max_length=500)


class ProposalBody(BaseModel):
    ids: list[int] | None = Field(None, max_length=200_000)
    all: bool = False


# --- the app ------------------------------------------------------------------------------------------


class _Job:
    def __init__(self, total: int) -> None:
        self.id = secrets.token_hex(6)
        self.total, self.done, self.state, self.error = total, 0, "running", ""
        self.started = time.monotonic()

    def event(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        event = {
            "done": self.done,
            "total": self.total,
            "rate": round(rate, 2),
            "eta": eta,
            "state": self.state,
        }
        return {**event, "error": self.error} if self.error else event


def create_app(config: EditConfig) -> FastAPI:
    """The editor for `config.dir`; its index starts building in a background thread."""
    if config.dir is None:
        raise ValueError("no dataset folder: give DIR")
    root = Path(config.dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder at {root}")
    if config.explain_model:  # a model explain cannot read is said at start, not on the first click
        check_explain_model(config.explain_model)
    metadata = Path(config.metadata_file) if config.metadata_file else None
    index = Index(root, layout=config.layout, ext=config.ext, metadata_file=metadata)
    undo_log = UndoLog(index.folder)
    # Loaded after the index (importing transformers takes seconds): the counter shows once it is there.
    tokens_of: dict[str, Any] = {"tokenizer": None}
    token = config.token or ("" if config.host in LOOPBACK else secrets.token_urlsafe(16))
    jobs: dict[str, _Job] = {}
    job_lock = threading.Lock()
    state: dict[str, Any] = {"error": None}

    def build() -> None:
        try:
            index.build()
            _read_report(index)
        except Exception as exc:  # noqa: BLE001 - shown by /api/info; the server stays up
            log.exception("indexing %s failed", root)
            state["error"] = f"{type(exc).__name__}: {exc}"
        tokens_of["tokenizer"] = _load_tokenizer(config.tokenizer)

    threading.Thread(target=build, name="loracap-index", daemon=True).start()
    app = FastAPI(title="loracap edit", docs_url=None, redoc_url=None)
    app.state.token, app.state.index = token, index

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if token:
            given = request.headers.get("x-loracap-token") or request.query_params.get("token")
            if not given or not secrets.compare_digest(given, token):
                return JSONResponse(
                    {"detail": "this editor needs its token (printed at start)"}, status_code=401
                )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        from loracap.quality.html import page_environment, static_asset

        template = page_environment().get_template("edit.html.j2")
        return template.render(title=index.root.name, token=token, css=static_asset("edit.css"),
                               js=static_asset("edit.js"))  # fmt: skip

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "root": str(index.root),
            "layout": index.layout,
            "total": index.count(),
            "indexing": index.indexing,
            "error": state["error"],
            "tokenizer": tokens_of["tokenizer"] is not None,
            "max_tokens": index.max_tokens,
            "low_clip": LOW_CLIP,
            "models": [m for m in [config.model] if m],
            "styles": config.styles,
            "explain": bool(config.explain_model),
        }

    @app.get("/api/images")
    def images(
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        q: str = Query("", max_length=500),
        tags: str = Query("", max_length=5000),
        without: str = Query("", max_length=5000),
        flag: str = "",
        sort: str = "path",
        order: str = "asc",
    ) -> dict[str, Any]:
        selection = _selection(QueryBody(q=q, tags=_split(tags), without=_split(without), flag=flag))
        if sort not in ("path", "clip") or order not in ("asc", "desc"):
            raise HTTPException(422, "sort is path or clip, order asc or desc")
        total, rows = index.select(selection, offset=offset, limit=limit, sort=sort, order=order)
        _count_tokens(index, tokens_of["tokenizer"], rows)
        return {"total": total, "offset": offset, "items": [_item(index, r) for r in rows]}

    @app.get("/api/image/{image_id}/file")
    def image_file(image_id: int) -> FileResponse:
        return FileResponse(_file(index, image_id))

    @app.get("/api/image/{image_id}/thumb")
    def thumb(image_id: int) -> FileResponse:
        return FileResponse(_thumbnail(index, image_id), media_type="image/webp")

    explaining = _Explaining(config)

    @app.get("/api/explain/{image_id}")
    def explain_image(image_id: int, layers: str = Query("", max_length=200)) -> FileResponse:
        if not config.explain_model:
            raise HTTPException(404, "no explain model: start loracap edit with --explain-model ID_OR_FOLDER")
        try:
            chosen = parse_layers(layers)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return FileResponse(explaining.png(index, _file(index, image_id), chosen), media_type="image/png")

    @app.put("/api/image/{image_id}/caption")
    def save_caption(image_id: int, body: CaptionEdit) -> Any:
        row = index.get(image_id)
        if row is None:
            raise HTTPException(404, f"no image {image_id}")
        store = index.store()  # reads the caption as it is on disk now; the same store writes the new one
        try:
            disk = store.existing(index.root / row["path"])
        except OSError as exc:  # never written over from bytes that could not be read
            detail = f"the caption file cannot be read ({exc.strerror or exc}); it is left as it is"
            return JSONResponse({"detail": detail, "disk": None, "yours": body.text}, status_code=409)
        if (disk or None) != (body.base or None):
            return JSONResponse(
                {
                    "detail": "the caption changed on disk since the page loaded it",
                    "disk": disk,
                    "yours": body.text,
                },
                status_code=409,
            )
        _write(index, [(image_id, row["path"], body.text)], store)
        tokens = _tokens(tokens_of["tokenizer"], body.text)
        if tokens is not None:
            index.set_tokens([(image_id, tokens)])
        return {"caption": body.text.strip(), "tokens": tokens}

    @app.post("/api/tokens")
    def tokens(body: TokenRequest) -> dict[str, Any]:
        return {"tokens": _tokens(tokens_of["tokenizer"], body.text), "max_tokens": index.max_tokens}

    @app.get("/api/tags")
    def tags_panel(sort: str = "count") -> dict[str, Any]:
        if sort not in ("count", "name"):
            raise HTTPException(422, "sort is count or name")
        if not index.tag_dataset:  # prose: its comma-separated phrases are not tags to list
            return {"tags": [], "common": [], "once": [], "prose": True}
        counts = index.tag_counts()
        counts.sort(key=(lambda c: (-c[1], c[0])) if sort == "count" else (lambda c: c[0]))
        total = max(1, index.count())
        return {
            "tags": [{"tag": t, "count": n} for t, n in counts],
            "common": [t for t, n in counts if n >= 0.9 * total and total > 1],
            "once": [t for t, n in counts if n == 1],
        }

    @app.post("/api/bulk/preview")
    def bulk_preview(body: BulkBody) -> dict[str, Any]:
        changes = _changes(index, body)
        return {"count": len(changes), "changes": changes[:MAX_PAGE]}

    @app.post("/api/bulk/apply")
    def bulk_apply(body: BulkBody) -> dict[str, Any]:
        changes = _changes(index, body)
        written, conflicts = _write_checked(index, changes)
        undo_id = undo_log.record(_op(body).describe(), written) if written else None
        return {"changed": len(written), "conflicts": conflicts, "undo_id": undo_id}

    @app.get("/api/undo")
    def undo_entries() -> dict[str, Any]:
        entries = undo_log.entries()
        return {"entries": [{k: e[k] for k in ("id", "when", "what", "undone")} | {"count": len(e["changes"])}
                            for e in entries]}  # fmt: skip

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        entry = undo_log.newest_open()
        if entry is None:
            raise HTTPException(409, "nothing to undo")
        ids = {r["path"]: r["id"] for r in index.select(Selection(), limit=None)[1]}
        back = [{"id": ids[c["path"]], "path": c["path"], "before": c["after"], "after": c["before"]}
                for c in entry["changes"] if c["path"] in ids]  # fmt: skip
        written, conflicts = _write_checked(index, back)
        undo_log.mark_undone(entry["id"])
        return {"reverted": len(written), "conflicts": conflicts}

    @app.post("/api/recaption")
    def recaption(body: RecaptionBody) -> dict[str, Any]:
        model = body.model or config.model
        if not model:
            raise HTTPException(422, "no model: give one (or start loracap edit with --model)")
        rows = [index.get(i) for i in body.ids]
        if any(r is None for r in rows):
            raise HTTPException(404, "an id names no image")
        return {"job": start_job(len(rows), _recaption, index, rows, model, body.style or "caption", config)}

    @app.post("/api/clip")
    def clip(body: ClipBody | None = None) -> dict[str, Any]:
        rows = [r for r in index.select(Selection(), limit=None)[1] if (r["caption"] or "").strip()]
        model = (body.model if body else None) or config.clip_model
        return {"job": start_job(len(rows), _clip_job, index, rows, model, config)}

    def start_job(total: int, work: Any, *args: Any) -> str:
        with job_lock:
            if any(j.state == "running" for j in jobs.values()):
                raise HTTPException(409, "a job is already running")
            job = _Job(total)
            jobs[job.id] = job
        threading.Thread(target=work, args=(*args[:1], job, *args[1:]), daemon=True).start()
        return job.id

    @app.get("/api/jobs")
    def job_list() -> dict[str, Any]:
        """Every job of this server with its state (the page re-attaches to a running one after a reload)."""
        return {"jobs": [{"job": j.id, **j.event()} for j in jobs.values()]}

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")

        async def stream() -> Any:
            while True:
                yield f"data: {json.dumps(job.event())}\n\n"
                if job.state != "running":
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/api/proposals")
    def proposals() -> dict[str, Any]:
        return {
            "items": [{k: r[k] for k in ("id", "path", "caption", "proposal")} for r in index.proposals()]
        }

    @app.post("/api/proposals/accept")
    def accept(body: ProposalBody) -> dict[str, Any]:
        rows = _chosen_proposals(index, body)
        written, conflicts = _write_checked(
            index,
            [
                {"id": r["id"], "path": r["path"], "before": r["caption"], "after": r["proposal"]}
                for r in rows
            ],
        )
        if written:
            undo_log.record("accept re-captions", written)
        index.set_proposals((r["id"], None) for r in rows if r["path"] not in conflicts)
        return {"accepted": len(written), "conflicts": conflicts}

    @app.post("/api/proposals/reject")
    def reject(body: ProposalBody) -> dict[str, Any]:
        rows = _chosen_proposals(index, body)
        index.set_proposals((r["id"], None) for r in rows)
        return {"rejected": len(rows)}

    return app


# --- helpers ------------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _selection(body: QueryBody) -> Selection:
    if body.flag and body.flag not in FLAGS:
        raise HTTPException(422, f"flag is one of {', '.join(FLAGS)}")
    return Selection(q=body.q, tags=tuple(body.tags), without=tuple(body.without), flag=body.flag)


def _item(index: Index, row: dict[str, Any]) -> dict[str, Any]:
    flags = []
    if not (row["caption"] or "").strip():
        flags.append("no-caption")
    if row["tokens"] is not None and row["tokens"] > index.max_tokens:
        flags.append("truncated")
    if row.get("fused"):
        flags.append("fused-trigger")
    if row["clip"] is not None and row["clip"] < LOW_CLIP:
        flags.append("low-clip")
    if row.get("duplicate"):
        flags.append("duplicate")
    return {
        "id": row["id"],
        "path": row["path"],
        "caption": row["caption"],
        "tag_caption": index.tag_dataset,
        "tokens": row["tokens"],
        "flags": flags,
        "clip": row["clip"],
        "proposal": row["proposal"],
    }


def _file(index: Index, image_id: int) -> Path:
    path = index.file(image_id)
    if path is None:
        raise HTTPException(404, f"no image {image_id} inside the dataset")
    return path


def _thumbnail(index: Index, image_id: int) -> Path:
    """A WebP thumbnail in DIR/.loracap/thumbs, made on first request (named by path and mtime, so an
    edited image gets a new one)."""
    import hashlib

    from loracap.files import atomic_write_bytes
    from loracap.inputs import ImageDecodeError, load_image

    path = _file(index, image_id)
    stamp = f"{path}:{path.stat().st_mtime_ns}".encode()
    thumb = index.folder / "thumbs" / f"{hashlib.sha256(stamp).hexdigest()[:24]}.webp"
    if not thumb.is_file():
        try:
            image = load_image(path, max_side=THUMB_SIDE)
        except ImageDecodeError as exc:
            raise HTTPException(422, f"{path.name} cannot be decoded: {exc.reason}") from None
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=80)
        thumb.parent.mkdir(exist_ok=True)
        atomic_write_bytes(thumb, buffer.getvalue())
    return thumb


class _Explaining:
    """The explain model of `loracap edit --explain-model`, loaded on first use, and its PNGs in
    DIR/.loracap/explain (named by image path and mtime, model and layers, so an edited image gets a new
    one). One image at a time: requests come in on several threads, the model runs one batch at a time."""

    def __init__(self, config: EditConfig) -> None:
        self.config = config
        self.explainer: Any = None
        self.lock = threading.Lock()

    def png(self, index: Index, path: Path, layers: tuple[int, ...] | None) -> Path:
        import hashlib

        from loracap.backends import BackendError
        from loracap.inputs import ImageDecodeError, load_image
        from loracap.quality.explain import Explainer, draw_explanation, write_png

        stamp = f"{path}:{path.stat().st_mtime_ns}:{self.config.explain_model}:{layers}".encode()
        out = index.folder / "explain" / f"{hashlib.sha256(stamp).hexdigest()[:24]}.png"
        if out.is_file():
            return out
        with self.lock:
            if self.explainer is None:
                self.explainer = Explainer(self.config.explain_model, device=self.config.device)
            try:
                image = load_image(path, min_side=self.explainer.image_side or None)
                shown = self.explainer.explain(image, layers=layers)
            except ImageDecodeError as exc:
                raise HTTPException(422, f"{path.name} cannot be decoded: {exc.reason}") from None
            except (BackendError, ValueError) as exc:  # layers the decoder does not have, a mode it lacks
                raise HTTPException(422, str(exc)) from None
            write_png(draw_explanation(image, shown), out)
        return out


def _op(body: BulkBody) -> BulkOp:
    op = BulkOp(**body.op.model_dump())
    try:
        op.check()
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return op


def _changes(index: Index, body: BulkBody) -> list[dict[str, Any]]:
    """Every caption the operation would change in the selection: id, path, before, after."""
    op = _op(body)
    selection = body.selection
    if selection.ids is not None:
        rows = [r for r in (index.get(i) for i in selection.ids) if r is not None]
    elif selection.query is not None:
        rows = index.select(_selection(selection.query), limit=None)[1]
    else:
        raise HTTPException(422, "the selection needs ids or a query")
    changes = []
    for row in rows:
        after = apply_op(op, row["caption"], tags=index.tag_dataset).strip()
        if after != (row["caption"] or "").strip():
            changes.append({"id": row["id"], "path": row["path"], "before": row["caption"], "after": after})
    return changes


def _write(index: Index, items: list[tuple[int, str, str]], store: Any) -> None:
    """Write captions (id, path, text) in the dataset's layout through `store` (the one that read what
    was on disk, closed here), then record them in the index."""
    try:
        for _, path, text in items:
            store.write(index.root / path, text)
    finally:
        store.close()
    index.set_captions((image_id, text.strip()) for image_id, _, text in items)


def _write_checked(index: Index, changes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Write the changes whose caption on disk is still their `before`; the others are conflicts."""
    store = index.store()
    ok, conflicts = [], []
    for change in changes:
        try:
            disk = store.existing(index.root / change["path"])
        except OSError:
            disk = "\0unreadable"
        if (disk or None) != ((change["before"] or "").strip() or None):
            conflicts.append(change["path"])
        else:
            ok.append(change)
    _write(index, [(c["id"], c["path"], c["after"]) for c in ok], store)
    return [{"path": c["path"], "before": c["before"], "after": c["after"]} for c in ok], conflicts


def _chosen_proposals(index: Index, body: ProposalBody) -> list[dict[str, Any]]:
    rows = index.proposals()
    if body.all:
        return rows
    if body.ids is None:
        raise HTTPException(422, "give ids, or all: true")
    wanted = set(body.ids)
    return [r for r in rows if r["id"] in wanted]


def _load_tokenizer(spec: str | None) -> Any:
    """The CLIP tokenizer for the counter, if it can be had without the network; None otherwise."""
    from loracap.hub import ModelUnavailable, resolve_model

    try:
        from transformers import AutoTokenizer

        folder = resolve_model(spec or "openai/clip-vit-large-patch14", offline=True)
        return AutoTokenizer.from_pretrained(folder)
    except (ModelUnavailable, OSError, ValueError, ImportError) as exc:
        reason = str(exc).splitlines()[0].replace("--model PATH", "--tokenizer PATH") if str(exc) else exc
        log.info("no CLIP tokenizer for the token counter (%s)", reason)
        return None


def _tokens(tokenizer: Any, text: str) -> int | None:
    if tokenizer is None:
        return None
    return len(tokenizer(text, truncation=False).input_ids)


def _count_tokens(index: Index, tokenizer: Any, rows: list[dict[str, Any]]) -> None:
    """Token counts of the rows that have none yet (a page at a time, cached in the index)."""
    todo = [r for r in rows if r["tokens"] is None and r["caption"]]
    if tokenizer is None or not todo:
        return
    counts = [len(ids) for ids in tokenizer([r["caption"] for r in todo], truncation=False).input_ids]
    for row, count in zip(todo, counts, strict=True):
        row["tokens"] = count
    index.set_tokens((r["id"], r["tokens"]) for r in todo)


def _read_report(index: Index) -> None:
    """CLIP scores and trigger flags from DIR/loracap-report/report.json, when `loracap report` wrote one."""
    path = index.root / "loracap-report" / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    index.set_report(data.get("pairs") or data.get("captions", {}).get("pairs") or [])


def _recaption(
    index: Index, job: _Job, rows: list[dict[str, Any]], model: str, style: str, config: EditConfig
) -> None:
    """The re-captioning job: loracap's batch step over the chosen images; results become proposals."""
    from loracap.backends.batch_size import BatchSize
    from loracap.inputs import ImageDecodeError, load_image
    from loracap.pipeline import CaptionConfig, caption_batch, prepare_batch
    from loracap.request import StyleChoice, resolve_request

    try:
        caption_config = CaptionConfig(dir=index.root, model=model, style_choice=StyleChoice(style=style),
                                       device=config.device, progress=False)  # fmt: skip
        caption_config.check()
        backend = caption_config.load_backend()
        request = resolve_request(caption_config.style_choice, backend)
        sizer = BatchSize(None, backend, workers=0)
        size = backend.default_batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            items, images = [], []
            for row in chunk:
                try:
                    images.append(load_image(index.root / row["path"], min_side=backend.image_side or None))
                    items.append(_Item(index.root / row["path"], row["caption"], row["id"]))
                except ImageDecodeError:
                    pass
            if items:
                inputs = prepare_batch(backend, request, items, images)
                steps = caption_batch(backend, request, items, inputs, caption_config.generation,
                                      caption_config.postprocess, sizer)  # fmt: skip
                index.set_proposals((item.id, caption) for item, caption, error in steps if error is None)
            job.done += len(chunk)
        job.state = "done"
    except Exception as exc:  # noqa: BLE001 - the job fails, the server goes on; the page shows why
        log.exception("re-captioning failed")
        job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"


def _clip_job(
    index: Index, job: _Job, rows: list[dict[str, Any]], model: str | None, config: EditConfig
) -> None:
    """CLIP scores of every captioned image, through `loracap report`'s scorer and its cache."""
    from loracap.quality.clipscore import DEFAULT_MODEL, clip_scores

    try:
        run = clip_scores(
            [(index.root / r["path"], r["caption"]) for r in rows],
            model=model or DEFAULT_MODEL,
            device=config.device,
            progress=False,
        )
        by_path = {Path(p.path).resolve(): p.score for p in run.pairs if p.score is not None}
        index.set_clip((r["path"], by_path.get((index.root / r["path"]).resolve())) for r in rows)
        job.done, job.state = job.total, "done"
    except Exception as exc:  # noqa: BLE001 - the job fails, the server goes on; the page shows why
        log.exception("CLIP scoring failed")
        job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"


@dataclass
class _Item:
    path: Path
    old: str | None
    id: int


def edit(config: EditConfig) -> None:
    """Index `config.dir`, serve the editor until Ctrl-C, and open it in the browser unless told not to."""
    import uvicorn

    app = create_app(config)
    url = f"http://{config.host}:{config.port}/"
    if app.state.token:
        url += f"?token={app.state.token}"
        print(f"loracap: {config.host} is not this machine only: the page needs its token, {app.state.token}")
    print(f"loracap: editing {app.state.index.root} at {url} (Ctrl-C stops)", flush=True)
    if config.browser:
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
