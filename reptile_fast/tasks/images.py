"""Decoding image files into tensors for the few-shot task families (Pillow does the decoding)."""
from __future__ import annotations

import io

import torch

from ..validation import check_choice

__all__ = ["require_pil", "decode_grey", "decode_rgb"]


def require_pil():
    """The ``PIL.Image`` module, or an ImportError saying how to get it."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError("reading image files needs Pillow (pip install pillow; matplotlib "
                          "already depends on it)") from exc
    return Image


#: how Omniglot images become pixels (``decode_grey(pixels=...)``): "area", area-averaged and
#: inverted (strokes 1 on 0); "official", as the official supervised-reptile code reads them
PIXELS = ("area", "official")


def _eight_bit(img, Image):
    """``img`` with 8-bit levels: Pillow's ``convert`` clips a 16-bit (``I;16*``), 32-bit integer
    (``I``) or float (``F``) image's values at 255 instead of scaling them, so 50 % grey in a 16-bit
    PNG read as white and a float TIFF's 0.5 as black (QA69).  16-bit values are scaled by
    255/65535 (32-bit integer ones too when they all lie in [0, 65535], as a 16-bit PNG's do when
    Pillow opens it as "I"; else by int32's range); float ones (taken as [0, 1]) by 255."""
    mode = img.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return img
    import numpy as np

    a = np.asarray(img)
    if mode == "F":
        a = np.clip(np.nan_to_num(a.astype(np.float64), nan=0.0), 0.0, 1.0) * 255.0
    else:
        # "I" holds a 16-bit PNG's values too (Pillow versions differ: QA73): 16-bit where they fit
        top = 65535.0 if mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535) \
            else float(np.iinfo(np.int32).max)
        a = np.clip(a.astype(np.float64), 0.0, top) * (255.0 / top)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def _over_white(img, Image):
    """Transparent pixels over white, as a viewer shows them: ``convert`` drops the alpha, so a
    transparent background (black RGB under alpha 0) read as ink (QA46; RGB images too: QA69)."""
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def decode_grey(data: bytes, size: int, *, name: str = "image", invert: bool = True,
                pixels: str = "area") -> torch.Tensor:
    """A PNG/JPEG file's bytes as float32 ``[size, size]`` in [0, 1].

    ``pixels="area"``: resized with area averaging (``Image.BOX``), which keeps thin pen strokes
    that nearest-neighbour resizing of a 105×105 binary image can drop; ``invert=True`` maps
    white to 0 and black to 1, so Omniglot's strokes are 1 on a 0 background.
    ``pixels="official"``: as the official code's ``Image.open(f).resize((28, 28))`` on
    Omniglot's 1-bit PNGs (Pillow resizes mode "1" by nearest neighbour) then ``np.array``:
    nearest-neighbour, white = 1, ink = 0 (``invert`` is ignored).
    """
    pixels = check_choice("pixels", pixels, PIXELS)
    Image = require_pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = _over_white(_eight_bit(img, Image), Image)
            grey = img.convert("L").resize((size, size), Image.BOX if pixels == "area" else Image.NEAREST)
            raw = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot decode {name} as an image: {exc}") from None
    x = raw.reshape(size, size).to(torch.float32) / 255.0
    return 1.0 - x if invert and pixels == "area" else x


def decode_rgb(data: bytes, size: int, *, name: str = "image") -> torch.Tensor:
    """An image file's bytes as uint8 ``[3, size, size]`` (resized with bilinear filtering)."""
    Image = require_pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = _over_white(_eight_bit(img, Image), Image).convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            raw = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot decode {name} as an image: {exc}") from None
    return raw.reshape(size, size, 3).permute(2, 0, 1).contiguous()
