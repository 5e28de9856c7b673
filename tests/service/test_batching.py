"""Unit tests of the dynamic batcher, without HTTP: collect_batch and the inference worker."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import threading
import time

import pytest
import torch

from service.batching import Batcher, ItemsRejected, collect_batch, is_out_of_memory
from service.errors import InferenceFailed, ModelDraining, QueueFull, RequestTimeout
from service.metrics import Metrics

CLASSES = 4


class RecordingForward:
    """forward_fn for tests: class = input value mod 4; records every batch it computes."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None, oom_above: int = 0):
        self.delay = delay
        self.fail_on = fail_on
        self.oom_above = oom_above
        self.batches: list[list[float]] = []
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0  # forwards seen running at the same time

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        values = batch[:, 0].tolist()
        if self.oom_above and len(values) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        with self.lock:
            self.batches.append(values)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.delay:
                time.sleep(self.delay)
        finally:
            with self.lock:
                self.running -= 1
        if self.fail_on is not None and self.fail_on in values:
            raise ValueError("injected fault")
        return torch.nn.functional.one_hot(batch[:, 0].long() % CLASSES, CLASSES).float()

    @property
    def seen(self) -> list[float]:
        return [v for batch in self.batches for v in batch]


def item(value: float) -> torch.Tensor:
    return torch.tensor([value])


def make_batcher(forward: RecordingForward, **kw) -> Batcher:
    options = {"max_batch_size": 8, "max_queue": 64, "max_delay_s": 0.0, "workers": 1} | kw
    batcher = Batcher(forward, **options)
    batcher.start()
    return batcher


def far() -> float:
    return time.monotonic() + 30


# -- collect_batch ---------------------------------------------------------------------------


def test_collect_batch_takes_what_is_queued_up_to_max_size():
    q: queue.Queue[int] = queue.Queue()
    for i in range(10):
        q.put(i)
    assert collect_batch(q, 4) == [0, 1, 2, 3]
    assert collect_batch(q, 100) == [4, 5, 6, 7, 8, 9]


def test_collect_batch_never_waits_without_delay():
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    start = time.perf_counter()
    assert collect_batch(q, 32, 0.0) == [1]
    assert time.perf_counter() - start < 0.05


def test_collect_batch_waits_up_to_the_delay_for_more():
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    threading.Timer(0.05, q.put, args=(2,)).start()
    start = time.perf_counter()
    assert collect_batch(q, 2, 2.0) == [1, 2]  # full batch: returns before the delay ends
    assert time.perf_counter() - start < 1.0
    q.put(3)
    start = time.perf_counter()
    assert collect_batch(q, 8, 0.1) == [3]
    assert 0.09 <= time.perf_counter() - start < 1.0


def test_collect_batch_returns_empty_after_block_timeout():
    q: queue.Queue[int] = queue.Queue()
    assert collect_batch(q, 8, 0.0, block_timeout=0.01) == []


def test_a_timed_get_on_the_batch_queue_returns_when_another_worker_took_its_item():
    """Two workers take from one queue; a forward topping up its batch polls it with a short
    timeout. CPython 3.11's SimpleQueue broke that timeout: woken by a put whose item the other
    worker took after the timeout had passed, it waited for the NEXT put (a 504 under load:
    one image held for 4 s while the helper served everyone else). Here the main thread plays
    the other worker: it puts, keeps the GIL past the poller's timeout, then takes the item."""
    work_queue = Batcher(lambda x: x, max_batch_size=4, max_queue=8)._queue
    stuck = 0
    for _ in range(20):
        returned = threading.Event()

        def poll(returned: threading.Event) -> None:
            with contextlib.suppress(queue.Empty):
                work_queue.get(timeout=0.001)
            returned.set()

        poller = threading.Thread(target=poll, args=(returned,))
        poller.start()
        time.sleep(0.0005)  # the poller is waiting
        work_queue.put(1)
        spin_until = time.perf_counter() + 0.003
        while time.perf_counter() < spin_until:  # hold the GIL past the poller's timeout
            pass
        with contextlib.suppress(queue.Empty):
            work_queue.get_nowait()
        if not returned.wait(2.0):
            stuck += 1
            work_queue.put(2)  # the next put frees it
        poller.join()
    assert stuck == 0


