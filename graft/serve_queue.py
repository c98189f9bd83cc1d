"""Load shedding and batching for ``graft serve``.

A request's images are counted from the moment its body has arrived until they reach the
model (decoding included): more than ``max_queue`` waiting and a new request is answered 503
at once. Each request also has a deadline, ``timeout_ms`` after its body arrived: past it,
the request is answered 503 and its images not yet decoded or batched are dropped (a model
call already running cannot be stopped; its rows for that request are discarded). Every 503
carries ``Retry-After``, an estimate of the time to work through the images waiting. So no
request waits for decoding or the model past its deadline (what remains is the event loop
writing the answer), and none is left hanging. A request that would wait more than half its
deadline is refused at once too (:class:`Shedder`).

    Shedder   the count of images waiting, the refusals, the Retry-After estimate
    Ticket    one request's images in that count, released as they reach the model
    Batcher   the model on whatever waits, one batch at a time, in a worker thread
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException

from .serve_ops import ServeMetrics

T = TypeVar("T")


class Ticket:
    """``left`` of one request's images still counted as waiting."""

    def __init__(self, shedder: Shedder, images: int):
        self.shedder, self.left = shedder, images

    def release(self, images: int) -> None:
        images = min(images, self.left)
        self.left -= images
        self.shedder.images -= images


class Shedder:
    """Bounds the images waiting for the model (``max_images``) and the time a request may
    take once its body is in (``timeout_s``); ``refuse`` makes the 503 for either.

    It also measures how fast the server gets through images while it is saturated (see
    Batcher: the time from one model call to the next while images are still waiting, per
    image; the event loop, decoding and the model all in it), and refuses at once a request
    that would wait more than half its deadline at that rate: it would likely time out after
    taking its share of the work, and the other half is for its own decoding and model call.
    So the queue bound adapts to the machine, however busy its cores are. While the server
    keeps up, nothing is measured and only ``max_images`` applies."""

    def __init__(self, max_images: int, timeout_s: float, metrics: ServeMetrics | None = None):
        self.max_images, self.timeout_s, self.metrics = max_images, timeout_s, metrics
        self.images = 0
        self.per_image_s = 0.0  #: seconds per image while saturated, smoothed

    def note_rate(self, seconds: float, images: int) -> None:
        per = seconds / max(1, images)
        old = self.per_image_s
        self.per_image_s = per if old == 0 else 0.8 * old + 0.2 * per

    def retry_after(self) -> int:
        """Whole seconds until the images waiting now are through (1 to 60)."""
        return min(60, max(1, math.ceil(self.images * self.per_image_s)))

    def is_full(self, images: int = 1) -> bool:
        """Whether a request of ``images`` arriving now would be refused."""
        total = self.images + images
        slow = self.images > 0 and total * self.per_image_s > self.timeout_s / 2
        return total > self.max_images or slow

    def refuse(self, reason: str, detail: str, retry_after: int | None = None) -> HTTPException:
        if self.metrics is not None:
            self.metrics.shed.labels(reason).inc()
        wait = retry_after or self.retry_after()
        return HTTPException(503, f"{detail}: retry in {wait} s.", {"Retry-After": str(wait)})

    def full_refusal(self) -> HTTPException:
        """The 503 for a request that finds the queue full (counted in the metrics)."""
        return self.refuse(
            "queue_full",
            f"The server is at capacity ({self.images} images waiting for the model, about "
            f"{self.images * self.per_image_s:.1f} s of work; it takes up to {self.max_images} "
            f"images or {self.timeout_s / 2:g} s)",
        )

    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Count ``images`` as waiting until the ticket releases them (or the block ends)."""
        if self.is_full(images):
            raise self.full_refusal()
        ticket = Ticket(self, images)
        self.images += images
        try:
            yield ticket
        finally:
            ticket.release(ticket.left)

    def deadline(self) -> float:
        """The event loop's time by which a request admitted now must be answered."""
        return asyncio.get_running_loop().time() + self.timeout_s

    async def within(self, deadline: float, work: Awaitable[T], doing: str) -> T:
        """``work``'s result, or 503 at ``deadline`` (``work`` is cancelled: a job still in
        the Batcher's queue or the decoder's is then never run)."""
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except TimeoutError:
            raise self.refuse(
                "deadline",
                f"The server is overloaded: the request was not answered within "
                f"{1000 * self.timeout_s:g} ms ({doing})",
            ) from None


class Batcher:
    """Runs ``fn`` on the images of all requests waiting at that moment, one batch at a time,
    in a worker thread (OpenVINO, ONNX Runtime and PyTorch release the GIL while they
    compute). A job whose request gave up (its future cancelled) is skipped, never run."""

    def __init__(
        self,
        fn: Callable[[list[Any]], np.ndarray],
        max_batch: int,
        shedder: Shedder | None = None,
        metrics: ServeMetrics | None = None,
    ):
        self.fn, self.max_batch, self.shedder, self.metrics = fn, max_batch, shedder, metrics
        self.queue: asyncio.Queue[tuple[list[Any], asyncio.Future, Ticket | None]]
        self.queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        #: the last model call: its start, its images, whether images were left waiting
        self._last: tuple[float, int, bool] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, images: list[Any], ticket: Ticket | None = None) -> np.ndarray:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((images, future, ticket))
        return await future

    def _take(self, size: int) -> list[tuple[list[Any], asyncio.Future, Ticket | None]]:
        """The live jobs waiting now, while the batch (``size`` images so far) is under
        ``max_batch``."""
        jobs = []
        while size < self.max_batch and not self.queue.empty():
            job = self.queue.get_nowait()
            if not job[1].done():  # done: its request timed out or went away
                jobs.append(job)
                size += len(job[0])
        return jobs

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            if first[1].done():
                continue
            jobs = [first, *self._take(len(first[0]))]
            images = [im for job in jobs for im in job[0]]
            for batch, _, ticket in jobs:
                if ticket is not None:
                    ticket.release(len(batch))
            started = time.perf_counter()
            if self.shedder is not None:
                # images waiting now and at the last call: no idle time in between
                busy = self.shedder.images > 0
                if self._last is not None and self._last[2] and busy:
                    self.shedder.note_rate(started - self._last[0], self._last[1])
                self._last = (started, len(images), busy)
            try:
                probs = await asyncio.to_thread(self.fn, images)
            except Exception as exc:  # the requests in this batch fail; the server goes on
                for _, future, _ in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._record(len(images), time.perf_counter() - started)
            start = 0
            for batch, future, _ in jobs:
                if not future.done():
                    future.set_result(probs[start : start + len(batch)])
                start += len(batch)

    def _record(self, images: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.batch.observe(images)
            self.metrics.model_seconds.observe(seconds)


__all__ = ["Batcher", "Shedder", "Ticket"]
