"""Dynamic batching: one bounded queue and its inference worker thread(s) per model version.

Callers (on the event loop) submit preprocessed images; the worker takes whatever is queued,
up to ``max_batch_size``, runs ONE forward pass and hands each caller its own row. It never
waits while the device is idle: with ``max_delay_s == 0`` (the default) a batch is whatever
arrived while the previous batch ran, so batches grow with load by themselves.

Helper workers (``workers > 1``, chosen by ``Settings.forward_workers``): where the torch
threads leave cores free (1 torch thread on 2 cores), more than one forward can run at once,
each single-threaded, with no OpenMP barrier between them (ResNet-18 LIMIT at batch 16 on
2 cores: 32.0 img/s with two such forwards, 26.6 with one two-thread forward). A helper starts
a batch as soon as ``helper_backlog`` images wait (default 1: an image never waits for the busy
primary while a core is free; a half-batch trigger left one core idle at C=8: ResNet-18 21 vs
38 img/s, ResNet-50 8.8 vs 16.0).

Filling (``_fill``): requests announce their images while they decode; a forward that has
a partial batch waits for announced images as long as each comes within about one image's
forward time of the one before (at most ``FILL_MAX_IMAGES`` images' time in all). Under load
one batch's answers come back as a cohort of new requests decoded one by one; without the fill
the first decoded image started a forward of its own (ResNet-50 C=32: 14.3 -> 17.0 img/s and
138 -> 116 CPU ms per image with the fill and helper backlog 1). A single wait of one image's
time still split cohorts whose decoding took longer than that: ResNet-18 C=32 mean batch
10.7 -> 13.9 and ResNet-20 C=32 350 -> 380 img/s with the rolling wait (bench compare, bench/NOTES.md).

Lone images (``lone_threads``, ``LONE_IMAGE_THREADS``): a forward of one image while nothing
else is queued, decoding or computing runs with every core's torch thread, since the other
cores would idle (ResNet-50 C=1 p50 142 -> 105 ms on 2 cores). If another image arrives during
such a forward, none goes wide for ``WIDE_PAUSE_S``: under load the threads would fight. With
``WORKERS``, ``siblings`` (``workers.ForwardBoard``) extends "nothing else" to the other
processes: none of them may be computing, and one that starts during a wide forward pauses them too.

Guarantees:
- admission is all-or-nothing per request; a full queue answers ``QueueFull`` (503) at once;
- images whose request passed its deadline, or whose caller went away, are dropped before
  compute (504 for the caller);
- a failing batch fails each of its callers (500) and the worker goes on with the next one;
  an out-of-memory error splits the batch in halves and retries them;
- ``close()`` lets everything already queued finish (drain) before the worker stops.

The forward is ``self.forward_fn`` (batch ``[N, ...]`` -> probabilities ``[N, K]``): tests wrap
it to inject faults or slowness; production code never replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .deadline import before
from .errors import InferenceFailed, ModelDraining, QueueFull, RequestTimeout, ServiceError

if TYPE_CHECKING:
    from .workers import ForwardBoard

log = logging.getLogger("service.batching")

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
StackFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]
PrepareFn = Callable[[Any], Any]  # an image's bytes -> a row, or what ``finish_fn`` takes
FinishFn = Callable[[Sequence[Any]], torch.Tensor]
_STOP = object()  # queued by close(): everything before it is served, then the worker exits


@dataclass(slots=True, eq=False)
class WorkItem:
    """One image waiting for the worker."""

    input: Any  # the preprocessed tensor, or the image's bytes when ``prepare`` is set
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic() after which the image is not computed any more
    # bytes -> decoded image (for ``Batcher.finish_fn``), run by the worker before the forward
    prepare: PrepareFn | None = None


class ItemsRejected(Exception):
    """Raised by a ``finish_fn`` when some of a batch's images cannot be used (a corrupt JPEG
    that only the batch decode found): ``errors`` maps their positions to what their callers
    get, ``batch`` holds the rows of the others, in order (None when none are left)."""

    def __init__(self, errors: dict[int, BaseException], batch: torch.Tensor | None) -> None:
        super().__init__(f"{len(errors)} image(s) rejected")
        self.errors = errors
        self.batch = batch


@dataclass(slots=True, eq=False)
class Announced:
    """Images announced to ``batcher`` while they are decoded (``Batcher.announce``)."""

    batcher: Batcher
    count: int
    open: bool = True  # still counted as incoming by ``batcher``


@dataclass(slots=True, frozen=True)
class Prediction:
    """The worker's answer for one image: the class probabilities and the top-1."""

    probs: np.ndarray  # float32 [K], sums to 1
    class_id: int
    confidence: float


