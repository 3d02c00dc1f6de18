"""Micro-batching: many concurrent requests, one model thread, batches in between.

    request threads --submit(key, payloads)--> bounded queue --> model thread --run_batch(key, [...])
                 <------------- one Future per item, resolved with that item's result ----------

* One worker thread owns the model; nothing else calls it.
* Items carry a ``key`` (for scoring: ``(task, input kind)``); a batch only ever holds items of one
  key, because a backend scores one prompt per call. The oldest queued item picks the key of the
  next batch, so no key starves.
* A batch is closed when its cost reaches ``max_batch`` (cost = frames; 1 for an image), or when
  ``max_wait_s`` has passed since its oldest item was queued. The worker only waits while some
  request has announced itself (``reserve()``: it is decoding and will submit soon); with nothing on
  the way, a lone item runs at once, so a single sequential client never pays ``max_wait_s``.
* The queue is bounded by items: ``submit`` raises :class:`QueueFull` (all or nothing for a request)
  when the items would not fit, with a ``retry_after`` estimate from the recent throughput.
* A cancelled Future (the request timed out) is dropped before it reaches the model.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class QueueFull(RuntimeError):
    """The queue cannot take the items now; try again after ``retry_after`` seconds."""

    def __init__(self, queued: int, capacity: int, wanted: int, retry_after: int):
        super().__init__(f"server busy: {queued} of {capacity} queue slots taken, {wanted} needed; retry in {retry_after} s")
        self.queued, self.capacity, self.wanted, self.retry_after = queued, capacity, wanted, retry_after


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


@dataclass
class _Job:
    key: Hashable
    payload: Any
    cost: int
    future: Future
    queued_at: float


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    rejected: int = 0  # items refused because the queue was full
    busy_s: float = 0.0  # time spent inside run_batch
    sizes: dict[int, int] = field(default_factory=dict)  # batch size (items) -> count

    def as_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0,
                "rejected_items": self.rejected, "model_busy_s": round(self.busy_s, 3), "batch_sizes": dict(sorted(self.sizes.items()))}


class Ticket:
    """A request that is decoding and will submit soon (see ``MicroBatcher.reserve``)."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.open = True

    def release(self) -> None:
        with self._batcher._cond:
            self._release_locked()

    def _release_locked(self) -> None:
        if self.open:
            self.open = False
            self._batcher._expected -= 1
            self._batcher._cond.notify_all()

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MicroBatcher:
    """Gathers items of concurrent callers into batches for one worker thread.

    ``run_batch(key, payloads) -> results`` is called on the worker thread only, with 1 to
    ``max_batch`` payloads (more cost only when a single item costs more); it returns one result per
    payload, in order. If it raises, every item of that batch gets the exception.
    """

    def __init__(self, run_batch: Callable[[Hashable, list], Sequence], max_batch: int = 16,
                 max_wait_s: float = 0.01, max_queue: int = 256, name: str = "qalign-model"):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.name = name
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._expected = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rate = 0.0  # items per second, smoothed, for Retry-After

    # ------------------------------------------------------------------ caller side

    def start(self) -> "MicroBatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking work, finish the batch in progress, fail what is still queued."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosed("server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def has_room(self, n: int) -> bool:
        return len(self._queue) + n <= self.max_queue

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (>= 1, <= 60)."""
        rate = self._rate
        if rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(len(self._queue) / rate))))

    def reject(self, n: int) -> QueueFull:
        with self._cond:
            self.stats.rejected += n
            return QueueFull(len(self._queue), self.max_queue, n, self.retry_after())

    def reserve(self) -> Ticket:
        """Announce a request that will submit soon, so the worker may wait for it (max_wait_s)."""
        with self._cond:
            self._expected += 1
            return Ticket(self)

    def submit(self, items: Sequence[tuple[Hashable, Any, int]], ticket: Ticket | None = None) -> list[Future]:
        """Queue ``(key, payload, cost)`` items; one Future each. All or nothing: raises
        :class:`QueueFull` when they do not all fit, :class:`BatcherClosed` after ``close``."""
        now = time.monotonic()
        with self._cond:
            if ticket is not None:
                ticket._release_locked()
            if self._closed:
                raise BatcherClosed("server is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                self.stats.rejected += len(items)
                raise QueueFull(len(self._queue), self.max_queue, len(items), self.retry_after())
            futures = []
            for key, payload, cost in items:
                fut: Future = Future()
                self._queue.append(_Job(key, payload, max(1, int(cost)), fut, now))
                futures.append(fut)
            self._cond.notify_all()
            return futures

    def cancel(self, futures: Sequence[Future]) -> None:
        """Drop still-queued items (a request gave up); items already running finish."""
        doomed = set(map(id, futures))
        with self._cond:
            kept = [j for j in self._queue if id(j.future) not in doomed]
            if len(kept) != len(self._queue):
                self._queue = deque(kept)
        for fut in futures:
            fut.cancel()

    # ------------------------------------------------------------------ worker side

    def _same_key_cost(self, key) -> int:
        total = 0
        for job in self._queue:
            if job.key == key:
                total += job.cost
                if total >= self.max_batch:
                    break
        return total

    def _take(self) -> list[_Job] | None:
        """Block until a batch is due; None once closed and empty."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.queued_at + self.max_wait_s
            while not self._closed and self._expected > 0 and self._same_key_cost(first.key) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, kept, cost = [], deque(), 0
            for job in self._queue:
                if job.key == first.key and (not batch or cost + job.cost <= self.max_batch) and not job.future.cancelled():
                    batch.append(job)
                    cost += job.cost
                elif not job.future.cancelled():
                    kept.append(job)
            self._queue = kept
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.monotonic()
            try:
                results = list(self.run_batch(live[0].key, [job.payload for job in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as exc:  # noqa: BLE001 - every item learns why
                for job in live:
                    job.future.set_exception(exc)
            else:
                for job, result in zip(live, results):
                    job.future.set_result(result)
            elapsed = max(time.monotonic() - started, 1e-6)
            with self._cond:
                s = self.stats
                s.batches += 1
                s.items += len(live)
                s.largest = max(s.largest, len(live))
                s.busy_s += elapsed
                s.sizes[len(live)] = s.sizes.get(len(live), 0) + 1
                rate = len(live) / elapsed
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
