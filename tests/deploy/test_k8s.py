"""Kubernetes: the kustomizations render, every object validates against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict), the ServiceMonitor against our own schema, and the
wiring between the objects holds."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import EXTRAS, K8S, K8S_VERSION, OVERLAYS, ROOT, by_kind, kustomize

CRD_GROUPS = ("monitoring.coreos.com/",)
SERVICEMONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


def validate(kv, obj: dict) -> None:
    """kubernetes-validate in strict mode (unknown fields fail), or our schema for CRDs."""
    if obj["apiVersion"].startswith(CRD_GROUPS):
        jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
        schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
        assert obj["kind"] == "ServiceMonitor", f"no schema for {obj['kind']}"
        jsonschema.Draft7Validator(schema).validate(obj)
        return
    kv.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", [*OVERLAYS, *EXTRAS])
def test_every_rendered_object_validates(kv, rendered, target: str) -> None:
    failures = []
    for obj in rendered[target]:
        try:
            validate(kv, obj)
        except Exception as exc:  # noqa: BLE001 (collect every failure, then report them all)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_strict_validation_catches_a_typo(kv, rendered) -> None:
    """Negative controls: a misspelled field fails both validators."""
    deployment = copy.deepcopy(by_kind(rendered["gpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = deployment["spec"][
        "template"
    ]["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        validate(kv, deployment)
    monitor = copy.deepcopy(by_kind(rendered["gpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["pathh"] = "/metrics"
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        validate(kv, monitor)


def test_secret_example_validates_and_is_not_applied(kv) -> None:
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    validate(kv, example)
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in base["resources"]


def test_queue_depth_component_renders_and_validates(kv, tmp_path: Path) -> None:
    """The documented autoscaling example: the gpu overlay plus the queue-depth component."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "gpu-queue-depth"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../gpu]\ncomponents: [../../components/queue-depth-hpa]\n"
    )
    objects = kustomize(overlay)
    for obj in objects:
        validate(kv, obj)
    metrics = by_kind(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    [pods] = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert pods["metric"]["name"] == "imgserve_queue_depth"
    assert any(m["type"] == "Resource" for m in metrics), "CPU stays as the second signal"
    values = yaml.safe_load(
        (K8S / "components" / "queue-depth-hpa" / "prometheus-adapter-values.yaml").read_text()
    )
    [rule] = values["rules"]["custom"]
    assert rule["name"]["as"] == "imgserve_queue_depth"
    assert rule["seriesQuery"].startswith("imgserve_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- wiring --------------------------------------------------------------------------------


def pod_spec(objects: list[dict], kind: str = "Deployment") -> dict:
    return by_kind(objects, kind)["spec"]["template"]["spec"]


def container(objects: list[dict], kind: str = "Deployment") -> dict:
    [c] = pod_spec(objects, kind)["containers"]
    return c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_imgserve_namespace(rendered, overlay: str) -> None:
    for obj in rendered[overlay] + rendered["train"] + rendered["loader"]:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "imgserve"
        else:
            assert obj["metadata"].get("namespace") == "imgserve", obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_shutdown(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    c = container(objects)
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= 300, "model load + warm-up gets at least five minutes"
    [pause] = [int(a) for a in c["lifecycle"]["preStop"]["exec"]["command"] if a.isdigit()]
    config = by_kind(objects, "ConfigMap")["data"]
    drain = float(config["GRACEFUL_TIMEOUT_S"])
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > pause + drain
    assert "command" not in c and "args" not in c, "the image's CMD runs, as in docker compose"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(rendered, overlay: str) -> None:
    spec = pod_spec(rendered[overlay])
    c = container(rendered[overlay])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile_user, "Dockerfile USER uid:gid"
    assert spec["securityContext"]["runAsUser"] == int(dockerfile_user.group(1))
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "writable /tmp"
    for key in ("limits", "requests"):
        assert {"cpu", "memory"} <= set(c["resources"][key])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_from_configmap_and_keys_from_secret(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    c = container(objects)
    config = by_kind(objects, "ConfigMap")
    [ref] = c["envFrom"]
    assert ref["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["MODEL_STORE"] == "/models"
    env = {e["name"]: e for e in c["env"]}
    for key in ("ADMIN_API_KEY", "API_KEY"):
        secret_ref = env[key]["valueFrom"]["secretKeyRef"]
        assert secret_ref == {"name": "imgserve-api-keys", "key": key, "optional": True}
        assert key not in config["data"]
    assert not [o for o in objects if o["kind"] == "Secret"], "no Secret (placeholder) is applied"


def test_configmap_keys_are_settings_of_the_service(rendered) -> None:
    settings = pytest.importorskip(
        "service.settings", reason="the service package is not importable"
    )
    known = {name.upper() for name in settings.Settings.model_fields}
    for overlay in OVERLAYS:
        data = by_kind(rendered[overlay], "ConfigMap")["data"]
        assert set(data) <= known, set(data) - known
        # The values parse as the service would parse them (DEVICE=cuda needs a GPU: skip it).
        values = {k.lower(): v for k, v in data.items() if k != "DEVICE"}
        settings.Settings(**values)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_store_claim(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    claim = by_kind(objects, "PersistentVolumeClaim")
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    [mount] = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == "/models"]
    source = volumes[mount["name"]]["persistentVolumeClaim"]
    assert source["claimName"] == claim["metadata"]["name"]
    assert mount["readOnly"] is True, "servers only read the store"
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas on several nodes + the Job"
    job = rendered["train"]
    [job_mount] = [m for m in container(job, "Job")["volumeMounts"] if m["mountPath"] == "/models"]
    job_volumes = {v["name"]: v for v in pod_spec(job, "Job")["volumes"]}
    assert (
        job_volumes[job_mount["name"]]["persistentVolumeClaim"]["claimName"] == source["claimName"]
    )
    assert not job_mount.get("readOnly")
    assert "--model-store=/models" in container(job, "Job")["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_hpa_pdb_netpol_monitor_select_the_server_pods(rendered, overlay: str) -> None:
    objects = rendered[overlay]
    deployment = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = by_kind(objects, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"],
    }  # fmt: skip
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert selects(
        by_kind(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    policy = by_kind(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    monitor = by_kind(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The training and loader pods never receive the Service's traffic.
    job_labels = by_kind(rendered["train"], "Job")["spec"]["template"]["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], job_labels)
    loader_labels = by_kind(rendered["loader"], "Pod")["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], loader_labels)


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes(rendered) -> None:
    objects = rendered["gpu"]
    spec = pod_spec(objects)
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in spec["tolerations"]
    assert by_kind(objects, "ConfigMap")["data"]["DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")


def test_cpu_overlay_has_no_gpu(rendered) -> None:
    objects = rendered["cpu"]
    text = json.dumps(objects)
    assert "nvidia" not in text
    assert by_kind(objects, "ConfigMap")["data"]["DEVICE"] == "cpu"
    assert container(objects)["image"].endswith("-cpu")
    assert by_kind(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_training_job_runs_the_trainer_on_a_gpu(rendered) -> None:
    job = rendered["train"]
    c = container(job, "Job")
    assert c["command"] == ["trainer"] and c["args"][0] == "fit"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(job, "Job")["restartPolicy"] == "Never"
    assert c["image"].endswith("-cuda")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/models", "/runs", "/tmp", "/dev/shm"} <= mounts
    data_root = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--data-root="))
    assert data_root in mounts, "data sets download into a writable volume"


def test_loader_pod_mounts_the_claim_writable(rendered) -> None:
    pod = by_kind(rendered["loader"], "Pod")
    [c] = pod["spec"]["containers"]
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = by_kind(rendered["gpu"], "PersistentVolumeClaim")["metadata"]["name"]
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert not mount.get("readOnly")
    assert pod["spec"]["activeDeadlineSeconds"] <= 3600, "it goes away by itself"
    policy = by_kind(rendered["loader"], "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"], "no traffic at all"
