"""``trainer sweep SPEC.yaml``: a grid or random search over config fields.

```yaml
base: {dataset: digits, arch: resnet20, epochs: 5}   # flat field names, like the flags
grid: {lr: [0.05, 0.1], optimizer: [sgd, adamw]}      # every combination
# or instead of grid:
random: {trials: 6, seed: 0, space: {lr: {loguniform: [0.001, 0.2]}, batch_size: [32, 64, 128]}}
```
Trials are ranked by best validation accuracy (test accuracy is reported, never used to pick).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .config import TrainConfig, field_owner, load_yaml
from .errors import TrainerError


def _sections(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        try:
            sections.setdefault(field_owner(key), {})[key] = value
        except KeyError as exc:
            raise TrainerError(f"sweep spec: unknown config field {key!r}") from exc
    return sections


def _sample(space: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    trial = {}
    for key, choice in space.items():
        if isinstance(choice, list):
            trial[key] = rng.choice(choice)
        elif isinstance(choice, dict) and "loguniform" in choice:
            low, high = choice["loguniform"]
            trial[key] = math.exp(rng.uniform(math.log(low), math.log(high)))
        elif isinstance(choice, dict) and "uniform" in choice:
            trial[key] = rng.uniform(*choice["uniform"])
        else:
            raise TrainerError(f"sweep spec: cannot sample {key!r} from {choice!r}")
    return trial


def trials_from_spec(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if "grid" in spec:
        keys = list(spec["grid"])
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(spec["grid"][k] for k in keys))
        ]
    if "random" in spec:
        options = spec["random"]
        rng = random.Random(options.get("seed", 0))
        return [_sample(options["space"], rng) for _ in range(int(options.get("trials", 4)))]
    raise TrainerError("sweep spec needs a 'grid' or a 'random' section")


def _render(rows: list[dict[str, Any]], keys: list[str]) -> str:
    table = Table(title="sweep (ranked by best validation accuracy)")
    for column in ("rank", *keys, "best val acc", "test acc", "run"):
        table.add_column(column)
    for rank, row in enumerate(rows, 1):
        values = [
            f"{row['params'][k]:.4g}"
            if isinstance(row["params"][k], float)
            else str(row["params"][k])
            for k in keys
        ]
        table.add_row(str(rank), *values, f"{row['val']:.4f}", f"{row['test']:.4f}", row["run"])
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(table)
    return console.export_text()


def run_sweep(
    spec_path: str, *, archive_best: str | None, model_store: str, runs_dir: str | None
) -> list[dict[str, Any]]:
    from .archiving import archive_run
    from .fit import fit

    spec = load_yaml(spec_path)
    base = TrainConfig.from_dict(
        _sections({**spec.get("base", {}), **({"runs_dir": runs_dir} if runs_dir else {})})
    )
    trials = trials_from_spec(spec)
    rows = []
    for params in trials:
        result = fit(base.replace(**_sections(params)))
        assert result is not None  # sweeps run in a single process
        history = [
            json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        rows.append({
            "params": params,
            "val": max((h["val_acc"] for h in history), default=float("nan")),
            "test": result.report.get("test", result.report).get("accuracy", float("nan")),
            "run": result.run_dir.name,
            "run_dir": str(result.run_dir),
        })  # fmt: skip
    rows.sort(key=lambda row: -row["val"])
    print(_render(rows, list(trials[0]) if trials else []))  # noqa: T201
    if archive_best and rows:
        archive_run(Path(rows[0]["run_dir"]), name=archive_best, store=model_store)
    return rows
