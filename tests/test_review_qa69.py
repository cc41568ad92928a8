"""QA69 (session 25): image decoding and the Mini-ImageNet CSV layout.

* 16-bit PNGs and float TIFFs: Pillow's ``convert`` clips values at 255 instead of scaling them
  (50 % grey read as white, a float 0.5 as black); now scaled to 8 bits first.
* ``decode_rgb`` dropped transparency (a transparent background read as black) where
  ``decode_grey`` composites over white; both do now.
* A CSV with a UTF-8 byte-order mark was refused ("the first line must be the header"); two
  spellings of one image path ("a.png", "./a.png") passed the duplicate-image guard.
(Not taken: the official ``ROOT/{train,val,test}/<class>/`` folder layout, which the README does not
promise; and refusing ``Episodes`` whose query classes a support set lacks, which custom episodes may
want.)
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from reptile_fast import MiniImageNet

from reptile_fast.tasks.images import decode_grey, decode_rgb


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _split(root, images: dict, split: str = "train") -> None:
    """images: filename -> (PIL image, class)."""
    (root / "images").mkdir(exist_ok=True)
    lines = ["filename,label"]
    for name, (img, cls) in images.items():
        img.save(root / "images" / name)
        lines.append(f"{name},{cls}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- 1. 16-bit / float images
@pytest.mark.parametrize("value", [200, 32768, 65535])
def test_16bit_grey_png_is_scaled_not_clipped(value):
    """A 16-bit greyscale PNG (mode I;16) of level v/65535 must decode to about v/65535 (or be
    refused by name).  convert('RGB'/'L') clips the 16-bit integer at 255: 50 % grey reads as
    white, 0.3 % grey (v=200) reads as 78 % grey."""
    data = _png(Image.fromarray(np.full((4, 4), value, dtype=np.uint16)))
    want = value / 65535
    try:
        rgb = decode_rgb(data, 4).float() / 255
        grey = decode_grey(data, 4, invert=False)
    except (ValueError, TypeError):
        return  # refused: acceptable
    assert float(rgb.max() - rgb.min()) == 0.0
    assert float(rgb[0, 0, 0]) == pytest.approx(want, abs=1 / 255)
    assert float(grey[0, 0]) == pytest.approx(want, abs=1 / 255)


def test_16bit_png_in_a_miniimagenet_split_is_read_at_its_level(tmp_path):
    imgs = {f"{c}{k}.png": (Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)), c)
            for c in ("n01", "n02") for k in range(2)}
    _split(tmp_path, imgs)
    d = MiniImageNet(tmp_path, "train", ways=2, shots=2, query_shots=0, image_size=6)
    try:
        x = d.sample(1, generator=torch.Generator().manual_seed(0)).x
    except (ValueError, TypeError):
        return
    assert float(x.mean()) == pytest.approx(0.5, abs=1 / 255)  # got 1.0


def test_float_tiff_is_not_truncated_to_black():
    data = _png(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), "TIFF")
    try:
        rgb = decode_rgb(data, 4).float() / 255
    except (ValueError, TypeError):
        return
    assert float(rgb.mean()) > 0.1  # got 0.0 (0.5 truncated to the integer 0)


# ---------------------------------------------------------------- 2. transparency
@pytest.mark.parametrize("mode, pixel", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_transparent_background_decodes_as_white_in_rgb_too(mode, pixel):
    """README: 'A PNG with a transparent background decodes as drawn on white' (decode_grey does
    it); decode_rgb (MiniImageNet) drops the alpha and reads transparent black as black."""
    data = _png(Image.new(mode, (4, 4), pixel))
    assert float(decode_grey(data, 4, invert=False).min()) == 1.0  # the grey path: white
    assert int(decode_rgb(data, 4).min()) == 255                    # the RGB path: 0 (black)


def test_transparent_palette_png_decodes_as_white_in_rgb():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] + [255] * 765)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    assert int(decode_rgb(buf.getvalue(), 4).min()) == 255


# ---------------------------------------------------------------- 3. a CSV with a byte-order mark
def test_csv_with_a_utf8_bom_header_is_read(tmp_path):
    """A CSV saved with a byte-order mark (Excel, pandas encoding='utf-8-sig') has exactly the
    header 'filename,label'; it is refused with 'the first line must be the header
    'filename,label'', which names the header it holds."""
    imgs = {f"{c}{k}.png": (Image.new("RGB", (4, 4)), c) for c in ("n01", "n02") for k in range(2)}
    _split(tmp_path, imgs)
    text = (tmp_path / "train.csv").read_text()
    (tmp_path / "train.csv").write_text(text, encoding="utf-8-sig")
    d = MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=1, image_size=4)
    assert d.classes == ["n01", "n02"]


# ---------------------------------------------------------------- 4. one image under two spellings
def test_the_same_image_under_two_path_spellings_is_refused(tmp_path):
    """The CSV's duplicate guard ('the same image twice could be drawn as both a support and a
    query image') compares raw strings: 'a.png' and './a.png' are one file, accepted twice, and
    an episode then holds that file as support and as query."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for n in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{n}.png")
    (tmp_path / "train.csv").write_text("filename,label\na.png,n1\n./a.png,n1\nb.png,n2\nc.png,n2\n")
    with pytest.raises(ValueError, match="a.png"):
        MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=1, image_size=4)
