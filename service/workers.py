"""Several service processes on one port (``WORKERS`` > 1): the supervisor and the peers.

Why processes: one process's event loop and forward threads share one GIL. On 2 cores two
processes of one forward thread each carried about a quarter more ResNet-20 images a second
than one process, with a lower p99 (bench/NOTES.md, 2026-12-04 20:51).

- ``supervise``: the process started as ``service`` with ``WORKERS=N`` starts N children of
  ``python -m service`` and waits. SIGTERM/SIGINT are passed on to every child, each of which
  finishes its requests and drains its queues as a single service does. A child that exits on
  its own stops the others and the supervisor exits 1: a replacement would load the model store
  as it is on disk, not as the management calls have left its siblings, so the orchestrator
  (Kubernetes, a compose restart policy) restarts the whole service instead. A second launch
  on the same port is refused (``hold_port``), as a single process would be by the kernel.
- Each child binds its own socket to HOST:PORT with ``SO_REUSEPORT``, so the kernel spreads new
  connections evenly over the processes (with one socket shared by forked processes, whichever
  accepts first takes most connections: one round fell to 0.47 of the LIMIT that way). uvicorn
  listens on it only once that child's model store has loaded and warmed up, so no connection
  waits on a process that is still loading; ``/readyz`` says 503 until every process listens.
- ``Peers``: each process has its own registry, so a management call (register, unload, default
  version) is applied by the process that receives it, then sent to every sibling over a Unix
  socket in a private directory (mode 0700) with a token that only this launch's processes
  know, and answered once every process has applied it. A call passed on that finds its state
  already there (two clients registering or unloading one version through two processes at
  once) is accepted; a sibling that refuses what the first process accepted is a server fault:
  500 naming the process.
- ``ForwardBoard``: which processes are computing, on a page they share, so that a lone image
  of a large-input model may use every core while the siblings are idle (``LONE_IMAGE_THREADS``).
- Metrics: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a fresh directory
  per launch): ``/metrics`` from any process sums every process's counters and histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import http.client
import json
import logging
import mmap
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .errors import ServiceError
from .metrics import MULTIPROCESS_DIR_ENV
from .settings import Settings

log = logging.getLogger("service.workers")

ENV_INDEX = "IMGSERVE_WORKER_INDEX"
ENV_DIR = "IMGSERVE_WORKER_DIR"
ENV_TOKEN = "IMGSERVE_WORKER_TOKEN"
TOKEN_HEADER = "x-imgserve-worker-token"
BOARD_FILE = "forwards"


class SiblingFailed(ServiceError):
    """500: a management call this process applied was refused or lost by a sibling."""

    status_code = 500


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` service processes until a signal (0) or one exits (1); 1 at
    once, with one line on stderr, when another launch holds the port."""
    try:
        port_lock = hold_port(settings.port)
    except PortHeld as exc:
        sys.stderr.write(f"service: cannot bind {settings.host}:{settings.port}: {exc}\n")
        return 1
    with port_lock or contextlib.nullcontext():
        return _supervise(settings)


class PortHeld(OSError):
    """Another launch with ``WORKERS`` > 1 serves this port."""


def hold_port(port: int) -> socket.socket | None:
    """A lock on ``port`` for one launch with several processes, held while the socket is open.

    Why: the children bind with ``SO_REUSEPORT``, and the kernel lets any process of the same
    user join that group. A second launch on the port (a forgotten instance, a typo in a unit
    file) would not fail with "address in use" as a single process does: the kernel would
    quietly spread connections over both launches, whose models and management state differ.
    The lock is an abstract Unix socket named after the port; such names live in the network
    namespace, as the port does, and vanish with the process, so a killed launch leaves none.
    Returns None where abstract sockets do not exist (not Linux); raises ``PortHeld``.
    """
    lock = socket.socket(socket.AF_UNIX)
    name = f"\0imgserve-workers-port-{port}"
    try:
        lock.bind(name)
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            log.warning("no lock on port %d for this launch (%s)", port, exc)
            return None
        raise PortHeld(
            f"another service launch with WORKERS > 1 holds port {port}{_holder(name)}"
        ) from None
    # never accepted: a refused launch connects only to read the owner's pid (SO_PEERCRED);
    # its connection stays queued, so the backlog bounds how many get the pid (see _holder)
    lock.listen(64)
    return lock


def _holder(name: str) -> str:
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)  # a full backlog fails at once (EAGAIN) instead of blocking
        try:
            probe.connect(name)
            cred = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return ""
    return f" (pid {struct.unpack('3i', cred)[0]})"


