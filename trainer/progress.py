"""Progress reporting: a tqdm bar per epoch on a terminal, one log line per epoch otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("trainer")


class Progress:
    """Wraps an epoch's batches; ``update`` sets the live postfix (loss, accuracy, lr)."""

    def __init__(self, *, mode: str = "auto", enabled: bool = True) -> None:
        self.use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.enabled = enabled
        self._bar: tqdm | None = None
        self.description = ""

    def start_epoch(self, description: str) -> None:
        self.description = description

    def wrap(self, loader: Iterable) -> Iterator:
        if not self.use_bar:
            yield from loader
            return
        total = len(loader) if hasattr(loader, "__len__") else None
        with tqdm(loader, total=total, desc=self.description, unit="batch", leave=False) as bar:
            self._bar = bar
            yield from bar
        self._bar = None

    def update(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()},
                refresh=False,
            )

    def epoch_line(self, message: str) -> None:
        if self.enabled:
            log.info(message)
