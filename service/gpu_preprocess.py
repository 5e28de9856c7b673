"""Decoding and preprocessing on the GPU: what feeds a CUDA model version (``DECODE_ON_GPU``).

Why: on a GPU the forward is cheap and the CPU's per-image Python is the limit. On an H200
with 16 cores (``bench/gpu_check.sh``, 2026-12-04) ResNet-50 in bf16 ran 12,729 img/s on
batches already on the GPU, while decoding and preprocessing the 64 reference JPEGs on the
CPU (Pillow/libjpeg-turbo + the card's preset) reached 327 img/s on one thread and no more
than 1,123 on 4, 8 or 16: the preset's tensor work holds the GIL between kernels, so threads
stop helping. nvjpeg (``torchvision.io.decode_jpeg`` on a CUDA device) decoded and resized
the same files at 10,594 img/s from one thread. The service then served 526 img/s at best.

How: the forward thread that takes a batch reads each upload's header on the CPU with the
same checks as a CPU decode (``imaging.check_or_decode``: signature, pixel cap, EXIF
orientation), decodes every JPEG of the batch in one nvjpeg call, applies the orientation,
and runs the card's ``EvalPreset`` kernels on the GPU (resize, crop, scale, normalise). Images
that are not baseline/progressive L or RGB JPEGs (PNG, WebP, CMYK JPEGs, ...) are decoded on
the CPU by the usual path and only preprocessed on the GPU. nvjpeg refuses a whole batch when
one file is corrupt; then each image is decoded alone, and one that neither nvjpeg nor the CPU
decoder can read gets the CPU decoder's verdict (a 400 naming it), the others go on.

The pixels differ slightly from a CPU decode: a large JPEG is decoded at full scale here,
where the CPU asks libjpeg for a reduced scale (``Image.draft``) first, and nvjpeg's IDCT
and colour conversion are not libjpeg-turbo's (tests/service/test_gpu_preprocess.py bounds
the difference).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .batching import ItemsRejected
from .imaging import ImageRejected, UndecodedJpeg, array_to_tensor, orient
from .inference import Preprocessor

try:  # deprecated in torchvision 0.29 (TorchCodec replaces it): no GPU decoding without it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - torchvision without its image codecs
    ImageReadMode = None  # type: ignore[assignment,misc]
    decode_jpeg = None  # type: ignore[assignment]


class GpuPreprocessor:
    """Uploads -> the model's float input batch ``[N, C, H, W]`` on ``device``."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device | str) -> None:
        if decode_jpeg is None:
            raise RuntimeError("this torchvision has no decode_jpeg (image codecs missing)")
        self.preprocessor = preprocessor
        self.device = torch.device(device)
        self.color_mode = preprocessor.spec.color_mode
        self.read_mode = ImageReadMode.GRAY if self.color_mode == "L" else ImageReadMode.RGB

    def check(self, data: bytes, name: str = "the image") -> UndecodedJpeg | np.ndarray:
        """The CPU's share of one upload: a checked, undecoded JPEG, or another image decoded
        (raises ``ImageRejected`` as a CPU decode does)."""
        return self.preprocessor.check_or_decode(data, name)

    def batch(self, items: Sequence[UndecodedJpeg | np.ndarray]) -> torch.Tensor:
        """What ``check`` returned for a batch's images -> their input rows on the device.

        Raises ``ItemsRejected`` (with the others' rows) when some JPEGs cannot be decoded.
        """
        images: list[torch.Tensor | None] = [None] * len(items)
        errors: dict[int, BaseException] = {}
        jpegs = [i for i, item in enumerate(items) if isinstance(item, UndecodedJpeg)]
        if jpegs:
            try:
                decoded = self._decode([items[i] for i in jpegs])  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - one bad file fails nvjpeg's whole batch
                decoded = None
            if decoded is not None:
                for i, image in zip(jpegs, decoded, strict=True):
                    images[i] = image
            else:
                for i in jpegs:
                    try:
                        images[i] = self._decode_alone(items[i])  # type: ignore[arg-type]
                    except ImageRejected as exc:
                        errors[i] = exc
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                images[i] = array_to_tensor(item).to(self.device)
        rows = [image for image in images if image is not None]
        batch = self._preprocess(rows) if rows else None
        if errors:
            raise ItemsRejected(errors, batch)
        assert batch is not None  # noqa: S101 - no errors: every item has a row
        return batch

    def _decode(self, jpegs: Sequence[UndecodedJpeg]) -> list[torch.Tensor]:
        """One nvjpeg call for the batch's JPEGs, each turned by its EXIF orientation."""
        datas = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
        decoded = decode_jpeg(datas, mode=self.read_mode, device=self.device)
        return [orient(image, jpeg.orientation) for image, jpeg in zip(decoded, jpegs, strict=True)]

    def _decode_alone(self, jpeg: UndecodedJpeg) -> torch.Tensor:
        """nvjpeg for this file alone, else the CPU's decoder, whose error is the verdict."""
        try:
            return self._decode([jpeg])[0]
        except Exception:  # noqa: BLE001 - corrupt, or a JPEG nvjpeg does not handle
            pass
        try:
            array = self.preprocessor.decode_array(jpeg.data)
        except ImageRejected as exc:
            raise ImageRejected(exc.status_code, f"{jpeg.name}: {exc.detail}") from None
        return array_to_tensor(array).to(self.device)

    def _preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The card's eval preset on the device: the rows of ``preset(image)``, stacked."""
        return self.preprocessor.preset.batch_tensors(images)

    def warm_up(self) -> None:
        """Decode and preprocess a small JPEG: the first request pays no nvjpeg or kernel
        start-up, and a device where nvjpeg does not work is found before serving."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (48, 40), (120, 60, 30)).save(buffer, format="JPEG")
        for _ in range(2):
            self.batch([self.check(buffer.getvalue())])