def test_out_of_memory_detection():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# -- the worker --------------------------------------------------------------------------------


def test_each_caller_gets_its_own_rows_in_order():
    forward = RecordingForward(delay=0.02)
    batcher = make_batcher(forward)

    async def main():
        requests = [[item(i), item(i + 1), item(i + 2)] for i in range(0, 60, 3)]
        return await asyncio.gather(*(batcher.infer(r, far()) for r in requests))

    answers = asyncio.run(main())
    for start, answer in zip(range(0, 60, 3), answers, strict=True):
        assert [p.class_id for p in answer] == [(start + j) % CLASSES for j in range(3)]
        assert all(p.confidence == 1.0 for p in answer)
        assert all(abs(float(p.probs.sum()) - 1.0) < 1e-6 for p in answer)
    # concurrent requests were batched: fewer forwards than images, none above the maximum
    assert len(forward.batches) < 60
    assert max(len(b) for b in forward.batches) <= 8
    assert sorted(forward.seen) == list(range(60))
    assert batcher.close(timeout=5)


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on():
    forward = RecordingForward(delay=0.05, fail_on=13.0)
    batcher = make_batcher(forward, max_batch_size=4)

    async def main():
        blocker = asyncio.ensure_future(batcher.infer([item(0)], far()))
        await asyncio.sleep(0.01)  # the worker is busy: the next three form one batch
        same_batch = [batcher.infer([item(v)], far()) for v in (13.0, 14.0, 15.0)]
        results = await asyncio.gather(blocker, *same_batch, return_exceptions=True)
        later = await batcher.infer([item(21.0)], far())
        return results, later

    results, later = asyncio.run(main())
    assert results[0][0].class_id == 0
    assert forward.batches[1] == [13.0, 14.0, 15.0]
    for failed in results[1:]:
        assert isinstance(failed, InferenceFailed)
        assert failed.status_code == 500
        assert "injected fault" in failed.detail
    assert later[0].class_id == 21 % CLASSES
    assert batcher.close(timeout=5)


def test_expired_requests_are_dropped_before_compute():
    forward = RecordingForward(delay=0.3)
    batcher = make_batcher(forward)

    async def main():
        slow = asyncio.ensure_future(batcher.infer([item(1)], far()))
        await asyncio.sleep(0.02)
        short = time.monotonic() + 0.1
        expired = await asyncio.gather(
            batcher.infer([item(2)], short), batcher.infer([item(3), item(4)], short),
            return_exceptions=True,
        )  # fmt: skip
        await slow
        fresh = await batcher.infer([item(5)], far())
        return expired, fresh

    expired, fresh = asyncio.run(main())
    assert all(isinstance(e, RequestTimeout) and e.status_code == 504 for e in expired)
    assert fresh[0].class_id == 1
    assert forward.seen == [1.0, 5.0]  # 2, 3, 4 never reached the model
    assert batcher.close(timeout=5)


def test_helper_worker_runs_a_second_forward_while_the_primary_is_busy():
    forward = RecordingForward(delay=0.3)
    batcher = make_batcher(forward, max_batch_size=4, workers=2)

    async def main():
        lone = await batcher.infer([item(1)], far())  # one image: the primary alone
        assert forward.max_running == 1
        first = asyncio.ensure_future(batcher.infer([item(v) for v in range(4)], far()))
        await asyncio.sleep(0.1)  # the primary is busy with those four for 0.3 s
        more = await batcher.infer([item(v) for v in range(4, 8)], far())  # a helper takes them
        return [lone, await first, more]

    lone, first, more = asyncio.run(main())
    assert [p.class_id for p in first + more] == [v % CLASSES for v in range(8)]
    assert lone[0].class_id == 1
    assert forward.max_running == 2
    assert sorted(forward.seen) == [0, 1, 1, 2, 3, 4, 5, 6, 7]
    assert batcher.close(timeout=5)


