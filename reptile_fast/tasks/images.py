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
            if "A" in img.getbands() or "transparency" in img.info:
                # transparent pixels over white, as a viewer shows them: convert("L") drops the
                # alpha, so a transparent background (black RGB under alpha 0) read as ink (QA46)
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
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
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            raw = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot decode {name} as an image: {exc}") from None
    return raw.reshape(size, size, 3).permute(2, 0, 1).contiguous()
