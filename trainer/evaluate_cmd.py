"""``trainer evaluate TARGET``: an archive (.mar) or a run directory, on a test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from .archive import ModelCard, load_model, read_archive
from .build import MatchChannels
from .checkpoint import load_checkpoint
from .data.datasets import load_dataset, with_transform
from .data.presets import EvalPreset, PreprocessSpec
from .engine import evaluate
from .errors import TrainerError
from .evaluation import _ece, print_table
from .metrics import classification_report
from .models import build_model
from .rundir import existing_run
from .runtime import init_runtime


def _from_archive(path: Path) -> tuple[nn.Module, dict[str, Any], float, int]:
    archive = read_archive(path)
    card: ModelCard = archive.card
    seed = int(card.training_config.get("run", {}).get("seed", 0))
    meta = {"labels": card.labels, "preprocess": card.preprocess, "dataset": card.dataset}
    return load_model(archive), meta, card.temperature, seed


def _from_run(path: Path) -> tuple[nn.Module, dict[str, Any], float, int]:
    run = existing_run(path)
    meta = run.read_json(run.model_meta)
    model = build_model(
        meta["arch"],
        num_classes=meta["num_classes"],
        in_chans=meta["in_chans"],
        small_input=meta["small_input"],
    )
    model.load_state_dict(load_checkpoint(run.best)["model"])
    report = run.read_json(run.report) if run.report.is_file() else {}
    seed = int(run.read_json(run.config)["run"]["seed"])
    return model.eval(), meta, float(report.get("temperature", 1.0)), seed


def evaluate_target(
    target: str, *, dataset: str | None, data_root: str, device: str, out: str | None
) -> dict[str, Any]:
    path = Path(target)
    if not path.exists():
        raise TrainerError(f"{target} does not exist (give a .mar archive or a run directory)")
    model, meta, temperature, seed = (_from_run if path.is_dir() else _from_archive)(path)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    name = dataset or meta["dataset"]["name"]
    bundle = load_dataset(name, data_root=Path(data_root), seed=seed, image_size=spec.input_size[0])
    if list(bundle.labels) != list(meta["labels"]):
        raise TrainerError(
            f"dataset {name} has labels {bundle.labels[:5]}..., the model {meta['labels'][:5]}..."
        )
    runtime = init_runtime(device, "off")
    loader = DataLoader(
        with_transform(bundle.test, MatchChannels(spec.channels, EvalPreset(spec))), batch_size=128
    )
    result = evaluate(
        model=model.to(runtime.device),
        loss_fn=nn.CrossEntropyLoss(),
        loader=loader,
        runtime=runtime,
    )
    report = {
        "test": classification_report(
            result.logits, result.targets, meta["labels"], temperature=temperature
        ),
        "temperature": temperature,
        "ece_before": _ece(result.logits, result.targets, 1.0),
        "ece_after": _ece(result.logits, result.targets, temperature),
        "dataset": name,
        "target": str(path),
    }
    print_table(report)
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    return report
