"""``service.heap``: the collector stays off the long-lived heap, and still frees cycles."""

from __future__ import annotations

import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import heap

from .conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # nothing of this test session stays out of the collector's reach


def test_settle_freezes_what_lives_and_frees_cycles_frozen_before(thawed: None) -> None:
    kept = Node()
    dropped = Node()
    dropped_ref = weakref.ref(dropped)
    gc.freeze()  # as a settle before an unload: the version's objects were frozen
    del dropped
    gc.collect()
    assert dropped_ref() is not None  # frozen: a plain collection never looks at it
    heap.settle("test")
    assert dropped_ref() is None  # settle thaws first, so the unloaded cycle is freed
    assert gc.get_freeze_count() > 0
    assert not gc.is_finalized(kept) and gc.is_tracked(kept)  # still alive, merely frozen
    del kept


def _settled_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "heap settled" in line]


def test_the_service_settles_its_heap_after_each_change_to_the_loaded_models(
    start_service, served_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    server = start_service(store=store, env={"ADMIN_API_KEY": ADMIN_KEY}, wait="/healthz")
    with server.client() as c:
        assert c.get("/models").json()["models"] == []
        shutil.copy(served_store / "digits-v1.mar", store / "digits-v1.mar")
        assert c.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN).status_code == 201
        assert c.delete("/models/digits/1", headers=ADMIN).status_code == 200
    lines = _settled_lines(server.log())
    assert len(lines) == 3, server.log()[-3000:]  # the (empty) store, the register, the unload
    assert "(model store loaded)" in lines[0]
    assert "(model 'digits' version 1 registered)" in lines[1]
    assert "(model 'digits' version 1 unloaded)" in lines[2]
    frozen = [int(line.split("objects frozen")[0].rsplit(":", 1)[1]) for line in lines]
    assert all(count > 100_000 for count in frozen)  # torch, FastAPI and the rest, not a few
    assert frozen[2] < frozen[1]  # the unloaded version's objects were freed, not frozen again


def test_gc_freeze_off_leaves_the_collector_alone(start_service, served_store: Path) -> None:
    server = start_service(store=served_store, env={"GC_FREEZE": "false"})
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
    assert _settled_lines(server.log()) == []
