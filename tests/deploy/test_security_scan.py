"""Static security scan (checkov) over the Dockerfile and the rendered Kubernetes manifests.

Every finding is either fixed or suppressed where it arises with a reason: `# checkov:skip=ID:
reason` in the Dockerfile, `checkov.io/skipN: ID=reason` annotations in the manifests. checkov
runs offline (--skip-download) and takes 5-30 s here (most of it start-up), hence `slow`.

checkov pins old releases of packaging (<24) and networkx (<2.7) that conflict with pytest 9,
so it is best installed in a virtual environment of its own; point $CHECKOV at its executable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import EXTRAS, K8S, OVERLAYS, ROOT, kustomize_text, require_tool

# One checkov run serves the module: 5-30 s on these machines, mostly checkov's own start-up.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    checkov = require_tool(
        "checkov", "pip install checkov, best in a venv of its own; set CHECKOV=path", env="CHECKOV"
    )
    scan = tmp_path_factory.mktemp("checkov")
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    for overlay in OVERLAYS:
        (scan / f"{overlay}.yaml").write_text(kustomize_text(K8S / "overlays" / overlay))
    for extra in EXTRAS:
        (scan / f"{extra}.yaml").write_text(kustomize_text(K8S / extra))
    proc = subprocess.run(
        [checkov, "--directory", str(scan), "--framework", "dockerfile", "kubernetes",
         "--output", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300, cwd=scan, check=False,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    assert proc.stdout.strip(), (
        f"checkov printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


def test_scan_covered_the_dockerfile_and_the_manifests(checkov_report: list[dict]) -> None:
    scanned = {r["check_type"]: r["summary"] for r in checkov_report}
    assert {"dockerfile", "kubernetes"} <= set(scanned), scanned
    for check_type, summary in scanned.items():
        assert summary["passed"] > 0, f"{check_type}: nothing was checked"


def test_no_failed_checks(checkov_report: list[dict]) -> None:
    failed = [
        f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['file_path']} {c['resource']})"
        for r in checkov_report
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)


def test_every_suppression_gives_a_reason(checkov_report: list[dict]) -> None:
    skipped = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} skipped without a reason"
    # Only the documented suppressions: image digest, keys as env vars, the ARG-based FROM, and
    # no probes on the loader pod (it only sleeps while `kubectl cp` writes into the claim).
    documented = {"CKV_K8S_43", "CKV_K8S_35", "CKV_DOCKER_7", "CKV_K8S_8", "CKV_K8S_9"}
    assert {c["check_id"] for c in skipped} <= documented


def test_manifest_suppressions_are_few_and_documented() -> None:
    annotated = []
    for path in sorted(Path(K8S).rglob("*.yaml")):
        for line in path.read_text().splitlines():
            if "checkov.io/skip" in line:
                check, _, reason = line.split(":", 1)[1].strip().partition("=")
                annotated.append((path.name, check))
                assert len(reason) > 20, f"{path}: {check} without a reason"
    assert annotated, "the expected suppressions are annotated where they apply"