def test_helper_worker_stays_idle_below_its_backlog_and_close_stops_it():
    forward = RecordingForward(delay=0.2)
    batcher = make_batcher(forward, max_batch_size=8, workers=2, helper_backlog=4)

    async def main():
        first = asyncio.ensure_future(batcher.infer([item(1)], far()))
        await asyncio.sleep(0.05)
        second = await batcher.infer([item(2), item(3), item(4)], far())  # 3 < 4: waits
        return await first, second

    asyncio.run(main())
    assert forward.max_running == 1
    assert forward.batches == [[1.0], [2.0, 3.0, 4.0]]
    assert batcher.close(timeout=5)
    assert not any(thread.is_alive() for thread in batcher._threads)


def test_a_free_forward_waits_for_announced_images_and_stops_when_they_are_withdrawn():
    forward = RecordingForward()
    batcher = make_batcher(forward, max_batch_size=8)
    batcher._seconds_per_image = 1.0  # the bound: about one image's forward

    async def main():
        first, second, bad = batcher.announce(1), batcher.announce(1), batcher.announce(1)
        start = time.monotonic()
        one = asyncio.ensure_future(batcher.infer([item(1)], far(), first))
        await asyncio.sleep(0.1)  # the worker holds image 1: two more are being decoded
        two = asyncio.ensure_future(batcher.infer([item(2)], far(), second))
        await asyncio.sleep(0.1)
        batcher.withdraw(bad)  # the third failed to decode: nothing more is coming
        await asyncio.gather(one, two)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert forward.batches == [[1.0, 2.0]]  # one forward for both, not [[1], [2]]
    assert elapsed < 0.6  # it stopped waiting at the withdrawal, not after the 1 s bound
    assert batcher._incoming == 0
    assert batcher.close(timeout=5)


def test_without_announced_images_a_free_forward_starts_at_once():
    forward = RecordingForward()
    batcher = make_batcher(forward, max_batch_size=8)
    batcher._seconds_per_image = 5.0

    async def main():
        start = time.monotonic()
        await batcher.infer([item(3)], far(), batcher.announce(1))
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.5
    assert forward.batches == [[3.0]]
    assert batcher.close(timeout=5)


def test_a_fill_keeps_waiting_while_images_keep_arriving_within_one_image_time():
    forward = RecordingForward()
    batcher = make_batcher(forward, max_batch_size=8)
    batcher._seconds_per_image = 0.3  # one image's forward: the wait for the next one

    async def main():
        coming = [batcher.announce(1) for _ in range(4)]
        start = time.monotonic()
        futures = []
        for value, announced in enumerate(coming):  # 0.1 s apart: each within 0.3 s
            futures.append(asyncio.ensure_future(batcher.infer([item(value)], far(), announced)))
            await asyncio.sleep(0.1)
        await asyncio.gather(*futures)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    # 0.1 s between images, a third of one image's time: one forward for all four
    assert forward.batches == [[0.0, 1.0, 2.0, 3.0]]
    assert elapsed < 1.0
    assert batcher.close(timeout=5)


def test_a_fill_stops_when_the_next_image_is_slower_than_one_image_time():
    forward = RecordingForward()
    batcher = make_batcher(forward, max_batch_size=8)
    batcher._seconds_per_image = 0.05

    async def main():
        first, late = batcher.announce(1), batcher.announce(1)
        one = asyncio.ensure_future(batcher.infer([item(1)], far(), first))
        await asyncio.sleep(0.3)  # the second is still decoding after 6 images' time
        two = await batcher.infer([item(2)], far(), late)
        return await one, two

    asyncio.run(main())
    assert forward.batches == [[1.0], [2.0]]
    assert batcher.close(timeout=5)