def _supervise(settings: Settings) -> int:
    children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}  # pid -> (index, process)
    stopping = False

    def stop(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for _, process in children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    with tempfile.TemporaryDirectory(prefix="imgserve-workers-") as directory:
        metrics_dir = Path(directory, "metrics")
        metrics_dir.mkdir()
        env = {**os.environ, ENV_DIR: directory, ENV_TOKEN: secrets.token_urlsafe(32),
               MULTIPROCESS_DIR_ENV: str(metrics_dir)}  # fmt: skip
        ForwardBoard.create(Path(directory, BOARD_FILE), settings.workers)
        for index in range(settings.workers):
            if stopping:
                break
            process = subprocess.Popen(
                [sys.executable, "-m", "service"], env={**env, ENV_INDEX: str(index)}
            )
            children[process.pid] = (index, process)
        log.info("%d service processes on %s:%d", len(children), settings.host, settings.port)
        while any(process.returncode is None for _, process in children.values()):
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:  # the last ones were reaped by Popen.poll in stop()
                break
            if pid not in children:
                continue
            index, process = children[pid]
            process.returncode = code = os.waitstatus_to_exitcode(wait_status)
            if not stopping:
                log.error("service process %d (pid %d) exited with %d; stopping the others",
                          index, pid, code)  # fmt: skip
                status = 1
                stop()
    return status


@dataclass(frozen=True)
class Peers:
    """This process's place among the service processes of one launch."""

    index: int
    count: int
    directory: Path
    token: str
    timeout_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str], settings: Settings) -> Peers | None:
        """The role the supervisor gave this process, or None when it runs alone."""
        if ENV_INDEX not in env:
            return None
        # a sibling may still be loading its store: wait for it as long as a load may take
        return cls(int(env[ENV_INDEX]), settings.workers, Path(env[ENV_DIR]), env[ENV_TOKEN],
                   timeout_s=max(300.0, settings.request_timeout_s))  # fmt: skip

    def forward_board(self) -> ForwardBoard:
        return ForwardBoard(self.directory / BOARD_FILE, self.index, self.count)

    def record_pid(self) -> None:
        """Leave this process's pid where its siblings find it (their ``/metrics``)."""
        self._pid_path(self.index).write_text(str(os.getpid()))

    def pids(self) -> dict[int, int]:
        """The pid of every process that has recorded one, by index."""
        found = {}
        for index in range(self.count):
            with contextlib.suppress(OSError, ValueError):
                found[index] = int(self._pid_path(index).read_text())
        return found

    def _pid_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.pid"

    def socket_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    def sockets(self, host: str, port: int) -> list[socket.socket]:
        """Bound, not yet listening: the public port (shared) and this process's own socket."""
        public = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        public.bind((host, port))
        private = socket.socket(socket.AF_UNIX)
        private.bind(str(self.socket_path(self.index)))
        return [public, private]

    def not_listening(self) -> list[int]:
        """The siblings that do not take connections yet (still loading their model store)."""
        waiting = []
        for index in range(self.count):
            if index == self.index:
                continue
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket_path(index)))
                except OSError:  # not bound yet, or bound and not listening
                    waiting.append(index)
        return waiting

    def is_forwarded(self, headers: Mapping[str, str]) -> bool:
        """True for a call a sibling sent on (apply it here only)."""
        return hmac.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode())

    async def forward(
        self, method: str, path: str, body: bytes | None, authorization: str | None
    ) -> None:
        """Send the management call this process has applied to every sibling; raise
        ``SiblingFailed`` unless each answered 2xx."""
        siblings = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(
            *(
                asyncio.to_thread(self._send, i, method, path, body, authorization)
                for i in siblings
            ),
            return_exceptions=True,
        )
        failures = []
        for index, answer in zip(siblings, answers, strict=True):
            if isinstance(answer, BaseException):
                failures.append(f"process {index} could not be reached: {answer!r}")
            elif not 200 <= answer[0] < 300:
                failures.append(f"process {index} answered {answer[0]}: {answer[1]}")
        if failures:
            detail = f"{method} {path} was applied in service process {self.index}, but " + (
                "; ".join(failures)
            )
            log.error("%s", detail)
            raise SiblingFailed(detail)

    def _send(
        self, index: int, method: str, path: str, body: bytes | None, authorization: str | None
    ) -> tuple[int, str]:
        headers = {TOKEN_HEADER: self.token, "content-type": "application/json"}
        if authorization is not None:
            headers["authorization"] = authorization
        deadline = time.monotonic() + self.timeout_s
        while True:
            connection = _UnixConnection(str(self.socket_path(index)), self.timeout_s)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # not listening yet: its model store is still loading
                continue
            finally:
                connection.close()
            try:
                detail = str(json.loads(data).get("detail", ""))
            except (ValueError, AttributeError):
                detail = data[:200].decode(errors="replace")
            return response.status, detail


class ForwardBoard:
    """Which of one launch's processes are computing: a shared page with a slot per process.

    Why: each process plans its torch threads for its share of the CPUs (one of two cores with
    ``WORKERS=2``), so a lone image of a large-input model was computed on one core while the
    other idled: ResNet-18 C=1 p50 55 ms against 31-34 ms with both cores' threads (bench/
    NOTES.md). A batcher computes a lone image on every core only while no sibling computes
    (``others_idle``), and pauses doing so after a sibling started meanwhile (``others_started``),
    as it does for its own arrivals.

    A slot is two counters, forwards running and forwards started (wrapping), written only by
    its own process under a lock, read by the others without one: a stale read costs one forward
    sharing its cores, which the pause then stops from recurring.
    """

    SLOT = struct.Struct("=II")

    def __init__(self, path: Path, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"process index {index} out of range for {count} processes")
        self.index = index
        self.count = count
        with path.open("r+b") as file:
            self._page = mmap.mmap(file.fileno(), count * self.SLOT.size)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, count: int) -> None:
        """Write the zeroed page that ``count`` processes will map (by the supervisor)."""
        path.write_bytes(bytes(count * cls.SLOT.size))

    def _slot(self, index: int) -> tuple[int, int]:
        return self.SLOT.unpack_from(self._page, index * self.SLOT.size)

    def others_idle(self) -> bool:
        """No other process is running a forward."""
        return all(self._slot(i)[0] == 0 for i in range(self.count) if i != self.index)

    def others_started(self) -> int:
        """The forwards the other processes have started so far (a sum that only changes)."""
        return sum(self._slot(i)[1] for i in range(self.count) if i != self.index)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Count this process as computing for the block."""
        self._add(1, 1)
        try:
            yield
        finally:
            self._add(-1, 0)

    def _add(self, running: int, started: int) -> None:
        with self._lock:
            now_running, now_started = self._slot(self.index)
            self.SLOT.pack_into(self._page, self.index * self.SLOT.size, now_running + running,
                                (now_started + started) & 0xFFFFFFFF)  # fmt: skip


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 to a sibling's Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