def collect_batch(
    source: queue.Queue[Any],
    max_size: int,
    max_delay_s: float = 0.0,
    *,
    block_timeout: float | None = None,
) -> list[Any]:
    """Block for the first item, then take what is queued, up to ``max_size`` items.

    With ``max_delay_s > 0`` it waits at most that long (from the first item) for more items to
    fill the batch; with 0 it never waits for a second item. ``block_timeout`` bounds the wait
    for the first item (``[]`` when nothing came).
    """
    try:
        batch = [source.get(timeout=block_timeout)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + max_delay_s
    while len(batch) < max_size:
        try:
            batch.append(source.get_nowait())
            continue
        except queue.Empty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(source.get(timeout=remaining))
        except queue.Empty:
            break
    return batch


def is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


class _NoMetrics:
    """Stands in for a metric child when the batcher runs without a registry (unit tests)."""

    def observe(self, _value: float) -> None: ...

    def inc(self, _value: float = 1) -> None: ...

    def labels(self, *_labels: str) -> _NoMetrics:
        return self


_NO_METRICS = _NoMetrics()
FILL_POLL_S = 0.004  # how often a forward waiting for announced images rechecks them
FILL_MAX_IMAGES = 4  # a fill waits at most this many images' forward time in all
WIDE_PAUSE_S = 1.0  # no wide forward for this long after one that other images arrived during


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads on this thread, then restore.

    With OpenMP the count applies to the calling thread's parallel regions only; torch's
    process default changes for the block as well, which only threads that have not yet run
    a torch op would pick up: the workers and the preprocessing pool set their own at start.
    """
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Batcher:
    """Bounded queue + dedicated inference worker thread for one model version."""

    def __init__(
        self,
        forward_fn: ForwardFn,
        *,
        max_batch_size: int,
        max_queue: int,
        max_delay_s: float = 0.0,
        stack_fn: StackFn = torch.stack,
        finish_fn: FinishFn | None = None,
        name: str = "model",
        labels: Sequence[str] | None = None,
        metrics: Any = None,
        metric_labels: tuple[str, str] = ("model", "0"),
        workers: int = 1,
        helper_backlog: int = 1,
        threads: int | None = None,
        lone_threads: int = 1,
        lone_example: torch.Tensor | None = None,
        siblings: ForwardBoard | None = None,
    ) -> None:
        if min(max_batch_size, max_queue, workers, helper_backlog, lone_threads) < 1:
            raise ValueError(
                "max_batch_size, max_queue, workers, helper_backlog and lone_threads must be >= 1"
            )
        self.forward_fn = forward_fn
        self.stack_fn = stack_fn
        # what ``prepare`` returned for a batch's images -> their rows, in one call (the eval
        # preset over the batch); None: ``prepare`` returns the rows itself
        self.finish_fn = finish_fn
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.name = name
        self.labels = list(labels) if labels is not None else None
        self.batches_run = 0
        # queue.Queue, not SimpleQueue: with two consumers (primary and helper), CPython 3.11's
        # SimpleQueue.get(timeout=t) can block until the NEXT put when the other consumer takes
        # the item it was woken for after t has passed (its recomputed timeout goes negative,
        # which means "wait forever"): a forward topping up its batch (_fill) then held one
        # request's image for seconds while the helper served everyone else (a 504 in
        # tests/reliability/test_slow_clients.py; test_batching.py reproduces the race)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._backlog = threading.Condition(self._lock)  # idle helpers wait here for work
        self._pending = 0  # images admitted and not yet taken by a worker
        self._incoming = 0  # images of admitted requests still being decoded (announce())
        self._busy = 0  # workers holding a batch (filling, decoding or computing it)
        self._closed = False
        self._seconds_per_image = 0.01  # moving average, for Retry-After
        self.workers = workers  # the primary and workers - 1 helpers
        self._helper_backlog = helper_backlog  # images waiting before a helper starts
        # torch intra-op threads: ``threads`` for every batch (each worker sets its own, since
        # OpenMP's count is per calling thread), ``lone_threads`` for one image computed while
        # nothing else is queued, decoding or computing (the other cores are idle then), after
        # a warm-up forward of ``lone_example`` by each worker (its first wide forward pays
        # for a new OpenMP team: ResNet-18 44 vs 28 ms)
        self._base_threads = threads
        self.lone_threads = lone_threads
        self._arrivals = 0  # images submitted or announced so far (a wide forward's check)
        self._wide_after = 0.0  # time.monotonic() before which no forward goes wide
        self._lone_example = lone_example
        self._siblings = siblings  # the other service processes' forwards (WORKERS), or None
        self._warmed = threading.Barrier(workers + 1)
        self._threads = [
            threading.Thread(
                target=self._run, args=(index > 0,), daemon=True,
                name=f"infer-{name}" + (f"-helper{index}" if index else ""),
            )
            for index in range(self.workers)
        ]  # fmt: skip
        self._bind_metrics(metrics, metric_labels)

    def _bind_metrics(self, metrics: Any, mv: tuple[str, str]) -> None:
        self._metrics = metrics
        self._mv = mv
        if metrics is None:
            self._m_wait = self._m_forward = self._m_batch = self._m_conf = _NO_METRICS
            self._m_rejected = self._m_pred = self._m_oom = self._m_preprocess = _NO_METRICS
            return
        self._m_preprocess = metrics.preprocess.labels(*mv)
        self._m_wait = metrics.queue_wait.labels(*mv)
        self._m_forward = metrics.forward.labels(*mv)
        self._m_batch = metrics.batch_size.labels(*mv)
        self._m_conf = metrics.confidence.labels(*mv)
        self._m_rejected = metrics.rejected
        self._m_pred = metrics.predictions
        self._m_oom = metrics.oom_splits.labels(*mv)
        metrics.queue_depth.labels(*mv).set_function(lambda: self._pending)

    # -- caller side (event loop) -------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    def idle(self) -> bool:
        """Nothing is queued, announced or being computed, and a second forward thread exists.

        Then a lone image may be sent undecoded (``infer(..., prepare=...)``): one forward
        thread decodes and computes it, which saves two thread hand-offs and the wake-up of
        an idle forward thread. The second thread is what serves other requests meanwhile, so
        a slow decode (a big PNG) never holds up every forward.
        """
        return (
            self.workers > 1 and self._busy == 0 and self._pending == 0
            and self._incoming == 0 and not self._closed
        )  # fmt: skip

    def start(self) -> None:
        """Start the workers; returns once each has set its threads and warmed up."""
        for thread in self._threads:
            thread.start()
        self._warmed.wait()

    def _prepare_thread(self) -> None:
        try:
            if self._base_threads is not None:
                torch.set_num_threads(self._base_threads)
            if self.lone_threads > 1 and self._lone_example is not None:
                with intra_op_threads(self.lone_threads):
                    self.forward_fn(self.stack_fn([self._lone_example]))
        except Exception:  # a failing warm-up is the first request's problem, not start()'s
            log.exception("inference worker %s: warm-up failed", self.name)
        finally:
            self._warmed.wait()

    def announce(self, count: int) -> Announced:
        """Count ``count`` images as being decoded for this batcher until they are submitted.

        A forward that would start with a partial batch waits briefly for announced images
        (``_fill``); ``withdraw`` (idempotent) takes back what never arrives (a bad image).
        """
        with self._lock:
            self._incoming += count
            self._arrivals += count
        return Announced(self, count)

    def withdraw(self, announced: Announced | None) -> None:
        if announced is not None:
            with self._lock:
                self._settle(announced)

    def _settle(self, announced: Announced) -> None:
        """No longer expect ``announced`` (arrived or withdrawn); idempotent; lock held."""
        if announced.open and announced.batcher is self:
            announced.open = False
            self._incoming -= announced.count

    def submit(
        self,
        inputs: Sequence[Any],
        deadline: float,
        announced: Announced | None = None,
        prepare: PrepareFn | None = None,
    ) -> list[asyncio.Future[Any]]:
        """Queue every image of one request (all or none); returns one future per image.

        With ``prepare``, ``inputs`` are undecoded images that the worker turns into tensors
        with it just before the forward; an image it fails on gets the exception it raised.
        """
        loop = asyncio.get_running_loop()
        count = len(inputs)
        with self._lock:
            if announced is not None:
                self._settle(announced)  # they arrive
            if self._closed:
                raise ModelDraining(f"{self.name} is being unloaded; retry")
            if self._pending + count > self.max_queue:
                self._m_rejected.labels(*self._mv, "queue_full").inc()
                wait = (self._pending + count) * self._seconds_per_image
                raise QueueFull(
                    f"the queue of {self.name} is full ({self._pending} images waiting, "
                    f"limit {self.max_queue}); retry later",
                    retry_after=math.ceil(wait),
                )
            self._pending += count
            self._arrivals += count
            now = time.monotonic()
            futures = []
            for tensor in inputs:
                future = loop.create_future()
                self._queue.put(WorkItem(tensor, future, loop, now, deadline, prepare))
                futures.append(future)
            if self.workers > 1 and self._pending >= self._helper_backlog:
                self._backlog.notify()  # work waits while the primary may be busy: a helper
        return futures

    async def infer(
        self,
        inputs: Sequence[Any],
        deadline: float,
        announced: Announced | None = None,
        prepare: PrepareFn | None = None,
    ) -> list[Prediction]:
        """Queue the images and wait for their predictions, at most until ``deadline``.

        If images fail, the first of them in the request's order decides the error, whichever
        forward thread got to it first (a request's images may be split between two batches).
        """
        futures = self.submit(inputs, deadline, announced, prepare)
        try:
            outcomes = await before(deadline, asyncio.gather(*futures, return_exceptions=True))
        except asyncio.TimeoutError:
            self._m_rejected.labels(*self._mv, "timeout").inc()
            raise RequestTimeout(_timeout_detail()) from None
        finally:
            for future in futures:  # the worker skips cancelled items before compute
                future.cancel()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, let queued work finish, stop the workers; True if they stopped."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
                self._backlog.notify_all()  # idle helpers leave; the primary drains the queue
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- worker side (own thread) -------------------------------------------------------------

    def _run(self, helper: bool = False) -> None:
        self._prepare_thread()
        while True:
            if helper:
                if not self._wait_for_backlog():
                    return
                batch = collect_batch(self._queue, self.max_batch_size, 0.0, block_timeout=0.0)
            else:
                batch = collect_batch(self._queue, self.max_batch_size, self.max_delay_s)
            taken = sum(1 for item in batch if item is not _STOP)
            with self._lock:  # taken: no longer pending (a helper must not spin on them)
                self._pending -= taken
                self._busy += 1 if taken else 0
            self._fill(batch)
            stop = bool(batch) and batch[-1] is _STOP
            items = [item for item in batch if item is not _STOP]
            if items:
                try:
                    self._process(items)
                except BaseException as exc:  # never let the worker die
                    log.exception("inference worker %s: unexpected error", self.name)
                    self._fail(items, InferenceFailed(f"inference failed: {_describe(exc)}"))
            if taken:
                with self._lock:
                    self._busy -= 1
            if stop:
                if helper:  # the STOP is the primary's: it drains what is left, then exits
                    self._queue.put(_STOP)
                return

    def _fill(self, batch: list[Any]) -> None:
        """Top up a partial batch with images still being decoded, while they keep coming.

        Under load the answers of one batch come back as a cohort of new requests whose images
        are decoded one by one: without this, a free forward starts on the first decoded image
        and the rest wait for the next forward (ResNet-50, C=32: batches of 8-10 instead of 16,
        +17% CPU per image). The wait ends when nothing more is announced, when no image came
        within about one image's forward time (waiting longer would cost more than computing
        it in the next batch), or after ``FILL_MAX_IMAGES`` images' forward time in all; with
        nothing announced (C=1) it never waits.
        """
        if not batch or batch[-1] is _STOP:
            return
        per_image = max(self.max_delay_s, self._seconds_per_image)
        now = time.monotonic()
        cap = now + max(self.max_delay_s, FILL_MAX_IMAGES * self._seconds_per_image)
        deadline = now + per_image
        while len(batch) < self.max_batch_size:
            with self._lock:
                if self._incoming <= 0 or self._closed:
                    return
            now = time.monotonic()
            remaining = min(deadline, cap) - now
            if remaining <= 0:
                return
            try:  # short polls: an announced image may be withdrawn instead of arriving
                batch.append(self._queue.get(timeout=min(remaining, FILL_POLL_S)))
            except queue.Empty:
                continue
            if batch[-1] is _STOP:
                return
            with self._lock:
                self._pending -= 1
            deadline = time.monotonic() + per_image  # the next one is worth a wait as well

    def _wait_for_backlog(self) -> bool:
        """Block until ``helper_backlog`` images wait (True) or the batcher closes (False)."""
        with self._backlog:
            while self._pending < self._helper_backlog and not self._closed:
                self._backlog.wait()
            return not self._closed

    def _process(self, items: list[WorkItem]) -> None:
        now = time.monotonic()
        live: list[WorkItem] = []
        expired: list[WorkItem] = []
        for item in items:
            if item.future.cancelled():
                continue  # the caller is gone (timed out or disconnected)
            if now > item.deadline:
                expired.append(item)
            else:
                live.append(item)
                self._m_wait.observe(now - item.enqueued)
        if expired:
            self._m_rejected.labels(*self._mv, "timeout").inc(len(expired))
            self._fail(expired, RequestTimeout(_timeout_detail()))
        live, prepared = self._prepare(live)
        if not live:
            return
        wide = self.lone_threads > 1 and len(live) == 1 and self._alone()
        arrivals = self._arrivals
        sibling_starts = self._siblings.others_started() if wide and self._siblings else 0
        start = time.perf_counter()
        try:
            with (
                intra_op_threads(self.lone_threads) if wide else contextlib.nullcontext(),
                self._siblings.computing() if self._siblings else contextlib.nullcontext(),
            ):
                if prepared is None:
                    prepared = self.stack_fn([item.input for item in live])
                probs = self._forward(prepared)
            if probs.ndim != 2 or probs.shape[0] != len(live):
                raise RuntimeError(
                    f"forward returned shape {tuple(probs.shape)} for {len(live)} inputs"
                )
            results = self._postprocess(probs)
        except Exception as exc:
            log.exception("inference worker %s: batch of %d failed", self.name, len(live))
            self._m_rejected.labels(*self._mv, "inference_error").inc(len(live))
            self._fail(live, InferenceFailed(f"inference failed on the server: {_describe(exc)}"))
            return
        elapsed = time.perf_counter() - start
        with self._lock:
            self.batches_run += 1
        self._m_forward.observe(elapsed)
        self._m_batch.observe(len(live))
        if not wide:  # the fill and Retry-After reckon with forwards sharing the cores
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(live)
        elif self._arrivals != arrivals or (
            self._siblings is not None and self._siblings.others_started() != sibling_starts
        ):
            # an image came (here or in a sibling process) while this one had every core: its
            # decode and forward fought the wide forward's threads (ResNet-50 C=8 without this
            # pause: 16.6 -> 13.9 img/s)
            self._wide_after = time.monotonic() + WIDE_PAUSE_S
        self._deliver([(item, result, False) for item, result in zip(live, results, strict=True)])

    def _alone(self) -> bool:
        """This worker's batch is the only work (nothing queued, decoding or computing, and no
        sibling process computing), and no recent wide forward met other images."""
        with self._lock:
            quiet = self._busy <= 1 and self._pending == 0 and self._incoming == 0
        if self._siblings is not None and not self._siblings.others_idle():
            return False
        return quiet and time.monotonic() >= self._wide_after

    def _prepare(self, items: list[WorkItem]) -> tuple[list[WorkItem], torch.Tensor | None]:
        """Decode the images sent undecoded, then preprocess them together (``finish_fn``);
        one that fails to decode goes back to its caller alone. Returns the items left and,
        when ``finish_fn`` made all of their rows, the batch itself (None: stack the rows).

        Each observes the preprocessing histogram: its decode plus its share of the batch's.
        """
        ready: list[WorkItem] = []
        failed: list[tuple[WorkItem, Any, bool]] = []
        decoded: list[tuple[WorkItem, float]] = []
        for item in items:
            if item.prepare is not None:
                start = time.perf_counter()
                try:
                    item.input = item.prepare(item.input)
                except Exception as exc:  # the caller maps it (bad image -> 4xx)
                    failed.append((item, exc, True))
                    continue
                item.prepare = None
                decoded.append((item, time.perf_counter() - start))
            ready.append(item)
        if failed:
            self._deliver(failed)
        batch = None
        if decoded:
            start = time.perf_counter()
            if self.finish_fn is not None:
                try:
                    batch = self.finish_fn([item.input for item, _ in decoded])
                except ItemsRejected as rejected:  # those go back to their callers alone
                    self._deliver(
                        [(decoded[i][0], exc, True) for i, exc in rejected.errors.items()]
                    )
                    gone = {id(decoded[i][0]) for i in rejected.errors}
                    decoded = [pair for pair in decoded if id(pair[0]) not in gone]
                    ready = [item for item in ready if id(item) not in gone]
                    batch = rejected.batch
                if decoded and len(decoded) < len(ready):  # others came preprocessed: stack all
                    for (item, _), row in zip(decoded, batch, strict=True):
                        item.input = row
                    batch = None
            share = (time.perf_counter() - start) / max(1, len(decoded))
            for _, seconds in decoded:
                self._m_preprocess.observe(seconds + share)
        return ready, batch

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Run ``forward_fn``; on out-of-memory split the batch in halves and retry them."""
        try:
            return self.forward_fn(batch)
        except Exception as exc:
            if not is_out_of_memory(exc) or batch.shape[0] < 2:
                raise
        self._m_oom.inc()
        log.warning("inference worker %s: out of memory at batch %d, splitting", self.name,
                    batch.shape[0])  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        half = batch.shape[0] // 2
        return torch.cat([self._forward(batch[:half]), self._forward(batch[half:])])

    def _postprocess(self, probs: torch.Tensor) -> list[Prediction]:
        probs = probs.detach().to("cpu", torch.float32)
        confidences, class_ids = probs.max(dim=1)
        rows = probs.numpy()
        results = []
        for row, class_id, confidence in zip(
            rows, class_ids.tolist(), confidences.tolist(), strict=True
        ):
            results.append(Prediction(row, class_id, confidence))
            self._m_conf.observe(confidence)
            label = self.labels[class_id] if self.labels else str(class_id)
            self._m_pred.labels(*self._mv, label).inc()
        return results

    def _fail(self, items: list[WorkItem], error: ServiceError) -> None:
        self._deliver([(item, error, True) for item in items])

    @staticmethod
    def _deliver(outcomes: list[tuple[WorkItem, Any, bool]]) -> None:
        """Hand results to the callers' event loops: one wake-up per loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[WorkItem, Any, bool]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, group in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, group)


def _settle(group: list[tuple[WorkItem, Any, bool]]) -> None:
    for item, value, is_error in group:
        if item.future.done():
            continue
        if is_error:
            item.future.set_exception(value)
        else:
            item.future.set_result(value)


def _timeout_detail() -> str:
    return "the request waited longer than REQUEST_TIMEOUT_S and was dropped"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
