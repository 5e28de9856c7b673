"""MALLOC: the service re-executes itself once with tcmalloc preloaded (service/allocator.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.allocator import MARKER, AllocatorMissing, find_tcmalloc, preload_env

LIBRARY = "libtcmalloc_minimal.so.4"


def found() -> str:
    return LIBRARY


def missing() -> None:
    return None


def test_auto_preloads_tcmalloc_once_and_keeps_the_users_preloads():
    env = preload_env("auto", {"PATH": "/bin", "LD_PRELOAD": "libuser.so"}, find=found)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{LIBRARY} libuser.so"
    assert env[MARKER] == LIBRARY and env["PATH"] == "/bin"
    assert preload_env("auto", env, find=found) is None  # the re-executed process goes on


@pytest.mark.parametrize(
    ("mode", "env", "find"),
    [
        ("system", {}, found),  # never preloads
        ("auto", {}, missing),  # not installed: the system allocator serves
        ("auto", {"LD_PRELOAD": "/opt/libtcmalloc.so"}, found),  # the user preloaded one
        ("tcmalloc", {MARKER: LIBRARY}, found),  # already re-executed
    ],
)
def test_nothing_to_do(mode: str, env: dict[str, str], find) -> None:
    assert preload_env(mode, env, find=find) is None


def test_tcmalloc_required_but_missing_is_one_clear_error():
    with pytest.raises(AllocatorMissing, match="apt-get install libtcmalloc-minimal4"):
        preload_env("tcmalloc", {}, find=missing)


def mapped(pid: int) -> bool:
    return "libtcmalloc" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.skipif(find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed")
def test_the_served_process_runs_on_tcmalloc_unless_told_otherwise(start_service) -> None:
    default = start_service(wait="/healthz")
    system = start_service(env={"MALLOC": "system"}, wait="/healthz")
    # the same process id answers (exec, not a child): PID 1 in a container keeps its signals
    assert mapped(default.proc.pid) and "tcmalloc allocator" in default.log()
    assert not mapped(system.proc.pid) and "system allocator" in system.log()
    with default.client() as client:
        assert client.get("/healthz").status_code == 200
