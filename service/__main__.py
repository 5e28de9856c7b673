"""``service`` / ``python -m service``: validate the settings, then run uvicorn.

Invalid settings print one line (``service: invalid setting NAME: why``) and exit with 2.
uvicorn uses uvloop and httptools when they are installed; request heads (request line +
headers) are capped at ``MAX_HEAD_BYTES`` (431) and ``REQUEST_TIMEOUT_S`` (408), see
``bounded_httptools_protocol``. On SIGTERM/SIGINT uvicorn stops accepting
connections, lets in-flight requests finish (up to ``GRACEFUL_TIMEOUT_S``), then the app's
lifespan drains every batch queue and stops the inference workers; a model store still loading
stops after the model in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from types import FrameType

from pydantic import ValidationError

from .allocator import AllocatorMissing, exec_with_allocator
from .settings import Settings, describe_error


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


SECRET_QUERY = re.compile(
    r"([?&][^=&#\s]*(?:key|token|secret|password|passwd|auth)[^=&#\s]*=)[^&#\s]*", re.IGNORECASE
)


class RedactSecrets(logging.Filter):
    """Blank out query parameters that look like credentials (``?api_key=...``) in access-log
    lines. Keys belong in the Authorization header, which is never logged; a client that puts
    one in the URL should not get it written to the log either."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            record.args = tuple(
                SECRET_QUERY.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


MAX_HEAD_BYTES = 64 * 1024  # request line + headers; h11 allows 16 KiB, nginx 4 x 8 KiB


def _json_answer(status: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


def bounded_httptools_protocol(head_timeout_s: float) -> type:  # noqa: C901 (a nested class)
    """uvicorn's httptools protocol with a size cap and a time limit on request heads.

    - Size: httptools has no limit of its own and builds long header values and URLs by
      repeated concatenation: one request with a 200 MiB header costs the server ~400 MiB and
      over a minute of event-loop time. Past ``MAX_HEAD_BYTES`` (request line + headers) the
      client gets a JSON 431 and the connection is closed. Only bytes received while a head
      is incomplete count, so bodies (pipelined or not) never do.
    - Time: uvicorn times out neither a head sent a byte at a time (slowloris) nor a new
      connection that sends nothing; each holds a socket for as long as the client likes. A
      head not complete ``head_timeout_s`` after its first byte (or after the connection
      opened) gets a JSON 408 and the connection is closed (silently if nothing was sent).
      Between requests uvicorn's keep-alive timeout applies as before. Slow *bodies* are the
      application's: ``REQUEST_TIMEOUT_S`` -> 504, then closed (``service.main``).
    (uvicorn's h11 protocol caps heads at 16 KiB; it has no head timeout either.)
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = _json_answer(
        "431 Request Header Fields Too Large",
        f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes",
    )
    too_slow = _json_answer(
        "408 Request Timeout", f"the request line and headers took longer than {head_timeout_s:g} s"
    )

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True  # waiting for (the rest of) a request head
        _head_started = False  # a byte of the current head has arrived
        _head_bytes = 0
        _marks = 0  # heads and messages completed: a chunk in which one ended is not counted
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            marks = self._marks
            super().data_received(data)
            if not self._in_head or self._marks != marks:
                return  # in a body, or a head/body ended in this chunk and the next head began
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes: 431", MAX_HEAD_BYTES)
                self._refuse(too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_started = True
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._in_head = self._head_started = False
            self._marks += 1
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            self._marks += 1
            super().on_message_complete()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being answered; a pipelined head waits its turn
            if self._head_started:
                self.logger.warning("request head not complete after %g s: 408", head_timeout_s)
                self._refuse(too_slow)
            elif not self.transport.is_closing():
                self.transport.close()  # connected, never sent a byte

        def _refuse(self, answer: bytes) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(answer)
            self.transport.close()

    return BoundedHttpToolsProtocol


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.stderr.write(f"service: {describe_error(exc)}\n")
        return 2
    try:
        exec_with_allocator(settings.malloc)  # returns here unless it restarts the process
    except AllocatorMissing as exc:
        sys.stderr.write(f"service: invalid setting MALLOC: {exc}\n")
        return 2
    configure_logging(settings)
    from .workers import Peers, supervise

    peers = Peers.from_env(os.environ, settings)
    if settings.workers > 1 and peers is None:
        return supervise(settings)

    import uvicorn

    from .main import create_app

    app = create_app(settings, peers=peers)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # The model store loads in the background (before listening, for one of WORKERS
            # processes): the model in hand finishes, no further one starts, so a stop during
            # the load waits for one model, not the whole store.
            app.state.registry.closing = True
            super().handle_exit(sig, frame)

    has = importlib.util.find_spec
    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop" if has("uvloop") else "asyncio",
            http=bounded_httptools_protocol(settings.request_timeout_s)
            if has("httptools")
            else "h11",
            log_config=None,
            access_log=settings.access_log,
            timeout_graceful_shutdown=settings.graceful_timeout_s,
            timeout_keep_alive=5,
            server_header=False,
        )
    )
    sockets = None
    if peers is not None:
        try:
            sockets = peers.sockets(settings.host, settings.port)
        except OSError as exc:
            sys.stderr.write(f"service: cannot bind {settings.host}:{settings.port}: {exc}\n")
            return 1
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
        server.run(sockets=sockets)
    return 0 if server.started else 3  # uvicorn's STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
