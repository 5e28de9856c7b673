"""``runs/<run-id>/``: config.json, model.json, metrics.jsonl, best.pt, last.pt, report files."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import TrainerError


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_id(arch: str, dataset: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dataset.split(":", 1)[0]).strip("-")
    return f"{stamp}-{arch}-{slug}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def model_meta(self) -> Path:
        return self.path / "model.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=False)
        return self

    def write_json(self, path: Path, data: Any) -> None:
        _atomic_write_text(path, json.dumps(data, indent=2, default=str))

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise TrainerError(f"{path} does not exist (is {self.path} a run directory?)") from exc
        except ValueError as exc:
            raise TrainerError(f"{path} is not valid JSON: {exc}") from exc

    def write_history(self, history: list[dict[str, Any]]) -> None:
        _atomic_write_text(self.metrics, "".join(json.dumps(row) + "\n" for row in history))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def existing_run(path: str | Path) -> RunDir:
    run = RunDir(Path(path))
    if not run.config.is_file():
        raise TrainerError(f"{path} is not a run directory (no config.json)")
    return run


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(
        (RunDir(p) for p in root.iterdir() if (p / "config.json").is_file()),
        key=lambda r: r.path.name,
    )
