"""A tiny fake Omniglot (and official-runs layout) written as real PNG files, for the tests."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict

import numpy as np

# alphabet -> number of characters; every character has IMAGES drawings
ALPHABETS: Dict[str, int] = {"Alpha": 3, "Beta": 2, "Gamma": 3}
IMAGES = 4
SIZE = 28  # written at the loader's size, so no resizing blurs the asymmetric marks


def drawing(alphabet: str, char: int, k: int, size: int = SIZE) -> np.ndarray:
    """A white image with black marks unique to (alphabet, char, k) and asymmetric under rotation."""
    rng = np.random.default_rng([sorted(ALPHABETS).index(alphabet) if alphabet in ALPHABETS else 7, char, k])
    img = np.full((size, size), 255, dtype=np.uint8)
    img[rng.random((size, size)) < 0.15] = 0
    img[1:4, 1:9] = 0      # an L-shaped mark in one corner: no rotation maps it onto itself
    img[1:12, 1:4] = 0
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path)


def make_folder(root: Path, alphabets: Dict[str, int] = ALPHABETS, images: int = IMAGES,
                prefix: str = "images_background") -> Path:
    """``root/prefix/alphabet/characterNN/NNNN_KK.png``; returns ``root/prefix``."""
    base = root / prefix
    for alphabet, n_chars in alphabets.items():
        for c in range(n_chars):
            for k in range(images):
                write_png(base / alphabet / f"character{c + 1:02d}" / f"{c:04d}_{k + 1:02d}.png",
                          drawing(alphabet, c, k))
    return base


def make_zip(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` with its own name as the top directory, as the official zips are laid out."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f.relative_to(folder.parent).as_posix())
    return zip_path


def make_runs(root: Path, n_runs: int = 2, ways: int = 3) -> Path:
    """``root/all_runs/runNN/{training/classKK.png, test/itemKK.png, class_labels.txt}``.

    Test item ``k`` shows drawing 1 of class ``perm[k]`` (training images are drawing 0)."""
    base = root / "all_runs"
    for r in range(n_runs):
        run = base / f"run{r + 1:02d}"
        perm = np.random.default_rng(r).permutation(ways)
        lines = []
        for c in range(ways):
            write_png(run / "training" / f"class{c + 1:02d}.png", drawing("Runs", 10 * r + c, 0))
        for k in range(ways):
            write_png(run / "test" / f"item{k + 1:02d}.png", drawing("Runs", 10 * r + int(perm[k]), 1))
            lines.append(f"run{r + 1:02d}/test/item{k + 1:02d}.png run{r + 1:02d}/training/class{int(perm[k]) + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return base


def job_data(root: Path) -> dict:
    """A tiny training zip (alphabets Alpha, Beta) and test folder (Gamma) for the omniglot job:
    ``{"train": zip path, "test": folder path, "root": root}``."""
    train = make_zip(make_folder(root / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                     root / "small1.zip")
    test = make_folder(root / "b", {"Gamma": 3}, prefix="images_background_small2")
    return {"train": str(train), "test": str(test), "root": root}


def bench_data(root: Path) -> Path:
    """``root/data`` laid out as the paired Omniglot experiments read it (``bench/omniglot_*.py``):
    ``images_background_small1.zip`` (Alpha, Beta; 10 images per character: the 5-way preset's 10
    training shots) and ``images_background_small2.zip`` (Beta, which the training data removes
    from the test, Gamma, Delta; 6 images: 5-shot tests with one query)."""
    data = root / "data"
    data.mkdir()
    make_zip(make_folder(root / "a", {"Alpha": 3, "Beta": 2}, images=10, prefix="images_background_small1"),
             data / "images_background_small1.zip")
    make_zip(make_folder(root / "b", {"Beta": 2, "Gamma": 3, "Delta": 3}, images=6, prefix="images_background_small2"),
             data / "images_background_small2.zip")
    return data
