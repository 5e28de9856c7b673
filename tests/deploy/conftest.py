"""Shared helpers of the deployment tests: repository paths, the validator tools, renderings.

Every tool is looked up, never installed, and a test that needs a missing one is skipped with
the reason (what to install). Nothing here touches the network, a Docker engine or a cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The Compose Specification schema lives beside the project (shared/), never inside it.
COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
# A recent Kubernetes release whose OpenAPI schemas kubernetes-validate ships.
K8S_VERSION = "1.37.0"
OVERLAYS = ("gpu", "cpu")
# Kustomizations applied on their own, beside an overlay: the training Job, the loader pod.
EXTRAS = ("train", "loader")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.deploy)


def find_tool(name: str, env: str | None = None) -> str | None:
    """An executable: $ENV if set, else next to this Python (the venv), else on PATH."""
    if env and os.environ.get(env):
        return os.environ[env]
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def require_tool(name: str, hint: str, env: str | None = None) -> str:
    path = find_tool(name, env)
    if path is None:
        pytest.skip(f"{name} not found ({hint})")
    return path


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize PATH`, parsed: the objects `kubectl apply -k PATH` would send."""
    kubectl = require_tool("kubectl", "install kubectl to render the kustomizations")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def kustomize_text(path: Path) -> str:
    kubectl = require_tool("kubectl", "install kubectl to render the kustomizations")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def by_kind(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """The gpu and cpu overlays, the training Job and the loader pod, rendered once."""
    out = {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}
    for extra in EXTRAS:
        out[extra] = kustomize(K8S / extra)
    return out


# --- docker compose: YAML with Compose's tags, and the merge of an override file --------------


class Reset:
    """Compose's `!reset` tag: the key is removed from the merged result."""


class Override:
    """Compose's `!override` tag: the value replaces the base one instead of merging."""

    def __init__(self, value: object) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass


def _plain(value: object) -> object:
    """An override file's value with no base counterpart: tags resolved, `!reset` keys dropped."""
    if isinstance(value, Override):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, Reset)}
    return value


def merge_compose(base: object, override: object) -> object:
    """Compose's merge of an override file, for the mappings and scalars our files use."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value)
            else:
                merged[key] = _plain(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out
