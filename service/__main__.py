"""``service`` / ``python -m service``: validate the settings, then run uvicorn.

Invalid settings print one line (``service: invalid setting NAME: why``) and exit with 2.
uvicorn uses uvloop and httptools when they are installed. On SIGTERM/SIGINT uvicorn stops
accepting connections, lets in-flight requests finish (up to ``GRACEFUL_TIMEOUT_S``), then the
app's lifespan drains every batch queue and stops the inference workers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time

from pydantic import ValidationError

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


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
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


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.stderr.write(f"service: {describe_error(exc)}\n")
        return 2
    configure_logging(settings)

    import uvicorn

    from .main import create_app

    has = importlib.util.find_spec
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        timeout_keep_alive=5,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
