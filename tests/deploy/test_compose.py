"""docker-compose.yml (+ the CPU override) against the Compose Specification schema, its wiring,
and the Prometheus and Grafana files it mounts."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import COMPOSE_SCHEMA, ROOT, load_compose, merge_compose, require_tool

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "service.json"


@pytest.fixture(scope="module")
def compose_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"Compose Specification schema not found at {COMPOSE_SCHEMA} (shared/schemas)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The file says draft-07 (with a `$schema` URL jsonschema does not recognise by itself).
    assert "draft-07" in schema["$schema"]
    cls = jsonschema.Draft7Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def gpu() -> dict:
    return load_compose(COMPOSE)


def cpu() -> dict:
    return merge_compose(load_compose(COMPOSE), load_compose(COMPOSE_CPU))  # type: ignore[return-value]


def schema_errors(validator, document: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=str)
    ]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_validates_against_the_compose_specification(compose_validator, variant) -> None:
    document = gpu() if variant == "gpu" else cpu()
    assert schema_errors(compose_validator, document) == []


def test_schema_validation_catches_a_typo(compose_validator) -> None:
    """Negative control: the schema really is strict about service keys."""
    document = gpu()
    document["services"]["service"]["healthchek"] = document["services"]["service"].pop(
        "healthcheck"
    )
    assert schema_errors(compose_validator, document)


def test_cpu_override_validates_on_its_own(compose_validator) -> None:
    # An override file is itself a (partial) Compose file; `!reset` values removed first.
    document = merge_compose({}, load_compose(COMPOSE_CPU))
    assert schema_errors(compose_validator, document) == []


def test_service_wiring() -> None:
    service = gpu()["services"]["service"]
    assert "8000:8000" in service["ports"]
    assert service["environment"]["MODEL_STORE"] == "/models"
    assert "model_store:/models:ro" in service["volumes"]
    assert "model_store" in gpu()["volumes"]
    assert service["build"] == {"context": ".", "args": {"VARIANT": "cuda"}}
    health = service["healthcheck"]["test"]
    assert health[0] == "CMD" and "http://127.0.0.1:8000/readyz" in " ".join(health)
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["cap_drop"] == ["ALL"]
    # Longer than the service's own drain (GRACEFUL_TIMEOUT_S, 30 s by default).
    assert int(service["stop_grace_period"].rstrip("s")) > 30
    # Keys only pass through from the caller's environment; none is written here.
    assert service["environment"]["ADMIN_API_KEY"] is None
    assert service["environment"]["API_KEY"] is None


def test_gpu_reservation_and_its_removal_for_cpu() -> None:
    devices = gpu()["services"]["service"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    merged = cpu()
    for name in ("service", "trainer"):
        assert "deploy" not in merged["services"][name], f"{name} still reserves a GPU"
        assert merged["services"][name]["build"]["args"]["VARIANT"] == "cpu"
        assert merged["services"][name]["image"].endswith("-cpu")
    assert merged["services"]["service"]["environment"]["DEVICE"] == "cpu"
    # The rest of the wiring survives the merge.
    assert (
        merged["services"]["service"]["healthcheck"] == gpu()["services"]["service"]["healthcheck"]
    )
    assert "!reset" in COMPOSE_CPU.read_text()


def test_trainer_is_a_one_shot_under_the_train_profile() -> None:
    trainer = gpu()["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["entrypoint"] == ["trainer"]
    assert trainer["command"][0] == "fit"
    assert "model_store:/models" in trainer["volumes"]
    assert trainer["image"] == gpu()["services"]["service"]["image"], "same image as the server"
    assert "restart" not in trainer
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_prometheus_scrapes_the_service() -> None:
    prometheus = gpu()["services"]["prometheus"]
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:") for v in prometheus["volumes"])
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "imgserve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["service:8000"]


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus (Debian ships promtool)")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_are_pinned() -> None:
    for name, service in gpu()["services"].items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (name, image)


# --- Grafana -------------------------------------------------------------------------------

# The metrics the service exports (service/metrics.py), histograms by their base name.
HISTOGRAMS = {
    "imgserve_http_request_duration_seconds", "imgserve_request_duration_seconds",
    "imgserve_queue_wait_seconds", "imgserve_preprocess_seconds", "imgserve_forward_seconds",
    "imgserve_batch_size", "imgserve_confidence",
}  # fmt: skip
SIMPLE = {
    "imgserve_http_requests_total", "imgserve_queue_depth", "imgserve_images_total",
    "imgserve_rejected_total", "imgserve_predictions_total", "imgserve_model_info",
    "imgserve_model_load_seconds", "imgserve_gpu_memory_allocated_bytes",
    "imgserve_gpu_memory_reserved_bytes",
}  # fmt: skip


def dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: [t["expr"] for t in panel.get("targets", [])]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }


def dashboard_metric_names() -> set[str]:
    names = set()
    for exprs in dashboard_exprs().values():
        for expr in exprs:
            names |= set(re.findall(r"\bimgserve_[a-z_]+", expr))
    return names


def test_grafana_provisioning_matches_compose_mounts() -> None:
    grafana = gpu()["services"]["grafana"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./")
    )
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/imgserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(path) and (GRAFANA / "dashboards" / Path(home).name).is_file()
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == source["uid"]


def promql_check(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on the expressions as recording rules: Prometheus' own parser."""
    promtool = require_tool("promtool", "apt-get install prometheus (Debian ships promtool)")
    rules = [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "1m").replace(
            "$model", ".*"
        )}
        for i, expr in enumerate(exprs)
    ]  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = [e for panel in dashboard_exprs().values() for e in panel]
    assert len(exprs) > 20
    proc = promql_check(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Negative control: a broken query fails.
    assert promql_check(["sum(rate(imgserve_images_total[1m])"], tmp_path).returncode != 0


def test_dashboard_uses_only_exported_metrics() -> None:
    valid = SIMPLE | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    assert dashboard_metric_names() <= valid, dashboard_metric_names() - valid


@pytest.mark.parametrize(
    ("panel", "needles"),
    [
        ("Request rate by route and status", ["imgserve_http_requests_total", "route, status"]),
        ("HTTP latency p50 / p95 / p99 by route",
         ["histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,"]),
        ("Batch size", ["imgserve_batch_size_bucket", "imgserve_batch_size_sum"]),
        ("Queue depth", ["imgserve_queue_depth"]),
        ("Rejected requests by reason", ["imgserve_rejected_total", "reason"]),
        ("Inference (forward pass) latency p50 / p95 / p99",
         ["imgserve_forward_seconds_bucket", "histogram_quantile(0.99,"]),
        ("Predictions per class", ["imgserve_predictions_total", "label"]),
        ("GPU memory",
         ["imgserve_gpu_memory_allocated_bytes", "imgserve_gpu_memory_reserved_bytes"]),
    ],
)  # fmt: skip
def test_dashboard_has_the_panels_operators_need(panel: str, needles: list[str]) -> None:
    exprs = " ".join(dashboard_exprs()[panel])
    for needle in needles:
        assert needle in exprs, f"{panel}: {needle}"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells
