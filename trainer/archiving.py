"""From a run directory to a model archive: the card is assembled from what the run saved."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torchvision

from .archive import ModelCard, next_version, write_archive
from .checkpoint import load_checkpoint
from .rundir import existing_run

log = logging.getLogger("trainer")

HEADLINE_METRICS = ("accuracy", "topk_accuracy", "ece", "nll", "num_samples", "roc_auc_ovr")


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    test = report.get("test", report)
    metrics = {k: test[k] for k in HEADLINE_METRICS if k in test}
    if "macro_avg" in test:
        metrics["macro_f1"] = test["macro_avg"].get("f1")
    for key in ("ece_before", "ece_after", "temperature"):
        if key in report:
            metrics[key] = report[key]
    return metrics


def archive_run(
    run_path: str | Path,
    *,
    name: str,
    version: str | None = None,
    store: str | Path = "model_store",
) -> Path:
    """Write the run's best weights as ``<store>/<name>-v<version>.mar``; returns its path."""
    run = existing_run(run_path)
    meta = run.read_json(run.model_meta)
    report = run.read_json(run.report) if run.report.is_file() else {}
    state_dict = load_checkpoint(run.best)["model"]
    card = ModelCard(
        name=name,
        version=str(version) if version is not None else next_version(store, name),
        arch=meta["arch"],
        num_classes=meta["num_classes"],
        labels=meta["labels"],
        in_chans=meta["in_chans"],
        small_input=meta["small_input"],
        grayscale_policy=meta["grayscale_policy"],
        preprocess=meta["preprocess"],
        temperature=float(report.get("temperature", 1.0)),
        metrics=headline_metrics(report),
        dataset=meta["dataset"],
        training_config={**run.read_json(run.config), "run_id": run.path.name},
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
    )
    path = write_archive(card, state_dict, store)
    log.info("archived %s version %s to %s", name, card.version, path)
    return path
