"""Servers for the reliability tests: real ``python -m service`` processes on 127.0.0.1.

- ``server``: the shared server on a copy of the trainer's digits archive, default limits,
  management on (``ADMIN_KEY``), debug logging and the access log on (so tests can check what
  gets logged); used by the hostile-input, schema-fuzzing, access and soak tests;
- ``bounded_server``: the test launcher (``tests.reliability.launcher``: forward delay and
  faults steered at run time) with small limits (batch 4, queue 32, ``REQUEST_TIMEOUT_S`` 4 s),
  CORS on for two origins and no admin key; used by the overload, slow-client and access tests;
- ``start_service``: a factory for servers of one test (stopped at teardown).
Servers' output goes to a log file (``ServiceProcess.log()``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ServiceProcess, launch
from tests.service.conftest import start_service as start_service  # the same fixture here

ADMIN_KEY = "rel-admin-key-6f1c0e7a9b42d8"
LAUNCHER = "tests.reliability.launcher"
BOUNDED_ENV = {
    "MAX_BATCH_SIZE": "4",
    "MAX_QUEUE": "32",
    "REQUEST_TIMEOUT_S": "4",
    "PREPROCESS_THREADS": "2",
    "CORS_ORIGINS": "http://allowed.example, https://app.example",
    "ADMIN_API_KEY": "",  # management refused entirely
}


@pytest.fixture(scope="session")
def rel_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the digits model store (``digits_store``: trained by the CLI).

    ``REL_DIGITS_STORE=DIR`` copies an existing store instead (quick reruns of this folder).
    """
    given = os.environ.get("REL_DIGITS_STORE")
    source = Path(given) if given else request.getfixturevalue("digits_store")
    store = tmp_path_factory.mktemp("rel") / "model_store"
    shutil.copytree(source, store)
    return store


@pytest.fixture(scope="session")
def server(rel_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"ADMIN_API_KEY": ADMIN_KEY, "LOG_LEVEL": "debug", "ACCESS_LOG": "true"}
    process = launch(rel_store, tmp_path_factory.mktemp("rel_logs"), env=env)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def bounded_server(
    rel_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = launch(rel_store, tmp_path_factory.mktemp("rel_bounded"), env=BOUNDED_ENV,
                     module=LAUNCHER)  # fmt: skip
    yield process
    process.stop()


def set_forward(process: ServiceProcess, **changes: float) -> None:
    """Steer the launcher's forward (delay_s, fail_next, oom_min_size); clears its events."""
    response = httpx.post(f"{process.url}/_test/forward", json=changes, timeout=10)
    assert response.status_code == 200, response.text


def forward_state(process: ServiceProcess) -> dict:
    return httpx.get(f"{process.url}/_test/forward", timeout=10).json()
