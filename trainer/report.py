"""The evaluation report of a run: ``report.json``, two PNG figures and a printable table.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas, never
through ``pyplot``: no global backend is selected, no window can open, nothing is left behind in
pyplot's figure registry, and it works the same under pytest, in threads and on headless CI.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

REPORT_NAME = "report.json"
CONFUSION_NAME = "confusion_matrix.png"
CURVES_NAME = "training_curves.png"
ANNOTATE_MAX_CLASSES = 20
TICK_LABELS_MAX_CLASSES = 60


def _jsonable(value: Any) -> Any:
    """Plain JSON types only; non-finite floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars/arrays and tensors
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(fig: Figure, path: Path, dpi: int = 110) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    _atomic_write_bytes(Path(path), buf.getvalue())


def plot_confusion_matrix(cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    """Counts as a heat map (rows = true class, columns = prediction); numbers up to 20 classes."""
    counts = np.asarray(cm, dtype=np.int64)
    n = counts.shape[0]
    side = float(np.clip(2.5 + 0.35 * n, 5.0, 12.0))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="samples")
    if n <= TICK_LABELS_MAX_CLASSES:
        fontsize = 9 if n <= ANNOTATE_MAX_CLASSES else 6
        ax.set_xticks(
            range(n),
            [str(x) for x in labels],
            rotation=45 if n > 10 else 0,
            ha="right" if n > 10 else "center",
            fontsize=fontsize,
        )
        ax.set_yticks(range(n), [str(x) for x in labels], fontsize=fontsize)
    if n <= ANNOTATE_MAX_CLASSES:
        threshold = counts.max() / 2 if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > threshold else "black",
            )
    total = int(counts.sum())
    acc = float(np.trace(counts) / total) if total else 0.0
    suffix = "" if n <= TICK_LABELS_MAX_CLASSES else " (class index)"
    ax.set(
        xlabel=f"predicted label{suffix}",
        ylabel=f"true label{suffix}",
        title=f"Confusion matrix (n={total}, accuracy={acc:.2%})",
    )
    _save(fig, Path(path))
    return Path(path)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(row["epoch"]), float(row[key]))
        for row in history
        if row.get(key) is not None and row.get("epoch") is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(history: list[dict], path: Path) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and validation."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            x, y = _series(history, f"{split}_{metric}")
            if x:
                ax.plot(x, y, style, markersize=3, label=split)
        ax.set(title=title, xlabel="epoch", ylabel=title.lower())
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if history:
        epochs = [row["epoch"] for row in history if row.get("epoch") is not None]
        if epochs and all(float(e).is_integer() for e in epochs):
            for ax in axes:
                ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, Path(path))
    return Path(path)


def write_report(
    run_dir: Path,
    *,
    test_report: dict,
    ece_before: float,
    ece_after: float,
    temperature: float,
    history: list[dict],
    labels: list[str],
    extra: dict | None = None,
) -> Path:
    """Write ``report.json``, ``confusion_matrix.png`` and ``training_curves.png`` into ``run_dir``.

    ``report.json`` is one flat object: the test metrics of ``metrics.classification_report``
    (``accuracy``, ``per_class``, ``ece``, ...), then ``split``, ``labels``, ``temperature`` (the
    fitted T, applied to the test metrics when ``test_report`` was computed with it),
    ``ece_before`` / ``ece_after`` (test ECE at T = 1 and at T), ``history``, ``figures`` and the
    ``extra`` entries. Returns the path of ``report.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "split": "test",
        "labels": list(labels),
        **test_report,
        "temperature": temperature,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "calibration": "temperature scaling fitted on the validation split",
        "history": history,
        "figures": {"confusion_matrix": CONFUSION_NAME, "training_curves": CURVES_NAME},
    }
    report.update(extra or {})
    plot_confusion_matrix(test_report["confusion_matrix"], labels, run_dir / CONFUSION_NAME)
    plot_training_curves(history, run_dir / CURVES_NAME)
    path = run_dir / REPORT_NAME
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(path, text.encode())
    return path


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}" if pct else f"{value:.4f}"
    return str(value)


def _headline_table(report: dict) -> Table:
    table = Table(title=f"Evaluation ({report.get('split', 'test')} split)", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("samples", _fmt(report.get("num_samples")))
    table.add_row("accuracy", _fmt(report.get("accuracy"), pct=True))
    if topk := report.get("topk_accuracy"):
        table.add_row(f"top-{topk['k']} accuracy", _fmt(topk["value"], pct=True))
    for avg in ("macro_avg", "weighted_avg"):
        if avg in report:
            table.add_row(f"{avg.replace('_avg', '')} F1", _fmt(report[avg]["f1"]))
    auc = report.get("roc_auc_ovr")
    table.add_row("ROC AUC (ovr, macro)", _fmt(auc) if auc is not None else "n/a")
    table.add_row("NLL", _fmt(report.get("nll")))
    if report.get("temperature") is not None:
        table.add_row("temperature", _fmt(float(report["temperature"])))
    if "ece_before" in report or "ece_after" in report:
        table.add_row("ECE before scaling", _fmt(report.get("ece_before")))
        table.add_row("ECE after scaling", _fmt(report.get("ece_after")))
    else:
        table.add_row("ECE", _fmt(report.get("ece")))
    return table


def _per_class_table(report: dict) -> Table:
    table = Table(title="Per class")
    table.add_column("class")
    for name in ("precision", "recall", "F1", "support"):
        table.add_column(name, justify="right")
    for row in report.get("per_class", []):
        table.add_row(
            str(row["label"]),
            _fmt(row["precision"]),
            _fmt(row["recall"]),
            _fmt(row["f1"]),
            str(row["support"]),
        )
    support = sum(row["support"] for row in report.get("per_class", []))
    table.add_section()
    for avg in ("macro_avg", "weighted_avg"):
        if avg in report:
            m = report[avg]
            table.add_row(
                avg.replace("_", " "),
                _fmt(m["precision"]),
                _fmt(m["recall"]),
                _fmt(m["f1"]),
                str(support),
                style="bold",
            )
    return table


def render_report_table(report: dict, *, width: int = 100) -> str:
    """The report as plain text: headline metrics, then per-class P/R/F1/support and averages.

    Takes ``report.json``'s flat object, a bare ``classification_report`` dict, or one with the
    metrics nested under ``"test"`` beside ``temperature`` / ``ece_before`` / ``ece_after``.
    """
    console = Console(
        file=io.StringIO(), width=width, color_system=None, force_terminal=False, record=True
    )
    if isinstance(report.get("test"), dict):  # {"test": metrics, "temperature": ..., ...}
        report = {**report["test"], **{k: v for k, v in report.items() if k != "test"}}
    console.print(_headline_table(report))
    if report.get("per_class"):
        console.print(_per_class_table(report))
    return console.export_text()
