"""Batching for `loracap serve`: requests that arrive together and ask for the same thing share one
`backend.prepare` + generate call in a single model thread; work whose client has gone is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image

from ..backends.base import (
    Backend,
    BackendError,
    Generation,
    GenerationSettings,
)
from .protocol import ApiError

log = logging.getLogger("loracap.serve")


# --- batching -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """What requests must share to be captioned in one call."""

    mode: str
    prompt: str | None
    """The prompt shared by the group, or None when each job brings its own."""
    system: str | None
    settings: GenerationSettings
    seed: int | None = None
    solo: int = 0
    """A seeded request's own number: it is captioned alone, so its seed alone decides its sampling."""


@dataclass
class _Job:
    image: Image.Image
    group: _Group
    prompt: str | None
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests and captions each group with one prepare + generate call.

    One model thread runs the backend, so requests queue while it works and the next batch is whatever
    arrived meanwhile (up to max_batch). Jobs are grouped by `_Group`; with `per_image_prompts`
    (instruction-following backends, whose prepare takes one prompt per image) the prompt is not part of
    the group, so clients with different instructions still share a batch.

    A job whose future is cancelled (its client went away) is skipped; a running batch stops generating
    once all its jobs are cancelled, or once `close` is called (shutdown).
    """

    def __init__(
        self, backend: Backend, *, max_batch: int, wait_s: float, per_image_prompts: bool = False
    ) -> None:
        self.backend = backend
        self.per_image_prompts = per_image_prompts
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_s)
        self.pending: list[_Job] = []
        self.running: list[_Job] = []
        self.closing = False
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._solo = itertools.count(1)

    def start(self) -> None:
        if self.task is None or self.task.done():  # not started yet, or died (it logs why)
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loracap-model")
            self.event = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.task.add_done_callback(_log_crash)

    def close(self) -> None:
        """Shutdown has begun: refuse new work, answer what waits or runs with 503 now, and stop the
        running generation (the model thread checks `closing` after every token)."""
        self.closing = True
        for job in self.pending + self.running:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "the server is shutting down", code="unavailable"))
        self.pending = []

    async def stop(self) -> None:
        self.close()
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def submit(
        self,
        image: Image.Image,
        mode: str,
        prompt: str | None,
        settings: GenerationSettings,
        *,
        system: str | None = None,
        seed: int | None = None,
    ) -> asyncio.Future:
        """Queue one image; the future resolves to its Generation (or its raw caption, for a backend
        without `generate_detailed`). Cancel the future to drop the job."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="unavailable")
        self.start()
        assert self.event is not None
        seeded = seed is not None and settings.do_sample  # greedy decoding needs no seed
        group = _Group(
            mode,
            None if self.per_image_prompts else prompt,
            system,
            settings,
            seed if seeded else None,
            next(self._solo) if seeded else 0,
        )
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Job(image, group, prompt, future))
        self.event.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.event is not None
        while True:
            await self.event.wait()
            deadline = loop.time() + self.wait_s
            while len(self.pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self.event.clear()
                try:
                    await asyncio.wait_for(self.event.wait(), remaining)
                except TimeoutError:
                    break
            self.pending = [job for job in self.pending if not job.future.done()]  # clients gone
            jobs, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            if self.pending:
                self.event.set()
            else:
                self.event.clear()
            groups: dict[_Group, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for group, members in groups.items():
                if all(job.future.done() for job in members):
                    continue
                self.running = members
                try:
                    results = await loop.run_in_executor(self.executor, self._caption, group, members)
                except Exception as exc:  # noqa: BLE001 - the executor itself failed; fail this group only
                    results = [exc] * len(members)
                finally:
                    self.running = []
                for job, result in zip(members, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _caption(self, group: _Group, jobs: list[_Job]) -> list[Generation | str | BaseException]:
        """In the model thread: one call for the group; if it fails, one by one to isolate the culprit."""
        try:
            return list(self._generate(group, jobs))
        except BackendError as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001
            if len(jobs) == 1:
                return [exc]
        results: list[Generation | str | BaseException] = []
        for job in jobs:
            try:
                results.extend(self._generate(group, [job]))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def _generate(self, group: _Group, jobs: list[_Job]) -> list[Generation] | list[str]:
        images = [job.image for job in jobs]
        prompts: str | list[str] | None = group.prompt
        if self.per_image_prompts:
            distinct = {job.prompt for job in jobs}
            # One prompt for the batch when all agree (every backend takes that), else one per image.
            prompts = distinct.pop() if len(distinct) == 1 else [job.prompt or "" for job in jobs]
        system = {"system": group.system} if group.system else {}
        inputs = self.backend.prepare(images, group.mode, prompts, **system)
        if group.seed is not None:
            import torch

            # Only this thread generates, and a seeded job is alone in its batch: seeding the global
            # generator right before the call makes its sampling depend on the seed alone.
            torch.manual_seed(group.seed)
        detailed = getattr(self.backend, "generate_detailed", None)
        if detailed is not None:

            def interrupt() -> bool:  # read in the model thread; a future's state is one attribute
                return self.closing or all(job.future.done() for job in jobs)

            results: list[Generation] | list[str] = detailed(inputs, group.settings, interrupt)
        else:
            results = self.backend.generate(inputs, group.settings)
        if len(results) != len(images):
            raise RuntimeError(f"the backend returned {len(results)} captions for {len(images)} images")
        return results


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batching loop stopped; it restarts with the next request", exc_info=task.exception())


async def result_unless_disconnected(request: Request, future: asyncio.Future) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (the batcher skips it, or
    stops the batch if no client of it is left) and a 499 raised."""

    async def disconnected() -> None:
        # The body has been read, so the server's receive() waits until the client disconnects.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        future.cancel()  # a no-op once it is done; drops the job when this handler is cancelled too
    if future.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_disconnected")
    return future.result()
