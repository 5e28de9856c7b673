"""Model archives: TorchServe-compatible ``.mar`` files with a model card.

Layout of ``<name>-v<version>.mar`` (a zip):

- ``MAR-INF/MANIFEST.json``  TorchServe's manifest (model name/version, handler, serialized file)
- ``model-card.json``        everything needed to rebuild and preprocess: see ``ModelCard``
- ``weights.pt``             the state dict, loadable with ``torch.load(..., weights_only=True)``
- ``handler.py`` + ``mar_code/``  code for TorchServe only; our service never imports or runs it

Readers verify the weights' SHA-256 against the card and never unpickle anything but tensors.
Writers go through a temporary file and ``os.replace`` so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .data.presets import PreprocessSpec
from .errors import TrainerError

FORMAT_VERSION = 1
CARD_NAME = "model-card.json"
WEIGHTS_NAME = "weights.pt"
MANIFEST_NAME = "MAR-INF/MANIFEST.json"
HANDLER_NAME = "handler.py"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[0-9]{1,9}$")
MAX_MEMBER_BYTES = 2 * 1024**3  # refuse zip members that claim to unpack larger than this
MAX_CARD_BYTES = 8 * 1024**2


class ArchiveError(TrainerError):
    """An archive that is unreadable, inconsistent or unsafe; the message says why."""


@dataclass(kw_only=True)
class ModelCard:
    """Everything the service needs to rebuild, preprocess and describe a model version."""

    name: str
    version: str
    arch: str
    num_classes: int
    labels: list[str]
    in_chans: int
    small_input: bool
    grayscale_policy: str  # "native" (1-channel stem), "replicate" (L -> RGB) or "none" (RGB data)
    preprocess: dict[str, Any]  # PreprocessSpec.to_dict()
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)  # headline test metrics
    dataset: dict[str, Any] = field(default_factory=dict)  # name, split sizes, class counts
    training_config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    torch_version: str = ""
    torchvision_version: str = ""
    weights_file: str = WEIGHTS_NAME
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess_spec.input_size

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def validate(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ArchiveError(f"invalid model name {self.name!r} (letters, digits, _ . -)")
        if not VERSION_PATTERN.match(str(self.version)):
            raise ArchiveError(f"invalid version {self.version!r} (a positive integer)")
        if self.num_classes < 2 or len(self.labels) != self.num_classes:
            raise ArchiveError(
                f"card has {len(self.labels)} labels for num_classes={self.num_classes}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ArchiveError("card labels are not unique")
        if self.in_chans not in (1, 3):
            raise ArchiveError(f"in_chans must be 1 or 3, not {self.in_chans}")
        try:
            spec = PreprocessSpec.from_dict(self.preprocess)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchiveError(f"card preprocess section is invalid: {exc}") from exc
        if spec.channels != self.in_chans:
            raise ArchiveError(
                f"preprocess gives {spec.channels} channels, model takes {self.in_chans}"
            )
        if not (0.01 <= float(self.temperature) <= 100.0):
            raise ArchiveError(f"temperature {self.temperature} out of range")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArchiveError(f"model card is missing fields: {exc}") from exc


@dataclass
class LoadedArchive:
    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive_filename(name: str, version: str) -> str:
    return f"{name}-v{version}.mar"


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def _manifest(card: ModelCard) -> dict[str, Any]:
    return {
        "createdOn": card.created,
        "runtime": "python",
        "model": {
            "modelName": card.name,
            "serializedFile": card.weights_file,
            "handler": HANDLER_NAME,
            "modelVersion": f"{card.version}.0",
        },
        "archiverVersion": "0.12.0",
    }


def _torchserve_sources() -> dict[str, bytes]:
    """Files TorchServe needs to run the archive: our handler plus the model/preset code."""
    root = Path(__file__).parent
    files = {HANDLER_NAME: (root / "torchserve_handler.py").read_bytes()}
    files["mar_code/__init__.py"] = b""
    files["mar_code/presets.py"] = (root / "data" / "presets.py").read_bytes()
    for source in sorted((root / "models").glob("*.py")):
        if source.name != "pretrained.py":  # training-only (imports trainer.errors)
            files[f"mar_code/models/{source.name}"] = source.read_bytes()
    return files


def write_archive(
    card: ModelCard, state_dict: dict[str, torch.Tensor], store: str | os.PathLike[str]
) -> Path:
    """Write ``card`` + weights atomically as ``<store>/<name>-v<version>.mar``."""
    store_path = Path(store)
    store_path.mkdir(parents=True, exist_ok=True)
    weights = serialize_state_dict(state_dict)
    card.weights_file = WEIGHTS_NAME
    card.weights_sha256 = sha256_bytes(weights)
    card.created = card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    card.validate()
    target = store_path / archive_filename(card.name, card.version)
    if target.exists():
        raise ArchiveError(f"{target} already exists; archives are immutable, pick a new version")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=store_path)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST_NAME, json.dumps(_manifest(card), indent=2))
            zf.writestr(CARD_NAME, json.dumps(card.to_dict(), indent=2))
            zf.writestr(WEIGHTS_NAME, weights, compress_type=zipfile.ZIP_STORED)
            for member, content in _torchserve_sources().items():
                zf.writestr(member, content)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; servers often run as another user
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _read_member(zf: zipfile.ZipFile, member: str, limit: int) -> bytes:
    try:
        info = zf.getinfo(member)
    except KeyError as exc:
        raise ArchiveError(f"archive has no {member}") from exc
    if info.file_size > limit:
        raise ArchiveError(f"{member} is {info.file_size} bytes unpacked (limit {limit})")
    return zf.read(info)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate only the model card (cheap: used to list a model store)."""
    try:
        with zipfile.ZipFile(path) as zf:
            raw = _read_member(zf, CARD_NAME, MAX_CARD_BYTES)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{Path(path).name} is not a readable .mar archive ({exc})") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ArchiveError(f"model card is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArchiveError("model card is not a JSON object")
    return ModelCard.from_dict(data)


