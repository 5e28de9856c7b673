"""Unit tests of service.imaging over the generated corpus in tests/service/hostile.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service import imaging
from service.imaging import (
    ImageRejected,
    convert_mode,
    decode_image,
    decode_to_array,
    decode_to_tensor,
    effective_pixel_limit,
    sniff_format,
    to_tensor,
)
from tests.service import hostile
from tests.service.hostile import Case

ROOT = Path(__file__).resolve().parents[2]
MAX_PIXELS = hostile.DEFAULT_MAX_PIXELS
CORPUS = [*hostile.image_cases(), *hostile.broken_cases()]
FORMAT_PREFIXES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF",
                   "tiff": "TIFF"}  # fmt: skip


def decode_status(case: Case, color_mode: str, target: tuple[int, int] | None = None) -> int:
    try:
        tensor = decode_to_tensor(
            case.body, max_pixels=MAX_PIXELS, color_mode=color_mode, target_size=target
        )
    except ImageRejected as exc:
        rejected = exc
    else:
        rejected = None
    if rejected is not None:
        assert isinstance(rejected.detail, str)
        assert rejected.detail
        return rejected.status_code
    assert tensor.dtype == torch.uint8
    assert tensor.ndim == 3
    assert tensor.shape[0] == (1 if color_mode == "L" else 3)
    assert min(tensor.shape[1:]) >= 1
    return 200


def decode_l(data: bytes, **kwargs: object) -> np.ndarray:
    return decode_to_tensor(data, max_pixels=MAX_PIXELS, color_mode="L", **kwargs)[0].numpy()


def decode_rgb(data: bytes, **kwargs: object) -> np.ndarray:
    tensor = decode_to_tensor(data, max_pixels=MAX_PIXELS, color_mode="RGB", **kwargs)
    return tensor.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# the corpus: every case gets its status, in both colour modes, with and without a target size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_corpus_status(case: Case, color_mode: str) -> None:
    assert decode_status(case, color_mode) == case.status
    assert decode_status(case, color_mode, target=(32, 32)) == case.status


def test_corpus_covers_the_contract() -> None:
    statuses = {case.status for case in CORPUS}
    assert statuses == {200, 400, 413, 415}
    assert len(hostile.image_cases()) >= 40
    assert sum(case.status == 413 for case in CORPUS) >= 7


@pytest.mark.parametrize("case", hostile.image_cases(), ids=lambda case: case.name)
def test_sniff_format_reads_the_magic_bytes(case: Case) -> None:
    expected = FORMAT_PREFIXES[case.name.split("_")[0]]
    assert sniff_format(case.body) == expected


def test_not_images_have_no_format() -> None:
    for case in hostile.broken_cases():
        if case.status == 415:
            assert sniff_format(case.body) is None, case.name


def test_empty_bytes_are_422() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"", max_pixels=MAX_PIXELS)
    assert caught.value.status_code == 422


# ---------------------------------------------------------------------------------------------
# pixels: orientation, first frame, modes, 16-bit, transparency
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, (16, 16)])
def test_exif_orientation_is_applied(target: tuple[int, int] | None) -> None:
    # stored 64 wide x 32 high, left half white; orientation 6 shows it 32 x 64, top half white
    pixels = decode_l(hostile.exif_rotated_jpeg(6), target_size=target)
    assert pixels.shape == (64, 32)
    assert pixels[:28].mean() > 240
    assert pixels[36:].mean() < 15


def test_exif_rotated_photo_matches_the_rotated_pixels() -> None:
    upright = decode_rgb(hostile.encode(hostile.photo_image(), "JPEG", quality=90))
    rotated = decode_rgb(hostile.exif_rotated_photo(6))
    assert rotated.shape == (640, 427, 3)
    expected = np.rot90(upright, k=-1)  # 90 degrees clockwise
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 2


@pytest.mark.parametrize("name", ["gif_animated_first_frame", "tiff_multipage",
                                  "png_apng_first_frame"])  # fmt: skip
def test_first_frame_is_decoded(name: str) -> None:
    (case,) = [case for case in hostile.image_cases() if case.name == name]
    pixels = decode_rgb(case.body)
    assert pixels.shape == (32, 32, 3)
    red, _, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200
    assert blue < 50


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    data = hostile.sixteen_bit_png()
    assert decode_image(data, max_pixels=MAX_PIXELS).mode == "I;16"
    np.testing.assert_array_equal(decode_l(data), hostile.SIXTEEN_BIT_EXPECTED)
    rgb = decode_rgb(data)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], hostile.SIXTEEN_BIT_EXPECTED)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_tiff_modes_match_their_8bit_source(mode: str) -> None:
    source = np.asarray(hostile.photo_image((96, 64)).convert("L"), np.int32)
    data = hostile.encode(hostile._mode_image(mode), "TIFF")
    assert decode_image(data, max_pixels=MAX_PIXELS).mode == mode
    assert np.abs(decode_l(data).astype(np.int32) - source).max() <= 1


def test_sixteen_bit_rgb_png_keeps_the_high_byte() -> None:
    source = np.asarray(hostile.photo_image((32, 16)))
    (case,) = [case for case in hostile.image_cases() if case.name == "png_16bit_rgb"]
    assert np.abs(decode_rgb(case.body).astype(int) - source).max() <= 1


def test_float_images_outside_unit_range_are_clipped() -> None:
    values = np.array([[-5.0, 0.0, 100.0, 300.0, np.nan]], np.float32)
    pixels = to_tensor(Image.fromarray(values, mode="F"), "L")[0, 0].tolist()
    assert pixels == [0, 0, 100, 255, 0]


@pytest.mark.parametrize("mode", ["LA", "RGBA", "PA", "La", "RGBa"])
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_transparency_is_composited_on_white(mode: str, color_mode: str) -> None:
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 4))  # left half fully transparent black
    image = rgba.convert("LA").convert("La") if mode == "La" else rgba.convert(mode)
    assert image.mode == mode
    pixels = to_tensor(image, color_mode)
    assert pixels[:, :, :4].unique().tolist() == [255]
    assert pixels[:, :, 4:].unique().tolist() == [0]


def test_half_transparent_pixels_blend_with_white() -> None:
    image = Image.new("LA", (2, 2), (0, 128))
    assert to_tensor(image, "L").unique().tolist() == [127]


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 2, 2))
    image.info["transparency"] = 0
    pixels = decode_rgb(hostile.encode(image, "PNG"))
    assert pixels[:, :2].tolist() == [[[255, 255, 255]] * 2] * 2
    assert pixels[:, 2:].tolist() == [[[10, 20, 30]] * 2] * 2


def test_alpha_rule_matches_the_trainer_decoder() -> None:
    datasets = pytest.importorskip("trainer.data.datasets")
    for name in ("png_mode_RGBA", "png_mode_LA", "png_P_transparency", "gif_transparent",
                 "webp_lossless_alpha", "png_rgb"):  # fmt: skip
        (case,) = [case for case in hostile.image_cases() if case.name == name]
        for color_mode in ("L", "RGB"):
            ours = decode_to_tensor(case.body, max_pixels=MAX_PIXELS, color_mode=color_mode)
            theirs = datasets.decode_image(io.BytesIO(case.body), color_mode)
            assert torch.equal(ours, theirs), (name, color_mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "P",
                                  "PA", "CMYK", "YCbCr", "HSV", "LAB", "I;16", "I;16B", "I",
                                  "F"])  # fmt: skip
def test_every_mode_converts_to_l_and_rgb(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    assert tuple(to_tensor(image, "L").shape) == (1, 3, 5)
    assert tuple(to_tensor(image, "RGB").shape) == (3, 3, 5)
    assert convert_mode(image, "RGB").mode == "RGB"


def test_cmyk_jpeg_colours_survive() -> None:
    source = np.asarray(hostile.photo_image((96, 64)), np.int32)
    data = hostile.encode(hostile.photo_image((96, 64)).convert("CMYK"), "JPEG", quality=95)
    assert decode_image(data, max_pixels=MAX_PIXELS).mode == "CMYK"
    assert np.abs(decode_rgb(data).astype(np.int32) - source).mean() < 6


def test_unknown_color_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="color_mode"):
        decode_to_tensor(hostile.sixteen_bit_png(), max_pixels=MAX_PIXELS, color_mode="RGBA")


# ---------------------------------------------------------------------------------------------
# reduced-size JPEG decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(32, 32), (224, 224), (100, 40)])
def test_draft_decodes_a_large_jpeg_smaller_but_never_below_twice_the_target(
    target: tuple[int, int],
) -> None:
    data = hostile.encode(hostile.photo_image((2400, 1800)), "JPEG", quality=90)
    full = decode_image(data, max_pixels=MAX_PIXELS)
    small = decode_image(data, max_pixels=MAX_PIXELS, target_size=target)
    height, width = target
    assert small.width >= 2 * width
    assert small.height >= 2 * height
    assert small.width < full.width
    # same picture: compare both at the draft's size
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX), np.int32)
    assert np.abs(np.asarray(small, np.int32) - reference).mean() < 4


def test_draft_keeps_small_jpegs_at_full_size() -> None:
    data = hostile.encode(hostile.photo_image((320, 240)), "JPEG")
    assert decode_image(data, max_pixels=MAX_PIXELS, target_size=(224, 224)).size == (320, 240)


def test_grayscale_draft_matches_converting_after_decoding() -> None:
    data = hostile.encode(hostile.photo_image(), "JPEG", quality=90)
    direct = decode_l(data, target_size=(640, 640))  # grayscale from libjpeg, full scale
    converted = np.asarray(decode_image(data, max_pixels=MAX_PIXELS).convert("L"))
    assert direct.shape == converted.shape
    difference = np.abs(direct.astype(int) - converted.astype(int))
    assert difference.mean() < 0.1  # luma from YCbCr vs from upsampled RGB: rare edge pixels
    assert np.percentile(difference, 99.9) <= 3


def test_rotated_jpeg_draft_swaps_the_target() -> None:
    # stored 640 x 427 landscape, shown 427 x 640 portrait; a (H=300, W=100) target must not
    # let the stored height drop below 2 * 100 nor the stored width below 2 * 300
    data = hostile.exif_rotated_photo(6)
    image = decode_image(data, max_pixels=MAX_PIXELS, target_size=(300, 100))
    assert image.size == (427, 640)  # no reduction possible: 640 // 600 == 1


# ---------------------------------------------------------------------------------------------
# JPEGs through simplejpeg: Pillow's draft scale (or full scale), pixels, statuses, orientation
# ---------------------------------------------------------------------------------------------


def pillow_only(
    data: bytes, color_mode: str, target: tuple[int, int] | None = None
) -> torch.Tensor:
    image = decode_image(data, max_pixels=MAX_PIXELS, target_size=target, draft_mode=color_mode)
    return to_tensor(image, color_mode)


def fast_path(data: bytes, color_mode: str, target: tuple[int, int] | None) -> np.ndarray | None:
    header = Image.open(io.BytesIO(data))
    return imaging._decode_jpeg(data, header, color_mode, target)


def oriented_jpeg(orientation: int, *, xmp_first: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = hostile.encode(hostile.photo_image((64, 48)), "JPEG", quality=95, exif=exif)
    if xmp_first:  # an XMP APP1 segment before the EXIF one, as some editors write
        xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
        data = data[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[2:]
    return data


JPEG_CASES = [case for case in hostile.image_cases() if case.name.startswith("jpeg")]


@pytest.mark.parametrize("case", JPEG_CASES, ids=[case.name for case in JPEG_CASES])
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_full_scale_jpegs_get_pillows_pixels(case: Case, color_mode: str) -> None:
    header = Image.open(io.BytesIO(case.body))
    array = imaging._decode_jpeg(case.body, header, color_mode, None)
    if header.mode == "CMYK":
        assert array is None  # Pillow converts CMYK, as the trainer does
    else:
        assert array is not None  # the fast path took it
        assert array.flags.c_contiguous and array.flags.writeable
        assert torch.equal(torch.from_numpy(array).permute(2, 0, 1),
                           pillow_only(case.body, color_mode))  # fmt: skip
    decoded = decode_to_array(case.body, max_pixels=MAX_PIXELS, color_mode=color_mode)
    assert torch.equal(torch.from_numpy(decoded).permute(2, 0, 1),
                       pillow_only(case.body, color_mode))  # fmt: skip
    assert torch.equal(decode_to_tensor(case.body, max_pixels=MAX_PIXELS, color_mode=color_mode),
                       pillow_only(case.body, color_mode))  # fmt: skip


def test_full_scale_pixels_are_torchvisions_too() -> None:
    """torchvision's ``decode_jpeg`` (the full-scale decoder before simplejpeg) agrees."""
    decode_jpeg = pytest.importorskip("torchvision.io").decode_jpeg
    read_mode = pytest.importorskip("torchvision.io").ImageReadMode
    for subsampling in (0, 2):
        data = hostile.encode(hostile.photo_image((333, 517)), "JPEG", quality=90,
                              subsampling=subsampling)  # fmt: skip
        for color_mode, mode in (("RGB", read_mode.RGB), ("L", read_mode.GRAY)):
            array = fast_path(data, color_mode, (224, 224))  # 333 < 4 x 224: full scale
            assert array is not None and array.shape[:2] == (517, 333)
            expected = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
            assert torch.equal(torch.from_numpy(array).permute(2, 0, 1), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("xmp_first", [False, True])
def test_full_scale_path_applies_every_exif_orientation(orientation: int, xmp_first: bool) -> None:
    data = oriented_jpeg(orientation, xmp_first=xmp_first)
    assert fast_path(data, "RGB", None) is not None
    fast = decode_to_tensor(data, max_pixels=MAX_PIXELS, color_mode="RGB")
    reference = pillow_only(data, "RGB")
    assert torch.equal(fast, reference)
    expected_shape = (3, 64, 48) if orientation >= 5 else (3, 48, 64)
    assert tuple(fast.shape) == expected_shape


@pytest.mark.parametrize("size", [None, (1024, 768)])  # _outcome's 64x64 target: 1/1 and 1/4
def test_corrupt_jpegs_get_the_same_status_without_simplejpeg(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int] | None
) -> None:
    rng = np.random.default_rng(7)
    source = hostile.encode(hostile.photo_image(size), "JPEG", quality=90)
    scan = source.index(b"\xff\xda")
    corrupted = []
    for _ in range(60):
        data = bytearray(source)
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(scan + 20, len(data) - 2))] = int(rng.integers(0, 256))
        corrupted.append(Case("corrupt", bytes(data), "image/jpeg", 0))
    assert fast_path(source, "RGB", (64, 64)) is not None
    both = [_outcome(case)[0] for case in corrupted]
    monkeypatch.setattr(imaging, "_sj_decode_jpeg", None)
    assert [_outcome(case)[0] for case in corrupted] == both
    assert set(both) == {200, 400}  # libjpeg recovers from some, not from others


