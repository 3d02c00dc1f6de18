"""Safe image decoding: every mode -> upright RGB, formats, multi-frame, and clear errors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from qalign.media.image import DEFAULT_MAX_PIXELS, MediaError, load_image, to_rgb

W, H = 24, 16


def _check_rgb(image, size=(W, H)):
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size
    return np.asarray(image)


def _mode_image(mode: str) -> Image.Image:
    """A W x H image in ``mode`` with a left half and a right half that differ."""
    left, right = {
        "RGB": ((255, 0, 0), (0, 0, 255)),
        "L": (30, 220),
        "LA": ((30, 255), (220, 255)),
        "RGBA": ((255, 0, 0, 255), (0, 0, 255, 255)),
        "CMYK": ((0, 255, 255, 0), (255, 255, 0, 0)),  # red, blue
        "1": (0, 1),
        "I;16": (1000, 60000),
        "I": (-5, 100_000),
        "F": (-1.5, 2.5),
    }[mode]
    if mode in ("I;16", "I", "F"):  # (Pillow's paste() wraps 16-bit values: build from an array)
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        arr = np.full((H, W), left, dtype=dtype)
        arr[:, W // 2:] = right
        image = Image.fromarray(arr)
        assert image.mode == mode
        return image
    image = Image.new(mode, (W, H), left)
    image.paste(right, (W // 2, 0, W, H))
    return image


# Mode -> a file format that stores it as such.
MODE_FORMATS = [("RGB", "png"), ("L", "png"), ("LA", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("CMYK", "tiff"),
                ("1", "png"), ("1", "bmp"), ("I;16", "png"), ("I;16", "tiff"), ("I", "tiff"), ("F", "tiff")]


@pytest.mark.parametrize("mode,fmt", MODE_FORMATS)
def test_every_mode_from_file_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt}"
    _mode_image(mode).save(path)
    with Image.open(path) as im:
        stored_mode = im.mode
    if mode != "1" or fmt != "bmp":
        assert stored_mode == mode, "the fixture did not write the mode it meant to test"
    arr = _check_rgb(load_image(path)).astype(int)
    left, right = arr[:, : W // 2 - 2].mean((0, 1)), arr[:, W // 2 + 2:].mean((0, 1))
    assert np.abs(left - right).max() > 40, "the two halves must stay distinguishable"


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_in_memory_becomes_rgb(mode):
    arr = _check_rgb(load_image(_mode_image(mode))).astype(int)
    assert np.abs(arr[0, 0] - arr[0, -1]).max() > 40


def test_palette_modes(tmp_path):
    p = _mode_image("RGB").convert("P", palette=Image.ADAPTIVE, colors=4)
    p.save(tmp_path / "p.png")
    arr = _check_rgb(load_image(tmp_path / "p.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, -1]) == (0, 0, 255)


def test_palette_with_transparency_composited_on_white(tmp_path):
    p = _mode_image("RGB").convert("P", palette=Image.ADAPTIVE, colors=4)
    red_index = p.getpixel((0, 0))
    p.info["transparency"] = red_index
    p.save(tmp_path / "pt.png", transparency=red_index)
    with Image.open(tmp_path / "pt.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    arr = _check_rgb(load_image(tmp_path / "pt.png"))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # the transparent (red) half is white now
    assert tuple(arr[0, -1]) == (0, 0, 255)


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # invisible red
    rgba.putpixel((1, 1), (0, 0, 0, 128))  # half-transparent black
    arr = np.asarray(load_image(rgba)).astype(int)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert np.abs(arr[1, 1] - 127).max() <= 1
    la = Image.new("LA", (2, 2), (0, 0))
    assert tuple(np.asarray(load_image(la))[0, 0]) == (255, 255, 255)


def test_high_bit_depth_scaled_not_clipped():
    # 16-bit: the full 0..65535 range maps to 0..255 (clipping would make both halves 255).
    arr = np.asarray(to_rgb(_mode_image("I;16"))).astype(int)
    assert arr[0, 0, 0] == round(1000 / 65535 * 255)
    assert arr[0, -1, 0] == round(60000 / 65535 * 255)
    # 32-bit int and float: stretched from their minimum to their maximum.
    for mode in ("I", "F"):
        arr = np.asarray(to_rgb(_mode_image(mode)))
        assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255


def test_cmyk_white_and_black():
    assert tuple(np.asarray(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 255))))[0, 0]) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40x20 with red on the left, blue on the right; Orientation 6 = rotate 90 deg clockwise
    # for display, so the upright image is 20x40 with red on top.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        assert im.size == (40, 20)
    arr = _check_rgb(load_image(path), size=(20, 40)).astype(int)
    top, bottom = arr[2:16].mean((0, 1)), arr[24:38].mean((0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    # Without the tag nothing is rotated.
    image.save(tmp_path / "plain.jpg", quality=95)
    _check_rgb(load_image(tmp_path / "plain.jpg"), size=(40, 20))


def test_multi_frame_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 3
    arr = _check_rgb(load_image(path), size=(16, 12))
    assert tuple(arr[5, 5]) == (255, 0, 0)


def test_multi_frame_tiff_first_frame(tmp_path):
    path = tmp_path / "pages.tiff"
    first = Image.new("RGB", (30, 20), (10, 200, 30))
    second = Image.new("RGB", (8, 8), (250, 250, 250))
    first.save(path, save_all=True, append_images=[second])
    with Image.open(path) as im:
        assert im.n_frames == 2
    arr = _check_rgb(load_image(path), size=(30, 20))
    assert tuple(arr[0, 0]) == (10, 200, 30)


def test_pil_image_left_on_a_later_frame_is_rewound(tmp_path):
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "a.gif") as im:
        im.seek(1)
        assert tuple(np.asarray(load_image(im))[0, 0]) == (255, 0, 0)


FORMATS = ["png", "jpg", "bmp", "gif", "tiff", "webp"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_round_trip(tmp_path, fmt):
    if fmt == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    source = Image.new("RGB", (W, H), (200, 40, 40))
    source.paste((40, 40, 200), (0, H // 2, W, H))
    path = tmp_path / f"img.{fmt}"
    source.save(path)
    arr = _check_rgb(load_image(path)).astype(int)
    lossy = fmt in ("jpg", "webp")
    tol = 12 if lossy else 0
    assert np.abs(arr[2, 2] - (200, 40, 40)).max() <= tol
    assert np.abs(arr[-3, 2] - (40, 40, 200)).max() <= tol


def test_returned_image_is_detached_from_the_file(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(path)
    image = load_image(path)
    path.unlink()  # the file is closed and the pixels are loaded
    assert image.getpixel((0, 0)) == (1, 2, 3)


# ----------------------------------------------------------------- errors


def _error(path, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, f"the error must name the file: {message}"
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    assert "directory" in _error(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty" in _error(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    assert "not a recognised image format" in _error(path)


def _noise(size=(64, 48)):
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, fmt, keep):
    full = tmp_path / f"full.{fmt}"
    _noise().save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _error(cut)


def test_garbage_after_a_valid_header(tmp_path):
    full = tmp_path / "x.png"
    _noise().save(full)
    data = bytearray(full.read_bytes())
    data[60:400] = bytes(340)  # zero out the start of the compressed stream
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    message = _error(bad)
    assert "corrupt" in message or "truncated" in message


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit RGB) but carries one tiny IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    message = _error(path)
    assert "decompression bomb" in message


def test_max_pixels_cap_on_a_real_image(tmp_path):
    path = tmp_path / "real.png"
    _noise((64, 48)).save(path)
    message = _error(path, max_pixels=1000)
    assert "64x48" in message and "exceeds the cap" in message
    _check_rgb(load_image(path, max_pixels=64 * 48), size=(64, 48))  # the cap itself is allowed


def test_pil_inputs_are_not_capped():
    # A PIL image is already decoded: it is converted, never refused for its size.
    _check_rgb(load_image(Image.new("L", (64, 48)), max_pixels=10), size=(64, 48))


def test_images_below_the_default_cap_are_not_refused_as_bombs(tmp_path):
    """DEFAULT_MAX_PIXELS promises that e.g. a 12000 x 9000 (108 MP) photo decodes; Pillow's own
    bomb limit (89.5 MP warning, 179 MP error) must not refuse it first. The header-only file then
    fails as truncated, which is the correct, different error."""
    assert 12_000 * 9_000 < DEFAULT_MAX_PIXELS
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(12_000, 9_000))
    message = _error(path)
    assert "bomb" not in message, message


def test_raising_max_pixels_lifts_the_refusal(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20_000, 15_000))  # 300 MP
    assert "exceeds the cap" in _error(path)
    message = _error(path, max_pixels=400_000_000)
    assert "bomb" not in message, message