def _becomes_idle(batcher: Batcher, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while not batcher.idle() and time.monotonic() < end:
        time.sleep(0.001)
    return batcher.idle()


class RecordingDecode:
    """``prepare`` for tests: a number -> its tensor (negative: not an image); records threads."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self, data: float) -> torch.Tensor:
        if data < 0:
            raise ValueError("not an image")
        self.threads.append(threading.current_thread().name)
        return item(data)


def test_an_idle_batcher_decodes_a_lone_image_on_its_forward_thread():
    forward = RecordingForward()
    batcher = make_batcher(forward, workers=2)
    decode = RecordingDecode()

    async def main():
        assert batcher.idle()
        return await batcher.infer([5.0], far(), prepare=decode)

    (prediction,) = asyncio.run(main())
    assert prediction.class_id == 5 % CLASSES
    assert forward.batches == [[5.0]]
    assert decode.threads[0].startswith("infer-")
    assert _becomes_idle(batcher)  # the worker counts itself free right after it answered
    assert batcher.close(timeout=5)


def test_an_image_that_fails_to_decode_on_the_forward_thread_fails_alone():
    forward = RecordingForward(delay=0.2)
    batcher = make_batcher(forward, workers=2, helper_backlog=8)  # one forward thread in use

    async def main():
        busy = asyncio.ensure_future(batcher.infer([item(0)], far()))
        await asyncio.sleep(0.05)  # the primary computes: the next two queue up together
        bad = asyncio.ensure_future(batcher.infer([-1.0], far(), prepare=RecordingDecode()))
        good = asyncio.ensure_future(batcher.infer([item(3)], far()))
        return await asyncio.gather(busy, bad, good, return_exceptions=True)

    busy, bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError)  # the decoder's own error, for the route to map to 4xx
    assert good[0].class_id == 3 and busy[0].class_id == 0
    assert forward.batches == [[0.0], [3.0]]
    assert batcher.close(timeout=5)


def test_the_decoded_images_of_a_batch_are_finished_together_and_timed():
    """``finish_fn`` gets the batch's decoded images (not the one that failed) in one call, its
    rows are what the forward computes, and each image observes the preprocessing histogram."""
    forward = RecordingForward(delay=0.2)
    finished: list[list[float]] = []

    def finish(decoded):
        finished.append([float(t[0]) for t in decoded])
        return torch.stack(list(decoded)) + 100

    metrics = Metrics()
    batcher = make_batcher(forward, finish_fn=finish, metrics=metrics, metric_labels=("m", "1"))

    async def main():
        busy = asyncio.ensure_future(batcher.infer([item(0)], far()))
        await asyncio.sleep(0.05)  # the worker computes: the next request queues up whole
        bad = RecordingDecode()
        three = asyncio.ensure_future(batcher.infer([1.0, -1.0, 2.0], far(), prepare=bad))
        return await asyncio.gather(busy, three, return_exceptions=True)

    busy, three = asyncio.run(main())
    assert isinstance(three, ValueError)  # the request fails on its bad image
    assert finished == [[1.0, 2.0]]
    assert forward.batches == [[0.0], [101.0, 102.0]]
    labels = {"model": "m", "version": "1"}
    assert metrics.registry.get_sample_value("imgserve_preprocess_seconds_count", labels) == 2
    assert 0 < metrics.registry.get_sample_value("imgserve_preprocess_seconds_sum", labels) < 1
    assert batcher.close(timeout=5)


def test_images_the_batch_finish_rejects_fail_alone_and_the_others_are_computed():
    """A ``finish_fn`` that finds a bad image only in the batch (nvjpeg refusing a corrupt
    JPEG) raises ``ItemsRejected``: that image's request fails with its error, the other
    requests in the same batch get their answers from the rows it did make."""
    forward = RecordingForward(delay=0.2)

    def finish(decoded):
        values = [float(t[0]) for t in decoded]
        good = [t for t in decoded if float(t[0]) != 5.0]
        errors = {values.index(5.0): ValueError("image 5 is corrupt")} if 5.0 in values else {}
        batch = torch.stack(good) + 100 if good else None
        if errors:
            raise ItemsRejected(errors, batch)
        return batch

    batcher = make_batcher(forward, finish_fn=finish)

    async def main():
        busy = asyncio.ensure_future(batcher.infer([item(0)], far()))
        await asyncio.sleep(0.05)  # the worker computes: the next three queue up together
        decode = RecordingDecode()
        requests = [
            asyncio.ensure_future(batcher.infer([value], far(), prepare=decode))
            for value in (4.0, 5.0, 6.0)
        ]
        return await asyncio.gather(busy, *requests, return_exceptions=True)

    _, four, five, six = asyncio.run(main())
    assert isinstance(five, ValueError) and "corrupt" in str(five)
    assert [four[0].class_id, six[0].class_id] == [104 % CLASSES, 106 % CLASSES]
    assert forward.batches[-1] == [104.0, 106.0]
    assert batcher.close(timeout=5)


def test_the_first_failing_image_in_request_order_decides_across_forward_threads():
    """A request's images split over two forward threads: image 3 fails at once on one, image 1
    later on the other; the request fails with image 1's error (the contract names the first
    bad image), and its good images were computed (no thread stalls on the failure)."""
    forward = RecordingForward()
    batcher = make_batcher(forward, workers=2, max_batch_size=2)
    threads: set[str] = set()

    def decode(data: float) -> torch.Tensor:
        threads.add(threading.current_thread().name)
        if data == 1.0:
            time.sleep(0.3)
            raise ValueError("image 1 is bad")
        if data == 3.0:
            raise ValueError("image 3 is bad")
        return item(data)

    async def main():
        return await batcher.infer([0.0, 1.0, 2.0, 3.0], far(), prepare=decode)

    with pytest.raises(ValueError, match="image 1 is bad"):
        asyncio.run(main())
    assert len(threads) == 2  # the split this test is about happened
    assert sorted(forward.seen) == [0.0, 2.0]
    assert batcher.close(timeout=5)


def test_a_batcher_is_not_idle_while_work_is_queued_announced_or_computed():
    forward = RecordingForward(delay=0.3)
    one_thread = make_batcher(forward, workers=1)
    assert not one_thread.idle()  # no second thread to serve others during a slow decode
    assert one_thread.close(timeout=5)
    batcher = make_batcher(forward, workers=2, helper_backlog=8)

    async def main():
        announced = batcher.announce(1)
        assert not batcher.idle()
        batcher.withdraw(announced)
        assert batcher.idle()
        running = asyncio.ensure_future(batcher.infer([item(1)], far()))
        await asyncio.sleep(0.1)
        assert not batcher.idle()  # a forward is running
        await running
        assert _becomes_idle(batcher)

    asyncio.run(main())
    assert batcher.close(timeout=5)
    assert not batcher.idle()  # closed


def test_worker_drops_items_whose_deadline_passed_while_queued():
    forward = RecordingForward()
    batcher = Batcher(forward, max_batch_size=8, max_queue=8, workers=1)  # worker not started yet

    async def main():
        past = time.monotonic() - 1
        futures = batcher.submit([item(1), item(2)], past)
        batcher.start()
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RequestTimeout) for r in results)
    assert forward.batches == []
    assert batcher.close(timeout=5)


def test_out_of_memory_splits_the_batch_and_retries():
    forward = RecordingForward(oom_above=2)
    batcher = Batcher(forward, max_batch_size=8, max_queue=64, workers=1)

    async def main():
        futures = batcher.submit([item(v) for v in range(7)], far())
        batcher.start()  # all seven are queued: one batch of 7 -> split down to <= 2
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    assert [r.class_id for r in results] == [v % CLASSES for v in range(7)]
    assert max(len(b) for b in forward.batches) <= 2
    assert forward.seen == [float(v) for v in range(7)]
    assert batcher.close(timeout=5)


def test_out_of_memory_at_batch_one_fails_cleanly():
    def always_oom(batch: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    batcher = make_batcher(RecordingForward())
    batcher.forward_fn = always_oom

    async def main():
        return await asyncio.gather(
            batcher.infer([item(1), item(2)], far()), return_exceptions=True
        )

    (result,) = asyncio.run(main())
    assert isinstance(result, InferenceFailed)
    assert "out of memory" in result.detail
    batcher.forward_fn = RecordingForward()
    assert asyncio.run(batcher.infer([item(3)], far()))[0].class_id == 3
    assert batcher.close(timeout=5)


def test_wrong_number_of_outputs_is_a_server_error():
    batcher = make_batcher(RecordingForward())
    batcher.forward_fn = lambda batch: torch.ones(batch.shape[0] + 1, CLASSES) / CLASSES
    with pytest.raises(InferenceFailed, match="inputs"):
        asyncio.run(batcher.infer([item(1)], far()))
    assert batcher.close(timeout=5)


def test_full_queue_refuses_at_once_with_retry_after():
    batcher = Batcher(RecordingForward(), max_batch_size=4, max_queue=5)  # not started

    async def main():
        accepted = batcher.submit([item(1), item(2), item(3)], far())
        with pytest.raises(QueueFull) as refused:
            batcher.submit([item(4), item(5), item(6)], far())  # all or nothing
        assert batcher.pending == 3
        more = batcher.submit([item(7), item(8)], far())
        batcher.start()
        return refused.value, await asyncio.gather(*accepted, *more)

    refused, results = asyncio.run(main())
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert [r.class_id for r in results] == [1, 2, 3, 7 % CLASSES, 8 % CLASSES]
    assert batcher.close(timeout=5)


def test_close_drains_queued_work_then_refuses_new_work():
    forward = RecordingForward(delay=0.05)
    batcher = make_batcher(forward, max_batch_size=2)

    async def main():
        futures = batcher.submit([item(v) for v in range(6)], far())
        closing = asyncio.ensure_future(asyncio.to_thread(batcher.close, 10))
        results = await asyncio.gather(*futures)
        assert await closing
        with pytest.raises(ModelDraining):
            batcher.submit([item(9)], far())
        return results

    results = asyncio.run(main())
    assert [r.class_id for r in results] == [v % CLASSES for v in range(6)]
    assert not batcher._threads[0].is_alive()


# -- through the real server ---------------------------------------------------------------------

FAULTS = "tests.service.fault_launcher"


def histogram(metrics_text: str, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram summed over its label sets."""
    count = total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def counter(metrics_text: str, name: str, **labels: str) -> float:
    value = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            value += float(line.rsplit(" ", 1)[1])
    return value


