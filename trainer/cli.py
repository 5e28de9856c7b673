"""``trainer`` command line: fit, evaluate, archive, runs, sweep.

Flags of ``fit`` are generated from the config dataclasses, so every config field has exactly
one flag (``--batch-size`` sets ``data.batch_size``) and nothing is declared twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from .config import TrainConfig, field_owner, load_yaml
from .errors import TrainerError

log = logging.getLogger("trainer")

HELP = {
    "dataset": "digits (offline default), cifar10, cifar100, mnist, fashion-mnist, or folder:PATH",
    "data_root": "where torchvision datasets live or are downloaded to",
    "image_size": "model input size in pixels (default: the dataset's own)",
    "augment": "none | standard (crop + flip) | strong (+ rotation, colour jitter, erasing)",
    "sampler": "shuffle | balanced (oversample rare classes)",
    "grayscale": "native (1-channel stem) | replicate (grey -> RGB, for pretrained nets)",
    "arch": "architecture (see `trainer models`)",
    "pretrained": "torchvision weights tag (IMAGENET1K_V1, DEFAULT) or a local weights file",
    "mode": "scratch | finetune | linear-probe",
    "small_input": "force the 3x3 stride-1 stem on/off (default: on for inputs <= 32 px)",
    "class_weights": "none | auto (inverse class frequency)",
    "loss": "ce | focal",
    "schedule": "onecycle | cosine | step | constant",
    "milestones": "epochs where the step schedule multiplies the lr by --gamma",
    "patience": "early stopping: epochs without val-accuracy improvement",
    "amp": "auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16",
    "archive": "archive the best model into --model-store under this name",
    "version": "archive version (default: next free one)",
    "progress": "auto | bar | lines",
}

_TYPES = {"int": int, "float": float, "str": str}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section in fields(TrainConfig):
        group = parser.add_argument_group(section.name)
        for spec in fields(section.default_factory()):  # type: ignore[misc]
            flag = "--" + spec.name.replace("_", "-")
            kind = str(spec.type).replace(" | None", "")
            default = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
            options: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS}
            options["help"] = f"{HELP.get(spec.name, '')} (default: {default})".strip()
            if kind == "bool":
                options["action"] = argparse.BooleanOptionalAction
            elif kind == "list[int]":
                options.update(type=int, nargs="+")
            else:
                options["type"] = _TYPES[kind]
            group.add_argument(flag, **options)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config YAML (sections or flat keys) < flags given on the command line."""
    sections: dict[str, dict[str, Any]] = {}
    if getattr(args, "config", None):
        for key, value in load_yaml(args.config).items():
            if isinstance(value, dict) and key in {f.name for f in fields(TrainConfig)}:
                sections.setdefault(key, {}).update(value)
            else:
                sections.setdefault(_owner(key), {})[key] = value
    for key, value in vars(args).items():
        if key not in ("command", "config", "resume", "handler"):
            sections.setdefault(field_owner(key), {})[key] = value
    return TrainConfig.from_dict(sections)


def _owner(key: str) -> str:
    try:
        return field_owner(key)
    except KeyError as exc:
        raise TrainerError(f"unknown config key {key!r}") from exc


def _check_names(cfg: TrainConfig) -> None:
    from .data.datasets import list_datasets
    from .models import list_models

    if cfg.model.arch not in list_models():
        raise TrainerError(
            f"unknown architecture {cfg.model.arch!r}; choose from: {', '.join(list_models())}"
        )
    known = list_datasets()
    if cfg.data.dataset not in known and not cfg.data.dataset.startswith("folder:"):
        raise TrainerError(f"unknown dataset {cfg.data.dataset!r}; choose from: {', '.join(known)}")


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit

    cfg = None if args.resume else build_config(args)
    if cfg is not None:
        _check_names(cfg)
    result = fit(cfg or TrainConfig(), resume=args.resume)
    if result is not None:
        log.info("run directory: %s", result.run_dir)
        if result.archive is not None:
            log.info("archive: %s", result.archive)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate_cmd import evaluate_target

    evaluate_target(
        args.target,
        dataset=args.dataset,
        data_root=args.data_root,
        device=args.device,
        out=args.out,
    )
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from .archiving import archive_run

    path = archive_run(args.run, name=args.name, version=args.version, store=args.model_store)
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .runs_table import render_runs

    sys.stdout.write(render_runs(args.runs_dir) + "\n")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    run_sweep(
        args.spec,
        archive_best=args.archive_best,
        model_store=args.model_store,
        runs_dir=args.runs_dir,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    sys.stdout.write("\n".join(list_models()) + "\n")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit_p = sub.add_parser("fit", help="train a model (and archive it with --archive NAME)")
    fit_p.add_argument("--config", help="YAML file of defaults (sections or flat keys)")
    fit_p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    _add_config_flags(fit_p)
    fit_p.set_defaults(handler=cmd_fit)

    ev = sub.add_parser(
        "evaluate", help="evaluate an archive (.mar) or a run directory on its test split"
    )
    ev.add_argument("target")
    ev.add_argument("--dataset", help="dataset to evaluate on (default: the one it was trained on)")
    ev.add_argument("--data-root", default="data")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", help="write the report JSON here")
    ev.set_defaults(handler=cmd_evaluate)

    ar = sub.add_parser("archive", help="archive a run's best model as a .mar")
    ar.add_argument("run", metavar="RUN_DIR")
    ar.add_argument("--name", required=True)
    ar.add_argument("--version")
    ar.add_argument("--model-store", default="model_store")
    ar.set_defaults(handler=cmd_archive)

    runs = sub.add_parser("runs", help="list past runs")
    runs.add_argument("--runs-dir", default="runs")
    runs.set_defaults(handler=cmd_runs)

    sw = sub.add_parser("sweep", help="grid or random search from a YAML spec")
    sw.add_argument("spec")
    sw.add_argument("--archive-best", metavar="NAME")
    sw.add_argument("--model-store", default="model_store")
    sw.add_argument("--runs-dir")
    sw.set_defaults(handler=cmd_sweep)

    models = sub.add_parser("models", help="list the architectures")
    models.set_defaults(handler=cmd_models)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.handler(args)
    except TrainerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: continue with `trainer fit --resume <run directory>`\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