# stored sizes (W, H) x targets (H, W) that give 1/2, 1/4 and 1/8, odd sizes included (libjpeg
# rounds a scaled side up; Pillow's draft picks the scale from whole multiples), and 1/1
REDUCED_CASES = [((2400, 1800), (32, 32), 8), ((2400, 1800), (400, 400), 2),
                 ((1023, 767), (64, 48), 4), ((333, 517), (60, 60), 2), ((901, 77), (8, 50), 4),
                 ((640, 427), (32, 32), 4), ((2400, 1800), (1000, 1000), 1),
                 ((901, 77), (40, 40), 1)]  # fmt: skip


@pytest.mark.parametrize(("size", "target", "scale"), REDUCED_CASES)
@pytest.mark.parametrize("source", ["rgb444", "rgb420-progressive", "gray"])
@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_simplejpeg_path_gives_pillows_draft_pixels(
    size: tuple[int, int], target: tuple[int, int], scale: int, source: str, color_mode: str
) -> None:
    image = hostile.photo_image(size)
    if source == "gray":
        image = image.convert("L")
    subsampling = 0 if source == "rgb444" else 2
    data = hostile.encode(image, "JPEG", quality=90, subsampling=subsampling,
                          progressive=source.endswith("progressive"))  # fmt: skip
    array = fast_path(data, color_mode, target)
    assert array is not None  # the simplejpeg path took it
    assert array.shape == (-(-size[1] // scale), -(-size[0] // scale), len(color_mode))
    assert array.flags.c_contiguous and array.flags.writeable
    reference = pillow_only(data, color_mode, target)
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1), reference)
    assert np.array_equal(
        decode_to_array(data, max_pixels=MAX_PIXELS, color_mode=color_mode, target_size=target),
        array,
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_simplejpeg_path_applies_every_exif_orientation(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = hostile.encode(hostile.photo_image((640, 480)), "JPEG", quality=90, exif=exif)
    # a (H=30, W=70) target: stored 640 x 480 fits 4x (W >= 140, H >= 60) -> 160 x 120; for
    # 5-8 the file is stored transposed, so W >= 60, H >= 140 -> only 1/2, shown as 240 x 320
    array = fast_path(data, "RGB", (30, 70))
    assert array is not None
    reference = pillow_only(data, "RGB", (30, 70))
    assert torch.equal(torch.from_numpy(array).permute(2, 0, 1), reference)
    assert array.shape[:2] == ((320, 240) if orientation >= 5 else (120, 160))


def test_simplejpeg_path_leaves_other_jpegs_to_pillow() -> None:
    big = hostile.encode(hostile.photo_image((1600, 1200)), "JPEG")
    cmyk = hostile.encode(hostile.photo_image((1600, 1200)).convert("CMYK"), "JPEG")
    assert fast_path(cmyk, "RGB", (32, 32)) is None  # Pillow's CMYK conversion
    assert fast_path(cmyk, "RGB", None) is None
    truncated = big[: len(big) // 2]
    assert fast_path(truncated, "RGB", (32, 32)) is None  # Pillow gives the verdict
    assert fast_path(truncated, "RGB", None) is None
    with pytest.raises(ImageRejected) as caught:
        decode_to_array(truncated, max_pixels=MAX_PIXELS, color_mode="RGB", target_size=(32, 32))
    assert caught.value.status_code == 400


@pytest.mark.parametrize("target", [(32, 32), None])
def test_simplejpeg_path_refuses_a_frame_pillow_did_not_check(
    monkeypatch: pytest.MonkeyPatch, target: tuple[int, int] | None
) -> None:
    data = hostile.encode(hostile.photo_image((1600, 1200)), "JPEG")
    assert fast_path(data, "RGB", target) is not None
    monkeypatch.setattr(imaging, "_sj_decode_jpeg_header", lambda _: (12000, 16000, "YCbCr", ""))
    assert fast_path(data, "RGB", target) is None  # libjpeg's size differs: Pillow decodes


def test_without_simplejpeg_pillow_decodes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    with_sj = [_outcome(case) for case in CORPUS]
    monkeypatch.setattr(imaging, "_sj_decode_jpeg", None)
    assert [_outcome(case) for case in CORPUS] == with_sj


# ---------------------------------------------------------------------------------------------
# pixel cap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "JPEG", "BMP", "TIFF"])
def test_pixel_cap_is_exact(fmt: str) -> None:
    data = hostile.encode(hostile.photo_image((40, 25)), fmt)
    assert decode_image(data, max_pixels=1000).size == (40, 25)
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=999)
    assert caught.value.status_code == 413
    assert "40x25" in caught.value.detail


def test_gif_logical_screen_counts() -> None:
    data = hostile.gif_with_screen((2000, 2000))
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels=1_000_000)
    assert caught.value.status_code == 413
    assert decode_image(data, max_pixels=4_000_000).size == (2000, 2000)


def test_effective_limit_never_exceeds_pillows_guard() -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert effective_pixel_limit(10**12) == Image.MAX_IMAGE_PIXELS
    assert effective_pixel_limit(1000) == 1000
    bomb = hostile.bomb_png(30_000, 30_000)
    with pytest.raises(ImageRejected) as caught:
        decode_image(bomb, max_pixels=10**12)
    assert caught.value.status_code == 413
    assert before == Image.MAX_IMAGE_PIXELS  # read, never written


def test_pillow_bomb_warning_is_413_without_an_error_filter() -> None:
    data = hostile.jpeg_with_size(10_000, 9_000)  # over Pillow's warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageRejected) as caught:
            decode_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.status_code == 413


BOMB_SCRIPT = """
import json, sys, warnings
from service.imaging import ImageRejected, decode_to_tensor
from tests.service import hostile

def peak_growth_mib(work):
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
    rss = lambda key: int(next(line.split()[1] for line in open("/proc/self/status")
                               if line.startswith(key)))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = rss("VmRSS:")
    work()
    return (rss("VmHWM:") - start) / 1024

warnings.simplefilter(sys.argv[1])
cases = hostile.broken_cases()
control = hostile.bomb_png(8_000, 8_000)
decode_to_tensor(hostile.sixteen_bit_png(), max_pixels=50_000_000, color_mode="RGB")
statuses = {}

def decode_all():
    for case in cases:
        for mode in ("L", "RGB"):
            try:
                decode_to_tensor(case.body, max_pixels=50_000_000, color_mode=mode,
                                 target_size=(224, 224))
                statuses[case.name] = 200
            except ImageRejected as exc:
                statuses[case.name] = exc.status_code

def decode_control():  # the same kind of PNG, 64 MP, allowed: this one is decoded
    decode_to_tensor(control, max_pixels=70_000_000, color_mode="L")

growth = peak_growth_mib(decode_all)
control_growth = peak_growth_mib(decode_control)
print(json.dumps({"growth_mib": growth, "control_mib": control_growth, "statuses": statuses}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads and resets the peak RSS in /proc")
@pytest.mark.parametrize("warning_filter", ["default", "error"])
def test_bombs_keep_peak_memory_bounded(warning_filter: str) -> None:
    """In a fresh process: every broken case (9 bombs of 64 MP to 3.6 GP among them) gets its
    status, and the process's peak RSS grows by less than 32 MiB while decoding them all; a
    64 MP control image that is allowed through shows the measure sees real allocations."""
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, warning_filter],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {case.name: case.status for case in hostile.broken_cases()}
    assert report["statuses"] == expected
    print(f"peak RSS growth: bombs {report['growth_mib']:.1f} MiB, "
          f"64 MP control {report['control_mib']:.1f} MiB")  # fmt: skip
    assert report["growth_mib"] < 32
    assert report["control_mib"] > 120


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def _outcome(case: Case) -> tuple[int, bytes]:
    try:
        tensor = decode_to_tensor(case.body, max_pixels=MAX_PIXELS, color_mode="RGB",
                                  target_size=(64, 64))  # fmt: skip
    except ImageRejected as exc:
        return exc.status_code, exc.detail.encode()
    return 200, tensor.contiguous().numpy().tobytes()


def test_concurrent_decoding_matches_sequential() -> None:
    cases = CORPUS * 3
    sequential = [_outcome(case) for case in cases]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(_outcome, cases))
    assert concurrent == sequential