async def post_many(url: str, images: list[bytes], path: str = "/predict") -> list:
    import httpx

    limits = httpx.Limits(max_connections=len(images))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(path, content=data, headers={"content-type": "image/png"})
            for data in images
        ))  # fmt: skip


@pytest.mark.slow
def test_32_concurrent_requests_take_fewer_than_32_forward_passes(service):
    from .conftest import digit_png

    images = [digit_png(i % 10) for i in range(32)]
    with service.client() as client:  # the answers of requests sent one by one
        expected = [
            client.post("/predict", content=data, headers={"content-type": "image/png"}).json()
            for data in images[:10]
        ]
    before = histogram(service.metrics(), "imgserve_batch_size")
    responses = asyncio.run(post_many(service.url, images))
    after = histogram(service.metrics(), "imgserve_batch_size")
    assert [r.status_code for r in responses] == [200] * 32
    for i, response in enumerate(responses):
        got = response.json()["predictions"][0]
        want = expected[i % 10]["predictions"][0]
        assert got["class_id"] == want["class_id"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    forwards, images_computed = after[0] - before[0], after[1] - before[1]
    assert images_computed == 32
    assert forwards < 32, f"{forwards} forward passes for 32 concurrent requests"


@pytest.mark.slow
def test_full_queue_sheds_with_retry_after_and_graceful_shutdown_drains(
    start_service, served_store
):
    from .conftest import digit_png

    server = start_service(
        store=served_store, module=FAULTS,
        env={"FAULT_DELAY_S": "0.25", "MAX_QUEUE": "4", "MAX_BATCH_SIZE": "2"},
    )  # fmt: skip
    responses = asyncio.run(post_many(server.url, [digit_png(i % 10) for i in range(24)]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    shed = [r for r in responses if r.status_code == 503]
    accepted = [r for r in responses if r.status_code == 200]
    assert shed and accepted, statuses
    for response in shed:
        assert response.json()["detail"].startswith("the queue of digits-v1 is full")
        assert (
            response.headers["retry-after"].isdigit() and int(response.headers["retry-after"]) >= 1
        )
    for response in accepted:
        assert response.json()["predictions"][0]["label"] in [str(d) for d in range(10)]
    assert counter(server.metrics(), "imgserve_rejected_total", reason="queue_full") == len(shed)

    # SIGTERM with requests in flight: every accepted request gets its full answer
    async def in_flight_then_sigterm():
        import httpx

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [
                asyncio.ensure_future(
                    client.post(
                        "/predict", content=digit_png(i), headers={"content-type": "image/png"}
                    )
                )  # fmt: skip
                for i in range(4)
            ]
            await asyncio.sleep(0.3)  # all four are accepted and queued or computing
            server.proc.terminate()
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(in_flight_then_sigterm())
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 is the clean exit
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()


@pytest.mark.slow
def test_waiting_past_the_timeout_is_504_and_never_computed(start_service, served_store):
    from .conftest import digit_png

    server = start_service(
        store=served_store, module=FAULTS,
        env={"FAULT_DELAY_S": "2.5", "REQUEST_TIMEOUT_S": "1.0", "MAX_BATCH_SIZE": "4",
             "INFERENCE_WORKERS": "1"},  # one worker: the queued ones wait behind the first
    )  # fmt: skip
    before = histogram(server.metrics(), "imgserve_batch_size")

    async def main():
        first = asyncio.ensure_future(post_many(server.url, [digit_png(1)]))
        await asyncio.sleep(0.5)  # the worker is busy with the first for 2.5 s
        queued = await post_many(server.url, [digit_png(2), digit_png(3), digit_png(4)])
        return (await first) + queued

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [504] * 4
    assert all("REQUEST_TIMEOUT_S" in r.json()["detail"] for r in responses)
    time.sleep(2.5)  # let the worker finish the first batch and look at the queue
    after = histogram(server.metrics(), "imgserve_batch_size")
    assert after[1] - before[1] == 1  # only the image already computing was computed
    with server.client() as client:
        assert client.get("/readyz").status_code == 200


@pytest.mark.slow
def test_forward_faults_fail_only_their_batch_and_oom_splits(start_service, served_store):
    from .conftest import digit_png

    server = start_service(
        store=served_store, module=FAULTS,
        env={"FAULT_FAIL_FIRST": "1", "FAULT_OOM_ABOVE": "1", "MAX_BATCH_SIZE": "8"},
    )  # fmt: skip
    with server.client() as client:
        failed = client.post(
            "/predict", content=digit_png(5), headers={"content-type": "image/png"}
        )
        assert failed.status_code == 500
        assert "injected fault" in failed.json()["detail"]
        ok = client.post("/predict", content=digit_png(5), headers={"content-type": "image/png"})
        assert ok.status_code == 200
        images = [("file", (f"{i}.png", digit_png(i), "image/png")) for i in range(6)]
        together = client.post("/predict", files=images)  # one batch of 6 -> split to 1s
        assert together.status_code == 200, together.text
        assert len(together.json()["predictions"]) == 6
        assert client.get("/readyz").status_code == 200
    metrics = server.metrics()
    assert counter(metrics, "imgserve_oom_splits_total") >= 1
    assert counter(metrics, "imgserve_rejected_total", reason="inference_error") == 1


class ThreadCountingForward(RecordingForward):
    """Records the torch intra-op threads each forward ran with."""

    def __init__(self, delay: float = 0.0):
        super().__init__(delay=delay)
        self.threads: list[tuple[int, int]] = []  # (batch size, torch threads)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.threads.append((len(batch), torch.get_num_threads()))
        return super().__call__(batch)


def test_a_lone_image_gets_every_core_and_a_batch_the_base_threads():
    forward = ThreadCountingForward(delay=0.2)
    batcher = make_batcher(forward, max_batch_size=4, threads=1, lone_threads=3,
                           lone_example=item(0))  # fmt: skip
    assert forward.threads == [(1, 3)]  # the worker's warm-up, done before start() returned
    forward.threads.clear()

    async def main():
        await batcher.infer([item(1)], far())  # alone: wide
        first = asyncio.ensure_future(batcher.infer([item(2)], far()))
        await asyncio.sleep(0.05)  # arrives while that lone image is computed with 3 threads
        await batcher.infer([item(v) for v in range(3, 7)], far())
        await first
        return await batcher.infer([item(9)], far())  # alone again, within the pause: narrow

    asyncio.run(main())
    assert forward.threads == [(1, 3), (1, 3), (4, 1), (1, 1)]
    assert batcher.close(timeout=5)


def test_a_wide_forward_resumes_after_the_pause(monkeypatch: pytest.MonkeyPatch):
    import service.batching as batching

    monkeypatch.setattr(batching, "WIDE_PAUSE_S", 0.1)
    forward = ThreadCountingForward(delay=0.2)
    batcher = make_batcher(forward, threads=1, lone_threads=2)

    async def main():
        first = asyncio.ensure_future(batcher.infer([item(1)], far()))
        await asyncio.sleep(0.05)
        await batcher.infer([item(2)], far())  # met the wide forward: pause
        await first
        await asyncio.sleep(0.15)  # the pause is over
        await batcher.infer([item(3)], far())

    asyncio.run(main())
    assert forward.threads == [(1, 2), (1, 1), (1, 2)]
    assert torch.get_num_threads() >= 1  # this thread's own count was never touched
    assert batcher.close(timeout=5)


def test_a_lone_image_goes_wide_only_while_the_sibling_processes_compute_nothing(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    # WORKERS: each process maps the supervisor's page; two mappings of one file stand for two
    # processes here (a slot is written by its own process only, read by the others)
    import service.batching as batching
    from service.workers import ForwardBoard

    monkeypatch.setattr(batching, "WIDE_PAUSE_S", 0.1)
    page = tmp_path / "forwards"
    ForwardBoard.create(page, 2)
    here, sibling = ForwardBoard(page, 0, 2), ForwardBoard(page, 1, 2)
    forward = ThreadCountingForward(delay=0.2)
    batcher = make_batcher(forward, threads=1, lone_threads=2, siblings=here)
    assert here.others_idle() and sibling.others_idle()

    async def main():
        await batcher.infer([item(1)], far())  # the sibling is idle: every core
        assert sibling.others_started() == 1 and sibling.others_idle()  # it saw the forward
        with sibling.computing():
            assert not here.others_idle()
            await batcher.infer([item(2)], far())  # the sibling computes: this process's share
        first = asyncio.ensure_future(batcher.infer([item(3)], far()))  # wide again
        await asyncio.sleep(0.05)
        with sibling.computing():  # a sibling starts during the wide forward...
            await asyncio.sleep(0.01)
        await first
        await batcher.infer([item(4)], far())  # ...so the next lone image waits out the pause
        await asyncio.sleep(0.15)
        await batcher.infer([item(5)], far())

    asyncio.run(main())
    assert forward.threads == [(1, 2), (1, 1), (1, 2), (1, 1), (1, 2)]
    assert batcher.close(timeout=5)
    assert sibling.others_idle()  # every forward counted itself out again
    with pytest.raises(ValueError, match="out of range"):
        ForwardBoard(page, 2, 2)


def test_lone_image_threads_go_to_big_inputs_unless_set():
    from service.inference import lone_image_threads

    assert lone_image_threads(None, 4, 1, (224, 224)) == 4
    assert lone_image_threads(None, 4, 1, (32, 32)) == 1  # a 3 ms forward: not worth it
    assert lone_image_threads(2, 4, 1, (32, 32)) == 2  # LONE_IMAGE_THREADS wins
    assert lone_image_threads(1, 4, 1, (224, 224)) == 1  # and 1 turns it off
