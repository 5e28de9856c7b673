"""A generated corpus of good, broken and hostile uploads, shared by the service tests.

Everything is made in code (photos from scikit-learn's ``load_sample_images``), nothing is
read from disk. Expected statuses follow the HTTP contract (issue 3) with the default limits
(``MAX_IMAGE_PIXELS`` 50 megapixels, ``MAX_UPLOAD_BYTES`` 25 MiB): 200 accepted, 400 image
signature but undecodable, 413 too many pixels / images / bytes, 415 not an image or an
unsupported Content-Type, 422 empty or no ``file`` part.

- ``image_cases()``: decodable images, every format and mode the contract lists (status 200);
- ``broken_cases()``: non-images, corrupt images, polyglots and decompression bombs;
- ``raw_body_cases()``: both of those plus the Content-Type cases, for a raw request body;
- ``multipart_cases(max_images)``: whole multipart bodies (no ``file`` part, too many parts,
  malformed boundaries, empty parts, mixed good and bad parts);
- ``multipart_body(parts)``: build a multipart/form-data body and its Content-Type.

Each case is a ``Case(name, body, content_type, status)`` named tuple.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 50_000_000
BOUNDARY = "imgserve-hostile-7d3f"


class Case(NamedTuple):
    name: str
    body: bytes
    content_type: str | None
    status: int


class Part(NamedTuple):
    name: str
    data: bytes
    filename: str | None = "upload.bin"
    content_type: str | None = "application/octet-stream"


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


@cache
def photo(index: int = 0) -> np.ndarray:
    """One of scikit-learn's sample photos (china, flower): uint8 427 x 640 x 3."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[index % 2])


def photo_image(size: tuple[int, int] | None = None, index: int = 0) -> Image.Image:
    """The sample photo as an RGB PIL image, resized to ``size`` (W, H) when given."""
    image = Image.fromarray(photo(index))
    return image if size is None else image.resize(size, Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def zeros_zlib_stream(length: int, block: int = 1 << 20) -> bytes:
    """A valid zlib stream of ``length`` zero bytes, without compressing them all.

    Deflate output after a full flush does not refer back, so one compressed 1 MiB block of
    zeros is repeated; the Adler-32 of n zero bytes is ``(n % 65521) << 16 | 1``.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
    segment = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(length, block)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(bytes(rest)) + last.flush()  # ends with the final block
    adler = ((length % 65521) << 16) | 1
    return b"\x78\xda" + segment * count + tail + struct.pack(">I", adler)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit all-black PNG of width x height, small on disk (no big array made).

    Every raw byte is zero: filter type "none" and packed zero bits.
    """
    raw_length = height * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    idat = zeros_zlib_stream(raw_length)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))  # fmt: skip


