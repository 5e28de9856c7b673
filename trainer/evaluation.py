"""Evaluation of a trained model on the held-out test split, with temperature scaling fitted
on the validation split, written as report.json + plots and printed as a table."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import fit_temperature
from .engine import evaluate
from .metrics import classification_report, expected_calibration_error
from .report import render_report_table, write_report
from .rundir import RunDir
from .runtime import Runtime

log = logging.getLogger("trainer")


def _ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return expected_calibration_error(torch.softmax(logits / temperature, dim=1), targets)


def calibrated_report(
    *, val_logits: torch.Tensor, val_targets: torch.Tensor, test_logits: torch.Tensor,
    test_targets: torch.Tensor, labels: list[str],
) -> tuple[dict[str, Any], float, float, float]:  # fmt: skip
    """The test report at the temperature fitted on validation; ECE before/after on test."""
    temperature = fit_temperature(val_logits, val_targets) if len(val_targets) else 1.0
    report = classification_report(test_logits, test_targets, labels, temperature=temperature)
    ece_before = _ece(test_logits, test_targets, 1.0)
    ece_after = _ece(test_logits, test_targets, temperature)
    return report, temperature, ece_before, ece_after


def print_table(report: dict[str, Any]) -> None:
    sys.stdout.write(render_report_table(report) + "\n")
    sys.stdout.flush()


def evaluate_split(
    *, model: nn.Module, run: RunDir, loaders, runtime: Runtime, labels: list[str],
    history: list[dict[str, Any]], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    val = evaluate(model=model, loss_fn=loss_fn, loader=loaders.val, runtime=runtime)
    test = evaluate(model=model, loss_fn=loss_fn, loader=loaders.test, runtime=runtime)
    report, temperature, ece_before, ece_after = calibrated_report(
        val_logits=val.logits, val_targets=val.targets,
        test_logits=test.logits, test_targets=test.targets, labels=labels,
    )  # fmt: skip
    path = write_report(
        run.path, test_report=report, ece_before=ece_before, ece_after=ece_after,
        temperature=temperature, history=history, labels=labels,
        extra={"val_accuracy": val.accuracy, **(extra or {})},
    )  # fmt: skip
    full = run.read_json(path)
    print_table(full)
    log.info("report written to %s", Path(path))
    return full
