"""Image decoding by content, colour-mode repair, and the paper's two preprocessings."""

import io

import numpy as np
import pytest
from PIL import Image

from cheers_pl.data.images import (
    decode_image,
    image_extension,
    open_image,
    resize_crop,
    resize_pad,
    to_tensor,
)
from cheers_pl.data.schema import SampleError


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w=16, h=10, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def test_a_png_named_jpeg_decodes_by_content():
    data = encode(rgb(), "PNG")  # whatever the file was called, the bytes say PNG
    img = open_image(data)
    assert image_extension(img) == "png"
    out, note = decode_image(data)
    assert out.mode == "RGB" and note is None
    assert np.array_equal(np.asarray(out), np.asarray(rgb()))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK"])
def test_modes_convert_to_rgb(mode):
    src = rgb().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out, note = decode_image(encode(src, fmt))
    assert out.mode == "RGB" and out.size == (16, 10)
    assert note == (None if mode == "L" else f"mode:{mode}")  # 8-bit grayscale is exact: no repair
    if mode == "L":
        g = np.asarray(src)
        assert np.array_equal(np.asarray(out), np.stack([g, g, g], -1))


def test_16_bit_is_scaled_exactly():
    arr = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(arr)  # uint16 -> mode I;16
    out, note = decode_image(encode(img, "PNG"))
    assert note.startswith("mode:I")
    assert np.asarray(out)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out, note = decode_image(encode(rgba, "PNG"))
    arr = np.asarray(out)
    assert note == "mode:RGBA" and arr[1, 1].tolist() == [255, 255, 255] and arr[0, 0].tolist() == [0, 0, 255]
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.info["transparency"] = 0
    out, note = decode_image(encode(pal, "PNG", transparency=0))
    assert note == "mode:P" and np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_corrupt_and_truncated_images_raise_sample_errors():
    with pytest.raises(SampleError) as err:
        decode_image(b"definitely not an image")
    assert err.value.reason == "corrupt_image"
    data = encode(rgb(64, 64), "JPEG")
    with pytest.raises(SampleError, match="corrupt_image"):
        decode_image(data[: len(data) // 2])


def test_resize_pad_keeps_aspect_and_centres():
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    out = resize_pad(img, 32)
    arr = np.asarray(out)
    assert out.size == (32, 32)
    assert arr[16, 16].tolist() == [200, 100, 50]  # the picture: 32 x 16 in the middle rows
    assert arr[0, 16].tolist() == [0, 0, 0] and arr[31, 16].tolist() == [0, 0, 0]  # padding above and below
    assert (arr[8:24, :, 0] == 200).all() and (arr[:8, :, 0] == 0).all()


def test_resize_crop_fills_the_square_from_the_centre():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # white middle third
    out = np.asarray(resize_crop(Image.fromarray(arr), 20))
    assert out.shape == (20, 20, 3) and (out[:, 3:17] > 200).all()  # centre crop is the white band


def test_to_tensor_is_unit_range_chw():
    t = to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert t.shape == (3, 2, 3) and t[0].max() == 1.0 and abs(float(t[2, 0, 0]) - 0.2) < 1e-6