def gif_with_screen(screen: tuple[int, int], frame_offset: tuple[int, int] = (0, 0)) -> bytes:
    """A 1x1 GIF whose logical screen is ``screen`` and whose frame sits at ``frame_offset``."""
    data = bytearray(encode(Image.new("P", (1, 1), 0), "GIF"))
    struct.pack_into("<HH", data, 6, *screen)
    descriptor = data.index(b"\x2c", 13)  # the first image descriptor (no extensions written)
    struct.pack_into("<HH", data, descriptor + 1, *frame_offset)
    return bytes(data)


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header claims width x height."""
    data = bytearray(encode(photo_image((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def tiff_with_size(width: int, height: int) -> bytes:
    """A hand-made 1-bit uncompressed TIFF header claiming width x height (one tiny strip)."""
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 1), (259, 3, 1, 1),
        (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, 1),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    offset = 8 + 1 + 1  # header, one strip byte, one pad byte
    return b"II*\x00" + struct.pack("<I", offset) + b"\x00\x00" + ifd


def webp_with_size(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header claims width x height (max 16384)."""
    data = bytearray(encode(Image.new("RGB", (4, 4), (9, 99, 199)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    (bits,) = struct.unpack_from("<I", data, 21)
    bits = (bits & ~0xFFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """64 wide x 32 high, left half white and right half black, stored with EXIF orientation.

    Orientation 6 ("rotate 90 degrees clockwise to display") shows a 32 x 64 image whose top
    half is white: the rotation can be checked from the pixels.
    """
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif)


def exif_rotated_photo(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo_image(), "JPEG", quality=90, exif=exif)


SIXTEEN_BIT_VALUES = np.array([[0, 257, 1000, 32896, 40000, 65535]], dtype=np.uint16)
SIXTEEN_BIT_EXPECTED = np.array([[0, 1, 4, 128, 156, 255]], dtype=np.uint8)  # round(v / 257)


def sixteen_bit_png() -> bytes:
    """A 6 x 1 16-bit grayscale PNG with the known values in ``SIXTEEN_BIT_VALUES``."""
    return encode(Image.fromarray(SIXTEEN_BIT_VALUES), "PNG")


def _gray(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return photo_image(size).convert("L")


def _with_alpha(image: Image.Image) -> Image.Image:
    alpha = np.zeros((image.height, image.width), np.uint8)
    alpha[:, image.width // 2 :] = 255  # left half fully transparent
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _palette_with_transparency() -> Image.Image:
    image = photo_image((96, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return image


def _animated_gif() -> bytes:
    first = Image.new("RGB", (32, 32), (250, 10, 10))
    second = Image.new("RGB", (32, 32), (10, 10, 250))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=50, loop=0)


def _multipage_tiff() -> bytes:
    first = Image.new("RGB", (32, 32), (250, 10, 10))
    second = Image.new("RGB", (48, 48), (10, 10, 250))
    return encode(first, "TIFF", save_all=True, append_images=[second])


def _apng() -> bytes:
    first = Image.new("RGBA", (32, 32), (250, 10, 10, 255))
    second = Image.new("RGBA", (32, 32), (10, 10, 250, 255))
    return encode(first, "PNG", save_all=True, append_images=[second], duration=50)


def _mode_image(mode: str) -> Image.Image:
    base = photo_image((96, 64))
    if mode in ("I;16", "I", "F"):
        values = np.asarray(base.convert("L"), np.float64) / 255.0
        if mode == "F":
            return Image.fromarray(values.astype(np.float32), mode="F")
        wide = np.rint(values * 65535).astype(np.uint16 if mode == "I;16" else np.int32)
        return Image.fromarray(wide)
    if mode == "PA":
        return _with_alpha(base).convert("PA")
    if mode in ("LA", "RGBA"):
        return _with_alpha(base).convert(mode)
    return base.convert(mode)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@cache
def image_cases() -> tuple[Case, ...]:
    """Decodable images: every supported format and every mode the contract lists (200)."""
    full = photo_image()
    small = photo_image((96, 64))
    made: list[tuple[str, bytes, str]] = [
        ("jpeg_photo", encode(full, "JPEG", quality=90), "image/jpeg"),
        ("jpeg_progressive", encode(full, "JPEG", progressive=True), "image/jpeg"),
        ("jpeg_gray", encode(_gray(), "JPEG"), "image/jpeg"),
        ("jpeg_cmyk", encode(small.convert("CMYK"), "JPEG"), "image/jpeg"),
        ("jpeg_exif_rotated_6", exif_rotated_jpeg(6), "image/jpeg"),
        ("jpeg_exif_rotated_photo", exif_rotated_photo(6), "image/jpeg"),
        ("jpeg_large_2400x1800", encode(photo_image((2400, 1800)), "JPEG"), "image/jpeg"),
        ("png_rgb", encode(small, "PNG"), "image/png"),
        ("png_sent_as_jpeg", encode(small, "PNG"), "image/jpeg"),
        ("png_octet_stream", encode(small, "PNG"), "application/octet-stream"),
        ("png_16bit_gray", sixteen_bit_png(), "image/png"),
        ("png_16bit_rgb", _sixteen_bit_rgb_png(), "image/png"),
        ("png_apng_first_frame", _apng(), "image/png"),
        ("png_1x1", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "image/png"),
        ("png_4000x50", encode(photo_image((4000, 50)), "PNG"), "image/png"),
        ("webp_lossy", encode(small, "WEBP", quality=80), "image/webp"),
        ("webp_lossless_alpha", encode(_with_alpha(small), "WEBP", lossless=True), "image/webp"),
        ("bmp_rgb", encode(small, "BMP"), "image/bmp"),
        ("bmp_palette", encode(small.convert("P"), "BMP"), "image/bmp"),
        ("bmp_1bit", encode(small.convert("1"), "BMP"), "image/bmp"),
        ("gif_palette", encode(small.convert("P"), "GIF"), "image/gif"),
        ("gif_transparent", encode(_palette_with_transparency(), "GIF"), "image/gif"),
        ("gif_animated_first_frame", _animated_gif(), "image/gif"),
        ("tiff_rgb_lzw", encode(small, "TIFF", compression="tiff_lzw"), "image/tiff"),
        ("tiff_multipage", _multipage_tiff(), "image/tiff"),
        ("tiff_cmyk", encode(small.convert("CMYK"), "TIFF"), "image/tiff"),
    ]
    for mode in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):  # PA: no format writes it
        made.append((f"png_mode_{mode}", encode(_mode_image(mode), "PNG"), "image/png"))
    made.append(("png_P_transparency", encode(_palette_with_transparency(), "PNG"), "image/png"))
    for mode in ("I;16", "I", "F", "CMYK", "LA", "RGBA"):
        made.append((f"tiff_mode_{mode}", encode(_mode_image(mode), "TIFF"), "image/tiff"))
    return tuple(Case(name, body, ctype, 200) for name, body, ctype in made)


def _sixteen_bit_rgb_png() -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot save one)."""
    rgb = np.asarray(photo_image((32, 16)), np.uint16) * 257  # 8-bit v -> 16-bit v * 257
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    ihdr = struct.pack(">IIBBBBB", 32, 16, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))  # fmt: skip


def _truncated_and_corrupt() -> list[Case]:
    jpeg = encode(photo_image(), "JPEG", quality=90)
    png = encode(photo_image((96, 64)), "PNG")
    bad_ihdr_crc = bytearray(png)
    bad_ihdr_crc[29] ^= 0xFF  # last byte of the IHDR CRC
    idat = png.index(b"IDAT")
    bad_idat_data = bytearray(png)
    bad_idat_data[idat + 40 : idat + 60] = bytes(20)  # zeroed compressed data, stale CRC
    no_sof = bytearray(jpeg)
    sof = no_sof.index(b"\xff\xc0")
    no_sof[sof : sof + 12] = b"\xff\xfe" + bytes(10)  # SOF replaced by a comment marker
    return [
        Case("jpeg_truncated_header", jpeg[:300], "image/jpeg", 400),
        Case("jpeg_truncated_half", jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        Case("jpeg_truncated_no_eoi", jpeg[:-10], "image/jpeg", 400),
        Case("jpeg_signature_only", b"\xff\xd8\xff", "image/jpeg", 400),
        Case("jpeg_no_sof", bytes(no_sof), "image/jpeg", 400),
        Case("png_bad_ihdr_crc", bytes(bad_ihdr_crc), "image/png", 400),
        Case("png_corrupt_idat", bytes(bad_idat_data), "image/png", 400),
        Case("png_truncated", png[: len(png) // 2], "image/png", 400),
        Case("png_signature_only", png[:8], "image/png", 400),
        Case("gif_truncated", _animated_gif()[:20], "image/gif", 400),
        Case("webp_truncated", encode(photo_image((96, 64)), "WEBP")[:40], "image/webp", 400),
        Case("bmp_truncated", encode(photo_image((96, 64)), "BMP")[:200], "image/bmp", 400),
        Case("tiff_truncated", encode(photo_image((96, 64)), "TIFF")[:100], "image/tiff", 400),
    ]


def _not_images() -> list[Case]:
    rng = np.random.default_rng(1234)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("cat.jpg", encode(photo_image((32, 32)), "JPEG"))
    pdf = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
           b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")  # fmt: skip
    svg = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
           b'height="10"><rect width="10" height="10" fill="red"/></svg>')  # fmt: skip
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
    random_bytes = rng.bytes(4096)
    assert random_bytes[:2] not in (b"\xff\xd8", b"\x89P", b"GI", b"RI", b"BM", b"II", b"MM")
    return [
        Case("text_as_jpeg", b"hello, I am not an image\n" * 20, "image/jpeg", 415),
        Case("pdf_as_png", pdf, "image/png", 415),
        Case("svg", svg, "image/svg+xml", 415),
        Case("html_as_gif", html, "image/gif", 415),
        Case("zip_with_jpeg_inside", zipped.getvalue(), "application/octet-stream", 415),
        Case("json_as_image", json.dumps({"image": "cat.jpg"}).encode(), "image/png", 415),
        Case("random_bytes", random_bytes, "application/octet-stream", 415),
        Case("bm_text", b"BMW 320d, 2019, good condition" * 4, "image/bmp", 415),
        Case("one_byte", b"\xff", "image/jpeg", 415),
        Case("jpeg2000_unsupported", encode(photo_image((32, 32)), "JPEG2000"), "image/jp2", 415),
        Case("ico_unsupported", encode(photo_image((32, 32)), "ICO"), "image/x-icon", 415),
    ]


def _polyglots() -> list[Case]:
    png = encode(photo_image((96, 64)), "PNG")
    jpeg = encode(photo_image((96, 64)), "JPEG")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("payload.js", "alert(1)")
    gif_js = b"GIF89a/*\x00\x00\x00\x00\x00*/=1;alert(document.domain);//" + bytes(64)
    return [
        # a decodable image followed by something else: the image part decodes -> accepted
        Case("polyglot_png_then_zip", png + zipped.getvalue(), "image/png", 200),
        Case("polyglot_jpeg_then_html", jpeg + b"<script>alert(1)</script>", "image/jpeg", 200),
        # GIF signature whose screen bytes are JavaScript: no image data follows -> undecodable
        Case("polyglot_gif_header_javascript", gif_js, "image/gif", 400),
        # something else first, an image later: content decides -> not an image
        Case("polyglot_html_then_png", b"<html><!--" + png + b"--></html>", "image/png", 415),
        Case("polyglot_zip_then_png", zipped.getvalue() + png, "image/png", 415),
    ]


def _bombs() -> list[Case]:
    return [
        Case("bomb_png_30000x30000", bomb_png(30_000, 30_000), "image/png", 413),
        Case("bomb_png_8000x8000_over_cap", bomb_png(8_000, 8_000), "image/png", 413),
        Case("bomb_gif_screen_60000x60000", gif_with_screen((60_000, 60_000)), "image/gif", 413),
        Case(
            "bomb_gif_frame_offset_50000",
            gif_with_screen((1, 1), (50_000, 50_000)),
            "image/gif",
            413,
        ),
        Case("bomb_jpeg_header_60000x60000", jpeg_with_size(60_000, 60_000), "image/jpeg", 413),
        # between Pillow's warning (89.5 MP) and error (179 MP) thresholds
        Case("bomb_jpeg_header_10000x9000", jpeg_with_size(10_000, 9_000), "image/jpeg", 413),
        # over our 50 MP cap, under Pillow's thresholds
        Case("bomb_jpeg_header_8000x8000", jpeg_with_size(8_000, 8_000), "image/jpeg", 413),
        Case("bomb_tiff_header_50000x50000", tiff_with_size(50_000, 50_000), "image/tiff", 413),
        Case("bomb_webp_header_16384x16384", webp_with_size(16_384, 16_384), "image/webp", 413),
    ]


@cache
def broken_cases() -> tuple[Case, ...]:
    """Non-images (415), corrupt images (400), polyglots and decompression bombs (413)."""
    return (*_not_images(), *_truncated_and_corrupt(), *_polyglots(), *_bombs())


@cache
def raw_body_cases() -> tuple[Case, ...]:
    """Every image and broken case as a raw body, plus empty bodies and Content-Type cases."""
    jpeg = encode(photo_image((96, 64)), "JPEG")
    return (
        *image_cases(),
        *broken_cases(),
        Case("empty_body_jpeg", b"", "image/jpeg", 422),
        Case("empty_body_octet_stream", b"", "application/octet-stream", 422),
        Case("jpeg_as_text_plain", jpeg, "text/plain", 415),
        Case("jpeg_as_json", jpeg, "application/json", 415),
        Case("jpeg_without_content_type", jpeg, None, 415),
        Case("jpeg_as_form_urlencoded", jpeg, "application/x-www-form-urlencoded", 415),
        Case("jpeg_as_image_star_params", jpeg, "image/jpeg; charset=binary", 200),
    )


# ---------------------------------------------------------------------------------------------
# multipart
# ---------------------------------------------------------------------------------------------


def multipart_body(
    parts: Iterable[Part | tuple[str, bytes]], *, boundary: str = BOUNDARY
) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data request with ``parts`` in order.

    A plain ``(name, data)`` tuple is a file part with a generic file name; ``Part`` gives
    full control (``filename=None`` makes a plain form field, ``content_type=None`` omits it).
    """
    chunks: list[bytes] = []
    for item in parts:
        part = item if isinstance(item, Part) else Part(*item)
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if part.content_type is not None:
            head += f"Content-Type: {part.content_type}\r\n"
        chunks += [head.encode(), b"\r\n", part.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def multipart_cases(max_images: int = 64) -> list[Case]:
    """Whole multipart requests and their expected status (``max_images`` as configured)."""
    jpeg = encode(photo_image((96, 64)), "JPEG")
    png = encode(photo_image((64, 48)), "PNG")
    tiny = encode(Image.new("L", (8, 8), 200), "PNG")
    cases: list[Case] = []

    def add(name: str, parts: Sequence[Part | tuple[str, bytes]], status: int) -> None:
        body, ctype = multipart_body(parts)
        cases.append(Case(name, body, ctype, status))

    add("mp_one_file", [("file", jpeg)], 200)
    add("mp_three_files", [("file", jpeg), ("file", png), ("file", tiny)], 200)
    add("mp_field_and_file", [Part("note", b"hello", None, None), ("file", jpeg)], 200)
    add("mp_file_without_part_content_type", [Part("file", png, "x.png", None)], 200)
    add("mp_png_declared_as_jpeg", [Part("file", png, "cat.jpg", "image/jpeg")], 200)
    add("mp_no_file_part", [Part("image", jpeg), Part("note", b"hi", None, None)], 422)
    add("mp_no_parts", [], 422)
    add("mp_empty_file_part", [("file", jpeg), ("file", b"")], 422)
    add(f"mp_{max_images + 36}_file_parts", [("file", tiny)] * (max_images + 36), 413)
    add("mp_text_part", [("file", b"just some text")], 415)
    add("mp_good_then_truncated", [("file", jpeg), ("file", jpeg[:200])], 400)
    add("mp_good_then_bomb", [("file", tiny), ("file", bomb_png(30_000, 30_000))], 413)
    body, _ = multipart_body([("file", jpeg)])
    other = "multipart/form-data; boundary=not-the-boundary"
    cases += [
        Case("mp_wrong_boundary", body, other, 400),
        Case("mp_missing_boundary", body, "multipart/form-data", 400),
        Case(
            "mp_no_closing_boundary",
            body[: body.rindex(b"--" + BOUNDARY.encode())],
            f"multipart/form-data; boundary={BOUNDARY}",
            400,
        ),
        Case("mp_raw_jpeg_body", jpeg, f"multipart/form-data; boundary={BOUNDARY}", 400),
        Case("mp_empty_body", b"", f"multipart/form-data; boundary={BOUNDARY}", 422),
        Case("mp_boundary_too_long", body, "multipart/form-data; boundary=" + "b" * 200, 400),
        Case("mp_multipart_mixed", body, f"multipart/mixed; boundary={BOUNDARY}", 415),
    ]
    return cases