def read_archive(path: str | os.PathLike[str]) -> LoadedArchive:
    """Read the card and the weights, verify the SHA-256, load tensors only (no pickled code)."""
    card = read_card(path)
    try:
        with zipfile.ZipFile(path) as zf:
            weights = _read_member(zf, card.weights_file, MAX_MEMBER_BYTES)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"cannot read weights from {Path(path).name}: {exc}") from exc
    digest = sha256_bytes(weights)
    if digest != card.weights_sha256:
        raise ArchiveError(
            f"weights SHA-256 {digest[:12]}... does not match the card's "
            f"{str(card.weights_sha256)[:12]}..."
        )
    try:
        state_dict = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with an UnpicklingError
        raise ArchiveError(f"weights are not a plain tensor state dict: {exc}") from exc
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ArchiveError("weights file is not a state dict of tensors")
    return LoadedArchive(card=card, state_dict=state_dict, path=Path(path))


def list_archives(store: str | os.PathLike[str]) -> list[Path]:
    store_path = Path(store)
    if not store_path.is_dir():
        return []
    return sorted(p for p in store_path.glob("*.mar") if p.is_file())


def next_version(store: str | os.PathLike[str], name: str) -> str:
    """One more than the highest version of ``name`` in ``store`` (unreadable archives skipped)."""
    versions = []
    for path in list_archives(store):
        try:
            card = read_card(path)
        except ArchiveError:
            continue
        if card.name == name:
            versions.append(int(card.version))
    return str(max(versions, default=0) + 1)


def load_model(archive: LoadedArchive) -> torch.nn.Module:
    """Rebuild the network from the card with our own code and load the verified weights."""
    from .models import build_model

    card = archive.card
    try:
        model = build_model(
            card.arch,
            num_classes=card.num_classes,
            in_chans=card.in_chans,
            small_input=card.small_input,
        )
    except KeyError as exc:
        raise ArchiveError(f"card names unknown architecture {card.arch!r}") from exc
    try:
        model.load_state_dict(archive.state_dict, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ArchiveError(f"weights do not fit {card.arch}: {first_line}") from exc
    return model.eval()
