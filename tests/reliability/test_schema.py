"""Property-based fuzzing of the OpenAPI schema with schemathesis (its CLI, ``st run``) against
the running server: no 5xx, and every response conforms to the schema (status codes,
content types, headers, bodies, ``Allow`` on 405, security).

Excluded check: ``positive_data_acceptance`` ("a schema-valid request must get a 2xx"). The
schema cannot say "bytes that decode as an image" or "k up to this model's class count", so
schema-valid random bodies get the contract's 400/415/422; that is the contract, not a bug.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import ServiceProcess

from .conftest import ADMIN_KEY
from .helpers import server_errors

pytestmark = pytest.mark.slow

ST = Path(sys.executable).with_name("st")


def schemathesis(url: str, report_dir: Path, *args: str, timeout: float = 150) -> dict:
    """Run ``st run`` against ``url``; its JSON report."""
    command = [
        str(ST), "run", f"{url}/openapi.json", "--checks", "all",
        "--exclude-checks", "positive_data_acceptance", "--seed", "20261122", "--workers", "1",
        "--request-timeout", "30", "--report", "json", "--report-dir", str(report_dir),
        "--warnings", "off", *args,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    reports = sorted(report_dir.glob("json-*.json"))
    assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(reports[-1].read_text())
    report["output"] = proc.stdout[-6000:]
    return report


@pytest.mark.skipif(shutil.which(str(ST)) is None, reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    server: ServiceProcess, tmp_path: Path
):
    every = schemathesis(server.url, tmp_path / "all", "--max-examples", "40")
    # with the admin key, the management routes that cannot unload anything
    keyed = schemathesis(
        server.url, tmp_path / "admin", "--max-examples", "25",
        "--header", f"Authorization: Bearer {ADMIN_KEY}",
        "--include-path-regex", "^/models", "--exclude-method", "DELETE",
    )  # fmt: skip
    for report in (every, keyed):
        cases = report["test_cases"]
        print(f"\nFIGURE schemathesis: {report['operations']['tested']} operations, "
              f"{cases['generated']} cases, {cases['with_failures']} with failures, "
              f"{len(report['errors'])} errors, {report['running_time']:.0f} s")  # fmt: skip
        assert report["complete"], report["output"]
        assert report["failures"] == [], report["output"]
        assert report["errors"] == [], report["output"]
        assert cases["errored"] == 0
    assert every["operations"]["tested"] >= 10
    assert every["test_cases"]["generated"] >= 300
    with server.client() as client:
        assert server_errors(client.get("/metrics").text) == 0
        assert client.get("/readyz").status_code == 200
        assert client.get("/models/digits").json()["versions"][0]["status"] == "ready"
