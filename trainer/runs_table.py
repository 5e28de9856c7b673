"""``trainer runs``: past runs as a table."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .rundir import RunDir, list_runs


def _row(run: RunDir) -> list[str]:
    config = json.loads(run.config.read_text())
    history = run.read_history()
    best_val = max((row["val_acc"] for row in history), default=None)
    test_acc = duration = "-"
    if run.report.is_file():
        report = json.loads(run.report.read_text())
        test = report.get("test", report)
        test_acc = f"{test.get('accuracy', float('nan')):.4f}"
        seconds = report.get("train_seconds")
        duration = f"{seconds:.0f}s" if isinstance(seconds, (int, float)) else "-"
    status = (
        "done" if run.report.is_file() else f"{len(history)}/{config['schedule']['epochs']} epochs"
    )
    return [
        run.path.name,
        config["model"]["arch"],
        config["data"]["dataset"],
        f"{best_val:.4f}" if best_val is not None else "-",
        test_acc,
        duration,
        status,
    ]


def render_runs(runs_dir: str | Path) -> str:
    runs = list_runs(runs_dir)
    if not runs:
        return f"no runs in {runs_dir}"
    table = Table(title=f"runs in {runs_dir}")
    for column in ("run id", "arch", "dataset", "best val acc", "test acc", "duration", "status"):
        table.add_column(column)
    for run in runs:
        table.add_row(*_row(run))
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(table)
    return console.export_text()
