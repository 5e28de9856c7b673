"""Safe decoding of untrusted image bytes into the model's uint8 ``[C, H, W]`` tensor.

Decisions (the HTTP contract in issue 3 and the hostile-input rules in issue 6):

- **Content decides.** ``sniff_format`` reads the magic bytes; the declared Content-Type and
  the file name are never looked at. Bytes with no supported signature -> 415. Bytes with a
  signature that Pillow cannot decode (truncated, corrupt, bad CRC) -> 400. Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False, so a truncated JPEG is a 400.
- **Pixel cap before allocation.** PNG, GIF and WebP sizes are read from the header bytes
  before Pillow sees the data (Pillow's WebP opener allocates the canvas while opening and its
  GIF opener may allocate the first frame's disposal area); for GIFs the logical screen (or the
  first frame's extent, if larger) counts. Every format is checked again on ``Image.open``'s
  lazy header read, before ``load()`` allocates pixels. Too many pixels -> 413.
- **Pillow's own bomb guard is a backstop, never mutated.** ``Image.MAX_IMAGE_PIXELS`` is
  process-wide; setting it per call would race between worker threads, so this module only
  reads it: the effective cap is ``min(max_pixels, Image.MAX_IMAGE_PIXELS)``. Pillow warns
  above that value and raises above twice it, so anything its guard reacts to is over our cap
  too, and ``DecompressionBombError`` and ``DecompressionBombWarning`` (an exception when
  warnings are errors, as in the tests) both become the same 413. Without an "error" warnings
  filter, the warning is only logged, once, and the image still gets 413 from our check.
  A deployment that wants more than Pillow's 89.5 megapixels raises ``Image.MAX_IMAGE_PIXELS``
  once at start-up.
- **Thread safety.** No global state is written; every call owns its ``BytesIO`` and image,
  and Pillow releases the GIL while decoding, so calls from a thread pool run in parallel.
- **First frame** of GIF, APNG, animated WebP, multi-page TIFF and MPO; **EXIF orientation**
  applied (``ImageOps.exif_transpose``; unreadable EXIF is ignored, not an error).
- **Modes.** ``trainer.data.pixels.to_color_mode``, the one rule the trainer also decodes
  image folders with, so a served model sees what it was trained on: transparency composited
  on **white**, 16-bit and 32-bit grayscale scaled (not clipped) to 8 bits, CMYK, YCbCr, HSV,
  LAB and 1-bit through Pillow's converters. Anything else -> 415.
- **Speed.** A JPEG stored in L or RGB is decoded by one ``simplejpeg.decode_jpeg`` call
  (libjpeg-turbo's TurboJPEG API, the GIL released once, no tensor made): at full scale, or,
  with ``target_size`` (the size the image is resized to next) and a file at least four times
  larger on both sides, by libjpeg's scaled IDCT at 1/2, 1/4 or 1/8, never below twice the
  target, at the very scale Pillow's ``Image.draft`` would pick; directly in grayscale for "L"
  models. The pixels are Pillow's (and torchvision's) bit for bit. On the 64 bench photos the
  reduced-scale decode takes 0.67 ms of CPU an image against Pillow's 0.87 (Pillow's decode
  loop holds the GIL between chunks), and the ResNet-20 service answered 7% more images a
  second with it; a full-scale decode takes 1.09 ms against 1.20 for torchvision's
  ``decode_jpeg`` (deprecated since torchvision 0.29), which decoded full-scale JPEGs before
  (bench/NOTES.md, 2026-12-04 and -05). The pixel cap and the EXIF orientation still come from
  Pillow's header read, so every path agrees; CMYK JPEGs, files simplejpeg fails on and
  platforms without simplejpeg are decoded (or judged) by Pillow. ``decode_image`` (a PIL
  image, for overlays) always uses Pillow.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.data.pixels import COLOR_MODES, to_color_mode

try:  # a declared dependency; without it (a platform with no wheel) Pillow decodes instead
    from simplejpeg import decode_jpeg as _sj_decode_jpeg
    from simplejpeg import decode_jpeg_header as _sj_decode_jpeg_header
except ImportError:  # pragma: no cover
    _sj_decode_jpeg = None  # type: ignore[assignment]
    _sj_decode_jpeg_header = None  # type: ignore[assignment]

FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED: Final = "JPEG, PNG, WebP, BMP, GIF or TIFF"
DRAFT_MARGIN: Final = 2  # a draft decode keeps at least this many times the target size

_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_SWAPPING_ORIENTATIONS: Final = frozenset({5, 6, 7, 8})  # EXIF orientations that transpose
# then flip: axis 0 = rows (H), 1 = columns (W), after the transpose
_EXIF_FLIPS: Final = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}
_GIF_SCAN_LIMIT: Final = 1 << 20  # header bytes scanned for the first GIF image descriptor


class ImageRejected(Exception):
    """The client sent bytes that are not a usable image; ``status_code`` is the HTTP answer.

    400 image signature but undecodable, 413 too many pixels, 415 not a supported image,
    422 empty. ``detail`` says why, without naming the part (the caller knows the index).
    """

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name ("JPEG", "PNG", ...) that the magic bytes announce, else None."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone is too weak (text can start with it): also ask for a known DIB header size
    if head[:2] == b"BM" and len(head) >= 18:
        (dib_size,) = struct.unpack_from("<I", head, 14)
        if dib_size in _BMP_HEADER_SIZES:
            return "BMP"
    return None


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    target_size: tuple[int, int] | None = None,
    draft_mode: str | None = None,
) -> Image.Image:
    """Untrusted bytes -> a loaded, EXIF-transposed first frame (any Pillow mode).

    ``target_size`` ``(H, W)`` (after EXIF orientation) lets a large JPEG decode at a reduced
    scale; ``draft_mode`` "L" also lets libjpeg produce grayscale directly.
    Raises ``ImageRejected`` (400, 413, 415, 422).
    """
    image, limit = _open_checked(data, max_pixels)
    return _finish(image, limit, target_size, draft_mode)


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, int]:
    """Sniff, check the header's size, open lazily: (unloaded image, effective pixel limit)."""
    if not data:
        raise ImageRejected(422, "empty image (zero bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(415, f"not a supported image: the bytes are not {ACCEPTED}")
    limit = effective_pixel_limit(max_pixels)
    _check_pixels(_header_size(data, fmt), limit)
    image = _open(data, fmt, limit)
    _check_pixels(image.size, limit)
    return image, limit


def _finish(
    image: Image.Image, limit: int, target_size: tuple[int, int] | None, draft_mode: str | None
) -> Image.Image:
    """Draft (JPEG), load the first frame, apply the EXIF orientation."""
    fmt = str(image.format)
    if _is_jpeg(image) and (target_size is not None or draft_mode == "L"):
        _draft(image, target_size, draft_mode)
    _load(image, fmt, limit)
    _apply_exif_orientation(image)
    return image


def convert_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """Any decoded image -> Pillow mode ``color_mode`` ("L" or "RGB"), transparency on white."""
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be 'L' or 'RGB', not {color_mode!r}")
    try:
        return to_color_mode(image, color_mode)
    except ValueError as exc:  # Pillow has no converter for this mode
        raise ImageRejected(415, f"unsupported pixel format {image.mode}: {exc}") from None


def to_array(image: Image.Image, color_mode: str) -> np.ndarray:
    """A decoded image -> a fresh uint8 ``[H, W, C]`` array: C=1 for "L", 3 for "RGB"."""
    array = np.array(convert_mode(image, color_mode), dtype=np.uint8)  # writable copy
    return array.reshape(*array.shape[:2], -1)


def to_tensor(image: Image.Image, color_mode: str) -> torch.Tensor:
    """A decoded image -> uint8 ``[C, H, W]``: C=1 for "L", 3 for "RGB".

    The result is a permuted view of a fresh H x W x C array (channels-last memory), which
    torchvision's uint8 resize handles on its fast path; ``.contiguous()`` it if needed.
    """
    return array_to_tensor(to_array(image, color_mode))


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A ``[H, W, C]`` array -> the uint8 ``[C, H, W]`` view of it (channels-last memory)."""
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_to_array(
    data: bytes,
    *,
    max_pixels: int,
    color_mode: str,
    target_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Untrusted bytes -> a contiguous uint8 ``[H, W, C]`` array in ``color_mode``; raises
    ``ImageRejected``.

    ``target_size`` ``(H, W)``: the size the image will be resized to next. A JPEG stored in
    L or RGB goes to simplejpeg (at a reduced scale when it is at least four times larger on
    both sides; same pixels as Pillow, faster); everything else, and any JPEG simplejpeg
    fails on, is decoded by Pillow.

    An array, not a tensor: every torch tensor made and freed from Python lets go of the GIL
    (a decode ending in a tensor view did 6 of its 8.6 hand-offs an image there, counted with
    a perf probe on ``PyEval_SaveThread``); the service's forward threads pack a batch's arrays
    into one tensor instead (``EvalPreset.batch``).
    """
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be 'L' or 'RGB', not {color_mode!r}")
    image, limit = _open_checked(data, max_pixels)
    return _decode_opened(data, image, limit, color_mode, target_size)


def _decode_opened(
    data: bytes,
    image: Image.Image,
    limit: int,
    color_mode: str,
    target_size: tuple[int, int] | None,
) -> np.ndarray:
    if _is_jpeg(image):
        array = _decode_jpeg(data, image, color_mode, target_size)
        if array is not None:
            return array
    return to_array(_finish(image, limit, target_size, color_mode), color_mode)


@dataclass(frozen=True, slots=True)
class UndecodedJpeg:
    """A JPEG whose header passed every check, left for a GPU's decoder (nvjpeg)."""

    data: bytes
    orientation: int  # EXIF, read by Pillow as for a CPU decode; applied after decoding
    name: str = "the image"  # how an error names it ("image 3" in a request of several)


def check_or_decode(
    data: bytes,
    *,
    max_pixels: int,
    color_mode: str,
    target_size: tuple[int, int] | None = None,
    name: str = "the image",
) -> UndecodedJpeg | np.ndarray:
    """``decode_to_array``, except that a baseline or progressive JPEG stored in L or RGB is
    only checked (signature, header, pixel cap) and returned undecoded with its EXIF
    orientation and ``name``, for ``service.gpu_preprocess``. Other images (PNG, CMYK JPEGs,
    ...) are decoded here. Raises ``ImageRejected`` as ``decode_to_array`` does."""
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be 'L' or 'RGB', not {color_mode!r}")
    image, limit = _open_checked(data, max_pixels)
    if _is_jpeg(image) and image.mode in ("L", "RGB") and _whole_up_to_first_scan(data):
        return UndecodedJpeg(bytes(data), _orientation(image), name)
    return _decode_opened(data, image, limit, color_mode, target_size)


def _whole_up_to_first_scan(data: bytes) -> bool:
    """Whether a JPEG is whole enough to leave to a GPU's decoder: every segment before the
    first scan fits its length, the frame's sampling factors are 1-4, each component of that
    scan has a quantisation table defined, and an end-of-image marker follows the scan.
    nvjpeg decoded a file whose frame names a quantisation table never defined, which libjpeg
    refuses (seen on an H200, 2026-12-04), and may not notice truncation; a file that fails
    here is decoded on the CPU and gets its decoder's verdict (a 400). The segments are
    skipped by their lengths, so an EXIF thumbnail's own markers do not count."""
    quant_tables: set[int] = set()
    frame: dict[int, int] | None = {}
    for marker, body, end in _segments_to_first_scan(data):
        if marker == 0xDB:
            tables = _quant_table_ids(body)
            if tables is None:
                return False
            quant_tables |= tables
        elif marker in _FRAME_MARKERS:
            frame = _frame_components(body)
            if frame is None:
                return False
        elif marker == 0xDA:
            count = body[0] if body else 0
            if count == 0 or len(body) < 1 + 2 * count or frame is None:
                return False
            components = [body[1 + 2 * k] for k in range(count)]
            if any(frame.get(c) not in quant_tables for c in components):
                return False
            return data.rfind(b"\xff\xd9", end) != -1
    return False


# start-of-frame markers (0xC4 DHT, 0xC8 JPG and 0xCC DAC share the range)
_FRAME_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _segments_to_first_scan(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(marker, body, end offset) of each JPEG segment up to and including the first scan's
    header; ends early, before any scan, at one whose length does not fit."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return
        pos += 2 + length
        yield marker, body, pos
        if marker == 0xDA:
            return


def _quant_table_ids(body: bytes) -> set[int] | None:
    """The ids a DQT segment defines (tables of 64 one- or two-byte entries); None: malformed."""
    ids, at = set(), 0
    while at < len(body):
        ids.add(body[at] & 0x0F)
        at += 1 + 64 * (2 if body[at] >> 4 else 1)
    return ids if at == len(body) else None


def _frame_components(body: bytes) -> dict[int, int] | None:
    """A frame header's component id -> quantisation table id; None: malformed, or sampling
    factors outside 1-4 (libjpeg: "Bogus sampling factors")."""
    count = body[5] if len(body) > 5 else 0
    if count == 0 or len(body) < 6 + 3 * count:
        return None
    sampling = [body[7 + 3 * k] for k in range(count)]
    if any(not (1 <= f >> 4 <= 4 and 1 <= f & 0x0F <= 4) for f in sampling):
        return None
    return {body[6 + 3 * k]: body[8 + 3 * k] for k in range(count)}


def decode_to_tensor(
    data: bytes,
    *,
    max_pixels: int,
    color_mode: str,
    target_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``decode_to_array`` as uint8 ``[C, H, W]`` (a view in channels-last memory)."""
    return array_to_tensor(
        decode_to_array(data, max_pixels=max_pixels, color_mode=color_mode, target_size=target_size)
    )


def effective_pixel_limit(max_pixels: int) -> int:
    """``max_pixels`` capped by Pillow's process-wide guard (read, never written)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pil_limit is None else min(max_pixels, int(pil_limit))


# ---------------------------------------------------------------------------------------------
# steps of decode_image
# ---------------------------------------------------------------------------------------------


def _check_pixels(size: tuple[int, int] | None, limit: int) -> None:
    if size is None:
        return
    width, height = size
    if width * height > limit:
        raise ImageRejected(
            413, f"image too large: {width}x{height} = {width * height} pixels, limit {limit}"
        )


def _open(data: bytes, fmt: str, limit: int) -> Image.Image:
    """Pillow's lazy open (header only), restricted to the sniffed format."""
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, f"image too large: over {limit} pixels ({exc})") from None
    except MemoryError:
        raise ImageRejected(413, "image too large to decode") from None
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object: useless
        raise ImageRejected(400, f"corrupt {fmt} image: unreadable header") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on client bytes is a 400
        raise ImageRejected(400, f"corrupt {fmt} image: {_reason(exc)}") from None


def _is_jpeg(image: Image.Image) -> bool:
    return image.format in ("JPEG", "MPO")


def _draft_request(target_size: tuple[int, int] | None, orientation: int) -> tuple[int, int] | None:
    """The (W, H) as stored (before EXIF ``orientation``) that a draft decode must not go
    below."""
    if target_size is None:
        return None
    height, width = target_size
    if orientation in _SWAPPING_ORIENTATIONS:  # the file is stored transposed
        height, width = width, height
    return max(1, width * DRAFT_MARGIN), max(1, height * DRAFT_MARGIN)


def _draft_scale(size: tuple[int, int], request: tuple[int, int] | None) -> int:
    """The libjpeg scale denominator Pillow's ``draft`` picks for ``request`` (1, 2, 4, 8)."""
    if request is None:
        return 1
    fits = min(size[0] // request[0], size[1] // request[1])
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


def _draft(image: Image.Image, target_size: tuple[int, int] | None, mode: str | None) -> None:
    """Ask libjpeg for a reduced scale (>= DRAFT_MARGIN x target) and/or grayscale output."""
    try:
        image.draft(mode if mode == "L" else None, _draft_request(target_size, _orientation(image)))
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(400, f"corrupt JPEG image: {_reason(exc)}") from None


def _decode_jpeg(
    data: bytes, header: Image.Image, color_mode: str, target_size: tuple[int, int] | None
) -> np.ndarray | None:
    """simplejpeg's libjpeg-turbo decode at the scale Pillow's draft would pick (1/1 when no
    reduced scale applies); None when simplejpeg is missing, the file is stored in another
    mode than L or RGB (CMYK: Pillow's conversion) or simplejpeg fails: Pillow decides.

    Pillow's draft + load decodes in chunks from a Python loop that takes the GIL back after
    each one; here the whole decode is one call, and no tensor is made (torchvision's
    ``decode_jpeg`` needed two and a copy). ``min_height``/``min_width`` of exactly the
    1/scale size make TurboJPEG pick that scale (the next smaller factor falls below them),
    and the same IDCT and colour conversion give Pillow's pixels bit for bit. The orientation
    is Pillow's reading (first EXIF APP1, XMP fallback), applied here, so every path agrees.
    """
    if _sj_decode_jpeg is None or header.mode not in ("L", "RGB"):
        return None
    orientation = _orientation(header)
    scale = _draft_scale(header.size, _draft_request(target_size, orientation))
    width, height = header.size
    try:
        if tuple(_sj_decode_jpeg_header(data)[:2]) != (height, width):
            return None  # libjpeg would read another frame than the one Pillow checked
        array = _sj_decode_jpeg(
            data, "GRAY" if color_mode == "L" else "RGB",
            min_height=-(-height // scale), min_width=-(-width // scale),
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - corrupt or unusual: Pillow decodes or gives the verdict
        return None
    return _orient_array(array, orientation)


def _orient_array(array: np.ndarray, orientation: int) -> np.ndarray:
    """``orient`` for an ``[H, W, C]`` array; a fresh contiguous result when it moved pixels."""
    if orientation in _SWAPPING_ORIENTATIONS:
        array = array.transpose(1, 0, 2)
    flips = _EXIF_FLIPS.get(orientation)
    return np.ascontiguousarray(np.flip(array, flips) if flips else array)


def orient(tensor: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to ``[C, H, W]``, as ``ImageOps.exif_transpose`` does."""
    if orientation in _SWAPPING_ORIENTATIONS:
        tensor = tensor.transpose(-1, -2)
    flips = _EXIF_FLIPS.get(orientation)
    return tensor.flip(tuple(axis - 2 for axis in flips)) if flips else tensor


def _load(image: Image.Image, fmt: str, limit: int) -> None:
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, f"image too large: over {limit} pixels ({exc})") from None
    except MemoryError:
        raise ImageRejected(413, "image too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - truncated data, bad CRC, libjpeg/libtiff errors
        raise ImageRejected(400, f"corrupt {fmt} image: {_reason(exc)}") from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: no rotation
        return 1


def _apply_exif_orientation(image: Image.Image) -> None:
    if _orientation(image) == 1:
        return
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001, S110 - corrupt EXIF: serve the pixels as stored
        return


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------
# header sizes read before Pillow opens the bytes
# ---------------------------------------------------------------------------------------------


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header for formats whose Pillow opener may allocate pixels."""
    if fmt == "PNG":
        return _png_size(data)
    if fmt == "GIF":
        return _gif_size(data)
    if fmt == "WEBP":
        return _webp_size(data)
    return None  # JPEG, BMP, TIFF: Image.open reads the header lazily, nothing allocated


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    return None


def _gif_size(data: bytes) -> tuple[int, int] | None:
    """The logical screen, grown to the first frame's extent as Pillow does."""
    if len(data) < 13:
        return None
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    end = min(len(data), _GIF_SCAN_LIMIT)
    while pos < end:
        block = data[pos]
        if block == 0x2C and pos + 9 <= len(data):  # image descriptor
            x0, y0, frame_w, frame_h = struct.unpack_from("<4H", data, pos + 1)
            return max(width, x0 + frame_w), max(height, y0 + frame_h)
        if block != 0x21:  # neither extension nor image: let Pillow judge
            break
        pos += 2  # introducer and label, then data sub-blocks up to a zero length
        while pos < end and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size of a simple (VP8, VP8L) or extended (VP8X) WebP file."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None
