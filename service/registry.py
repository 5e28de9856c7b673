"""The model registry: which archives are loaded, their status, and which one answers by default.

Each archive file in ``MODEL_STORE`` becomes one ``ModelEntry`` (a model version) whose status is
``loading``, ``ready`` or ``failed`` (with ``error``). Loading reads the archive through
``trainer.archive.read_archive`` (card validated, weights' SHA-256 checked, tensors only),
rebuilds the network with ``load_model`` (our code, never the archive's), moves it to the
device, warms it up and starts its batcher. A failure marks only that entry failed.

Defaults: the default model is ``DEFAULT_MODEL`` or else the newest model (by card creation
time) that has a ready version; a model's default version is the one set with
``PUT /models/{name}/default`` or else its newest ready version. So a newly registered version
takes traffic only once it is warmed up, and unloading one drains its queue first: hot swaps
lose no request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.archive import (
    ArchiveError,
    ModelCard,
    list_archives,
    load_model,
    read_archive,
    read_card,
)

from . import heap
from .batching import Batcher
from .errors import Conflict, InvalidRequest, NotFound, Unavailable
from .gpu_preprocess import GpuPreprocessor
from .inference import (
    ModelRunner,
    Preprocessor,
    decode_on_forward_thread,
    lone_image_threads,
    use_torchscript,
)
from .metrics import Metrics
from .settings import Settings, available_cpus

if TYPE_CHECKING:
    from .workers import ForwardBoard

log = logging.getLogger("service.registry")

READY, LOADING, FAILED = "ready", "loading", "failed"
ARCHIVE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,250}\.mar$")
ARCHIVE_STEM = re.compile(r"^(?P<name>.+)-v(?P<version>[0-9]+)$")


@dataclass(eq=False)
class ModelEntry:
    """One model version: an archive file and, once loaded, what serves it."""

    file: str
    path: Path
    name: str | None = None
    version: str | None = None
    status: str = LOADING
    error: str | None = None
    card: ModelCard | None = None
    runner: ModelRunner | None = None
    preprocessor: Preprocessor | None = None
    batcher: Batcher | None = None
    # DECODE_ON_FORWARD_THREAD: uploads go to the batcher undecoded, its forward threads decode
    decode_on_forward_thread: bool = False
    # DECODE_ON_GPU: uploads go to the batcher undecoded, decoded and preprocessed on the device
    gpu_preprocessor: GpuPreprocessor | None = None
    device: str | None = None
    load_seconds: float | None = None
    metrics: Metrics | None = field(default=None, repr=False)
    preprocess_histogram: Any = field(default=None, repr=False)
    _explainer: Any = field(default=None, repr=False)
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ready(self) -> bool:
        return self.status == READY and self.batcher is not None and not self.batcher.closed

    @property
    def created(self) -> str:
        return self.card.created if self.card is not None else ""

    @property
    def model(self) -> torch.nn.Module:
        """The served network (on its device, eval mode); for explanations."""
        if self.runner is None:
            raise Unavailable(f"{self.label} is not loaded")
        return self.runner.model

    @property
    def label(self) -> str:
        if self.name and self.version:
            return f"model {self.name!r} version {self.version}"
        return f"archive {self.file!r}"

    def explainer(self) -> Any:
        """The Grad-CAM explainer of this version, built on first use (its own fp32 copy)."""
        with self._explainer_lock:
            if self._explainer is None:
                from .explain import GradCamExplainer

                card = self.card
                if card is None or self.runner is None:
                    raise Unavailable(f"{self.label} is not loaded")
                self._explainer = GradCamExplainer(self.runner.model, temperature=card.temperature)
            return self._explainer

    def info(self, *, default: bool) -> dict[str, Any]:
        """The entry as ``GET /models`` shows it (unreadable fields are null)."""
        card = self.card
        return {
            "name": self.name,
            "version": self.version,
            "arch": card.arch if card else None,
            "num_classes": card.num_classes if card else None,
            "labels": list(card.labels) if card else None,
            "input_size": list(card.input_size) if card else None,
            "default": default,
            "status": self.status,
            "error": self.error,
            "metrics": dict(card.metrics) if card else None,
            "file": self.file,
            "device": self.device,
            "precision": self.runner.precision_name if self.runner else None,
            "created": card.created if card else None,
            "sha256": card.weights_sha256 if card else None,
            "load_seconds": self.load_seconds,
        }


def _version_key(entry: ModelEntry) -> tuple[int, str]:
    version = entry.version or ""
    return (int(version) if version.isdigit() else -1, entry.file)


class Registry:
    """All model versions of the service, keyed by archive file name."""

    def __init__(
        self, settings: Settings, metrics: Metrics, siblings: ForwardBoard | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.siblings = siblings  # with WORKERS: which sibling processes compute
        self.store = Path(settings.model_store)
        self.device = settings.torch_device
        self._entries: dict[str, ModelEntry] = {}
        self._default_versions: dict[str, str] = {}
        self._lock = threading.RLock()
        self._manage = asyncio.Lock()  # one management operation at a time
        self.started = False  # the start-up scan has listed the store
        self.closing = False  # shutting down: no further archive is loaded
        # called (in the loading thread) with each entry just before it starts serving; the
        # explicit hook for instrumentation and tests' fault injection (wrap batcher.forward_fn)
        self.on_ready: list[Callable[[ModelEntry], None]] = []
        self.scan_error: str | None = None

    # -- reading -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.name or e.file, _version_key(e)))

    def versions_of(self, name: str) -> list[ModelEntry]:
        return [e for e in self.entries() if e.name == name]

    def find(self, name: str, version: str) -> ModelEntry | None:
        for entry in self.versions_of(name):
            if entry.version == version:
                return entry
        return None

    def default_model_name(self) -> str | None:
        """``DEFAULT_MODEL``, else the newest model with a ready (else loading) version."""
        if self.settings.default_model:
            return self.settings.default_model
        entries = [e for e in self.entries() if e.name and e.card is not None]
        for wanted in (READY, LOADING, FAILED):
            candidates = [e for e in entries if e.status == wanted]
            if candidates:
                newest = max(candidates, key=lambda e: (e.created, _version_key(e)))
                return newest.name
        return None

    def default_version(self, name: str) -> str | None:
        """The version set with PUT /models/{name}/default, else the newest ready one."""
        versions = self.versions_of(name)
        chosen = self._default_versions.get(name)
        if chosen is not None and any(e.version == chosen for e in versions):
            return chosen
        for wanted in (READY, LOADING, FAILED):
            candidates = [e for e in versions if e.status == wanted]
            if candidates:
                return max(candidates, key=_version_key).version
        return None

    def is_default(self, entry: ModelEntry) -> bool:
        return (
            entry.name is not None
            and entry.name == self.default_model_name()
            and entry.version == self.default_version(entry.name)
        )

    def resolve(self, model: str | None = None, version: str | None = None) -> ModelEntry:
        """The entry that answers ``?model=&version=``; 404 unknown, 503 not ready."""
        name = model or self.default_model_name()
        if name is None:
            raise Unavailable(f"no model is ready: {self.readiness()[1]}")
        versions = self.versions_of(name)
        if not versions:
            if model is None:
                raise Unavailable(
                    f"no model is ready: the default model {name!r} is not in the model store"
                )
            known = sorted({e.name for e in self.entries() if e.name})
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(known) or 'none'}")
        wanted = version or self.default_version(name)
        entry = next((e for e in versions if e.version == wanted), None)
        if entry is None:
            known = ", ".join(e.version for e in versions if e.version) or "none"
            raise NotFound(f"model {name!r} has no version {version!r}; versions: {known}")
        if entry.status == LOADING:
            raise Unavailable(f"{entry.label} is still loading; retry shortly")
        if entry.status == FAILED:
            raise Unavailable(f"{entry.label} failed to load: {entry.error}")
        if not entry.ready:
            raise Unavailable(f"{entry.label} is being unloaded; retry")
        return entry

    def readiness(self) -> tuple[bool, str]:
        """(ready?, why): ready when the default model's default version is warmed up."""
        if not self.started:
            return False, "the service is starting: listing the model store"
        if self.scan_error:
            return False, self.scan_error
        entries = self.entries()
        if not entries:
            return False, self._why_no_entries()
        name = self.default_model_name()
        if name is None:
            reasons = "; ".join(f"{e.file}: {e.error}" for e in entries if e.error)
            return False, f"no model could be loaded ({reasons})"
        try:
            entry = self.resolve(name)
        except (Unavailable, NotFound) as exc:
            return False, exc.detail
        return True, f"default model {entry.name!r} version {entry.version} is ready"

    def _why_no_entries(self) -> str:
        # the store may hold archives that were all unloaded, or that MODELS leaves out: saying
        # "no archives" then sends an operator looking for files that are there
        try:
            on_disk = list_archives(self.store)
        except OSError as exc:
            return f"cannot list MODEL_STORE {self.store}: {exc}"
        if not on_disk:
            return f"no model archives (*.mar) in MODEL_STORE ({self.store})"
        there = f"the {len(on_disk)} archive(s) in MODEL_STORE ({self.store})"
        if self.settings.admin_api_key is None:  # no management: nothing was unloaded
            return f"no model is registered: {there} are not in MODELS"
        return (
            f"no model is registered: {there} were unloaded or are not in MODELS; "
            "register one with POST /models"
        )

    def models_payload(self) -> dict[str, Any]:
        default_name = self.default_model_name()
        default_versions = {}
        models = []
        for entry in self.entries():
            if entry.name is not None and entry.name not in default_versions:
                default_versions[entry.name] = self.default_version(entry.name)
            default_version = default_versions.get(entry.name or "")
            is_default = entry.name == default_name and entry.version == default_version
            models.append(entry.info(default=is_default))
        ready, why = self.readiness()
        return {"models": models, "default_model": default_name, "detail": None if ready else why}

    def model_payload(self, name: str) -> dict[str, Any]:
        versions = self.versions_of(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}")
        default_version = self.default_version(name)
        is_default_model = name == self.default_model_name()
        return {
            "name": name,
            "default_version": default_version,
            "versions": [
                e.info(default=is_default_model and e.version == default_version) for e in versions
            ],
        }

    # -- loading -----------------------------------------------------------------------------

    def scan(self) -> list[ModelEntry]:
        """List the store (cheap: cards only) and add an entry per archive, status loading."""
        try:
            if not self.store.is_dir():
                self.scan_error = f"MODEL_STORE {self.store} is not a directory"
                return []
            paths = list_archives(self.store)
        except OSError as exc:
            self.scan_error = f"cannot list MODEL_STORE {self.store}: {exc}"
            return []
        finally:
            self.started = True
        wanted = set(self.settings.models)
        added = []
        for path in paths:
            entry = self._placeholder(path)
            if wanted and path.name not in wanted and entry.name not in wanted:
                continue
            added.append(self._add(entry))
        # DEFAULT_MODEL first, then the newest: the default is ready as early as possible
        default = self.settings.default_model
        added.sort(key=lambda e: (e.name == default, e.created), reverse=True)
        return added

    def load_all(self, entries: Iterable[ModelEntry]) -> None:
        for entry in entries:
            if self.closing:
                self._failed(entry, "the service shut down before this archive was loaded")
            elif entry.status == LOADING:
                self.load_entry(entry)
        self.settle_heap("model store loaded")

    def settle_heap(self, reason: str) -> None:
        """After the loaded models changed: keep the collector off what now lives long."""
        if self.settings.gc_freeze:
            heap.settle(reason)

    def _placeholder(self, path: Path) -> ModelEntry:
        entry = ModelEntry(file=path.name, path=path, metrics=self.metrics)
        try:
            card = read_card(path)
        except ArchiveError as exc:
            match = ARCHIVE_STEM.match(path.stem)
            entry.name, entry.version = (
                (match["name"], match["version"]) if match else (path.stem, None)
            )
            entry.status, entry.error = FAILED, str(exc)
            return entry
        entry.card, entry.name, entry.version = card, card.name, str(card.version)
        return entry

    def _add(self, entry: ModelEntry) -> ModelEntry:
        with self._lock:
            if entry.status == LOADING:
                for other in self._entries.values():
                    if (
                        other.file != entry.file
                        and other.status != FAILED
                        and (other.name, other.version) == (entry.name, entry.version)
                    ):
                        entry.status = FAILED
                        entry.error = (
                            f"duplicate of {other.file}: {entry.name} version {entry.version} "
                            "is already registered"
                        )
            self._entries[entry.file] = entry
        return entry

    def load_entry(self, entry: ModelEntry) -> None:
        """Read, verify, rebuild, warm up and start serving one archive (blocking)."""
        settings = self.settings
        start = time.perf_counter()
        try:
            archive = read_archive(entry.path)
            card = archive.card
            if (card.name, str(card.version)) != (entry.name, entry.version):
                raise ArchiveError("the archive changed while it was being registered")
            model = load_model(archive)
            del archive
            runner = ModelRunner(
                model, card, device=self.device, precision=settings.precision,
                channels_last=settings.channels_last, fold_batchnorm=settings.fold_batchnorm,
                torchscript=use_torchscript(
                    settings.torchscript, card.input_size, torch.device(self.device).type
                ),
                max_batch_size=settings.max_batch_size,
            )  # fmt: skip
            if settings.warmup == "all":
                runner.warmup(runner.warmup_sizes())
            preprocessor = Preprocessor(card, max_pixels=settings.max_image_pixels)
            _warm_preprocessor(preprocessor)
            gpu_preprocessor = _device_preprocessor(settings.decode_on_gpu, preprocessor, runner)
            finish = gpu_preprocessor.batch if gpu_preprocessor else preprocessor.batch
            mv = (card.name, str(card.version))
            lone = settings.threads  # on a GPU the forward's CPU side needs no more
            if runner.device.type == "cpu":
                # every usable core, also with WORKERS: a lone image goes wide only while
                # the sibling processes compute nothing (Batcher._alone)
                lone = lone_image_threads(
                    settings.lone_image_threads, max(settings.threads, available_cpus()),
                    settings.threads, card.input_size,
                )  # fmt: skip
            batcher = Batcher(
                runner.forward, stack_fn=runner.stack, finish_fn=finish,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue, max_delay_s=settings.max_batch_delay_ms / 1000,
                name=f"{card.name}-v{card.version}", labels=card.labels,
                metrics=self.metrics, metric_labels=mv, workers=settings.forward_workers,
                helper_backlog=settings.helper_backlog, threads=settings.threads,
                lone_threads=lone, lone_example=torch.zeros(runner.input_shape),
                siblings=self.siblings,
            )  # fmt: skip
            batcher.start()
            decodes_on_forward_thread = decode_on_forward_thread(
                settings.decode_on_forward_thread, card.input_size, runner.device.type,
                batcher.workers, settings.process_cpus,
            )  # fmt: skip
        except ArchiveError as exc:
            self._failed(entry, str(exc))
            return
        except Exception as exc:  # a bug or an environment problem: still only this entry
            log.exception("loading %s failed", entry.file)
            self._failed(entry, f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - start
        with self._lock:
            entry.card, entry.runner, entry.preprocessor = card, runner, preprocessor
            entry.device, entry.load_seconds = str(runner.device), round(elapsed, 3)
            entry.batcher = batcher
            entry.decode_on_forward_thread = decodes_on_forward_thread
            entry.gpu_preprocessor = gpu_preprocessor
            entry.preprocess_histogram = self.metrics.preprocess.labels(*mv)
        for hook in self.on_ready:
            hook(entry)
        with self._lock:
            entry.status, entry.error = READY, None
        self.metrics.model_loaded(*mv)
        self.metrics.model_load.labels(*mv).set(elapsed)
        info = (*mv, card.arch, str(runner.device), card.weights_sha256)
        self.metrics.model_info.labels(*info).set(1)
        log.info("loaded %s (%s on %s, %s) in %.2f s", entry.label, card.arch, runner.device,
                 runner.precision_name, elapsed)  # fmt: skip

    def _failed(self, entry: ModelEntry, error: str) -> None:
        with self._lock:
            entry.status, entry.error = FAILED, error
        log.warning("cannot load %s: %s", entry.file, error)

    # -- management (event loop; blocking work in threads) -------------------------------------

    def archive_path(self, file: str) -> Path:
        """The path of ``file`` inside the store; 422 for anything but a plain .mar file name."""
        if not isinstance(file, str) or not ARCHIVE_FILE.fullmatch(file) or ".." in file:
            raise InvalidRequest(
                "file must be the name of a .mar archive inside MODEL_STORE "
                "(letters, digits, _ . -; no path, no URL)"
            )
        store = self.store.resolve()
        path = (store / file).resolve()
        if path.parent != store:
            raise InvalidRequest("file must be inside MODEL_STORE")
        if not path.is_file():
            raise NotFound(f"no archive {file!r} in the model store")
        return path

    def registered(self, file: str) -> ModelEntry | None:
        """The loaded or loading (not failed) entry of archive ``file``, if any."""
        entry = self._entries.get(file)
        return entry if entry is not None and entry.status != FAILED else None

    async def register(self, file: str) -> ModelEntry:
        """Load ``file`` (already in the store) and start serving it once warmed up."""
        path = self.archive_path(file)
        async with self._manage:
            existing = self.registered(path.name)
            if existing is not None:
                raise Conflict(f"{path.name} is already registered ({existing.status})")
            entry = await asyncio.to_thread(self._placeholder, path)
            if entry.status == FAILED:
                self._add(entry)
                return entry
            if self._entries.get(path.name) is not None:
                with self._lock:
                    del self._entries[path.name]
            clash = self.find(entry.name or "", entry.version or "")
            if clash is not None and clash.status != FAILED:
                raise Conflict(
                    f"{entry.name} version {entry.version} is already registered from {clash.file}"
                )
            self._add(entry)
            await asyncio.to_thread(self.load_entry, entry)
            await asyncio.to_thread(self.settle_heap, f"{entry.label} registered")
            return entry

    async def unregister(self, name: str, version: str) -> None:
        """Stop routing to a version, let its queued requests finish, then free it."""
        async with self._manage:
            entry = self.find(name, version)
            if entry is None:
                raise NotFound(f"model {name!r} has no version {version!r}")
            with self._lock:
                self._entries.pop(entry.file, None)
                if self._default_versions.get(name) == version:
                    del self._default_versions[name]
            await asyncio.to_thread(self._dispose, entry)
            label = entry.label
            del entry  # the collection below should find the version's cycles unreferenced
            await asyncio.to_thread(self.settle_heap, f"{label} unloaded")

    def set_default_version(self, name: str, version: str) -> None:
        entry = self.find(name, version)
        if not self.versions_of(name):
            raise NotFound(f"unknown model {name!r}")
        if entry is None:
            raise NotFound(f"model {name!r} has no version {version!r}")
        if not entry.ready:
            raise Conflict(f"{entry.label} is {entry.status}, not ready; it cannot be the default")
        with self._lock:
            self._default_versions[name] = version

    def _dispose(self, entry: ModelEntry) -> None:
        if entry.batcher is not None:
            drained = entry.batcher.close(timeout=self.settings.request_timeout_s + 5)
            if not drained:
                log.warning("%s: worker still busy after the drain timeout", entry.label)
        if entry.name and entry.version:
            self.metrics.forget_model(entry.name, entry.version)
        # requests still holding the entry finish with it; the memory goes with the last one
        entry.status = "unloaded"
        entry._explainer = None

    def close(self) -> None:
        """Drain every batcher (blocking): queued requests finish, then the workers stop."""
        for entry in self.entries():
            if entry.batcher is not None:
                entry.batcher.close(timeout=self.settings.request_timeout_s + 5)


def _device_preprocessor(
    mode: str, preprocessor: Preprocessor, runner: ModelRunner
) -> GpuPreprocessor | None:
    """``DECODE_ON_GPU``: a warmed-up ``GpuPreprocessor`` on the runner's device (auto: CUDA
    only), or None when off or when decoding there fails its warm-up (the CPU decodes then)."""
    if mode == "off" or (mode == "auto" and runner.device.type != "cuda"):
        return None
    try:
        gpu_preprocessor = GpuPreprocessor(preprocessor, runner.device)
        gpu_preprocessor.warm_up()
    except Exception:  # a torchvision without nvjpeg, say: serve with CPU decoding
        log.warning("decoding on %s failed its warm-up; the CPU decodes instead", runner.device,
                    exc_info=True)  # fmt: skip
        return None
    return gpu_preprocessor


def _warm_preprocessor(preprocessor: Preprocessor) -> None:
    """Decode + preprocess one small PNG, alone and as a batch, so the first request pays no
    import, kernel or TorchScript compilation cost."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (120, 60, 30)).save(buffer, format="PNG")
    try:
        preprocessor(buffer.getvalue())
        decoded = preprocessor.decode_array(buffer.getvalue())
        for _ in range(2):  # compiles the batch preset, then runs it as compiled
            preprocessor.batch([decoded])
    except Exception:  # a warm-up only: a decoder problem shows on real requests
        log.warning("preprocessing warm-up failed", exc_info=True)
