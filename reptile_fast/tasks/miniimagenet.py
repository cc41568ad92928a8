"""Mini-ImageNet (Vinyals et al. 2016, the split of Ravi & Larochelle 2017): N-way K-shot tasks.

Two layouts are read:

* the CSV layout: ``ROOT/images/<file>.jpg`` and ``ROOT/{train,val,test}.csv`` with a header line
  ``filename,label`` and one image per line;
* the class-folder layout, as the official supervised-reptile code reads it (its
  ``fetch_data.sh`` writes it): ``ROOT/{train,val,test}/<class>/<image>`` (``.jpg``, ``.jpeg``,
  ``.png``, any case; other files, hidden files and folders and macOS's ``__MACOSX`` are ignored).

A split's CSV is read where it exists, its folder otherwise.  Images are read lazily when an
episode first uses them (the training split is 38400 images) and kept decoded as uint8 when
``cache=True``.  Tensors are float32 ``[3, S, S]`` in [0, 1] (84×84 in the paper).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .base import TaskBatch, _check_device, _check_positive_int
from .episodes import Episodes, check_ways, draw_episode_plan, images_needed
from .images import decode_rgb
from ..validation import check_bool, check_int

__all__ = ["MiniImageNet", "SPLITS"]

SPLITS = ("train", "val", "test")
#: the files a class folder's images are read from (the class-folder layout)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class MiniImageNet:
    """Few-shot tasks from one split of Mini-ImageNet.

    Args:
        root: folder holding ``images/`` and ``<split>.csv``, or ``<split>/<class>/`` folders.
        split: "train", "val" or "test" (classes are disjoint between splits).
        ways, shots, query_shots: as for ``Omniglot`` (``sample`` gives ``ways × shots``
            images per task; ``sample_episodes`` adds ``ways × query_shots`` query images).
        image_size: side of the square images (84); other sizes are resized (bilinear).
        cache: keep decoded images in memory (uint8) after their first use.
    """

    def __init__(self, root, split: str = "train", *, ways: int = 5, shots: int = 1,
                 query_shots: int = 1, image_size: int = 84, cache: bool = True):
        if not isinstance(root, (str, os.PathLike)):  # Path(None) said only "expected str, bytes or os.PathLike"
            raise TypeError(f"root must be a path (the folder holding images/ and <split>.csv, or <split>/<class>/), got "
                            f"{type(root).__name__}")
        self.ways = check_ways(ways)
        self.shots = _check_positive_int("shots", shots)
        self.query_shots = check_int("query_shots", query_shots, 0)
        self.image_size = check_int("image_size", image_size, 1)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        # check_bool: cache="no" was truthy (it cached)
        self.root, self.split, self.cache = Path(root), split, check_bool("cache", cache)
        csv_path, folder = self.root / f"{split}.csv", self.root / split
        if csv_path.is_file():
            by_class, self._image_root, self._source = _read_csv(csv_path), self.root / "images", f"{split}.csv"
        elif folder.is_dir():
            by_class, self._image_root, self._source = _read_class_folders(folder), self.root, f"{split}/"
        else:
            raise FileNotFoundError(f"{self.root} holds neither {split}.csv (with images/) nor a {split}/ "
                                    f"folder of class folders: expected ROOT/{{train,val,test}}.csv and "
                                    f"ROOT/images/, or ROOT/{{train,val,test}}/<class>/<image>")
        self.classes = sorted(by_class)
        self.files = [by_class[c] for c in self.classes]
        self.counts = torch.tensor([len(f) for f in self.files], dtype=torch.long)
        need = self.shots + self.query_shots
        if int(self.counts.min()) < need:
            i = int(self.counts.argmin())
            raise ValueError(f"class {self.classes[i]} has {int(self.counts[i])} images; tasks need "
                             f"{images_needed(self.shots, self.query_shots)} per class")
        if self.ways > len(self.classes):
            raise ValueError(f"{self.ways}-way tasks need {self.ways} classes; {split} has {len(self.classes)}")
        self._check_disjoint_from_training(set(by_class))
        self._cache: Dict[tuple, torch.Tensor] = {}

    def _check_disjoint_from_training(self, classes) -> None:
        """ValueError when this split shares a class with the training split (or, for "train",
        with val/test): a test class seen in meta-training inflates few-shot accuracy silently.
        Splits that are absent are not checked; val and test may share classes."""
        others = ("val", "test") if self.split == "train" else ("train",)
        for other in others:
            path, folder = self.root / f"{other}.csv", self.root / other
            if path.is_file():
                with open(path, newline="", encoding="utf-8-sig") as f:
                    labels = {row[1].strip() for row in list(csv.reader(f))[1:] if len(row) == 2}
                name = f"{other}.csv"
            elif folder.is_dir():
                labels, name = {p.name for p in _class_dirs(folder)}, f"{other}/"
            else:
                continue
            shared = sorted(classes & labels)
            if shared:
                raise ValueError(f"{self._source} and {name} share {len(shared)} classes (e.g. {shared[0]}): "
                                 f"few-shot splits must have disjoint classes")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"MiniImageNet({str(self.root)!r}, split={self.split!r}, {self.n_classes} classes, "
                f"ways={self.ways}, shots={self.shots}, query_shots={self.query_shots})")

    def _image(self, c: int, i: int) -> torch.Tensor:
        key = (c, i)
        img = self._cache.get(key)
        if img is None:
            path = self._image_root / self.files[c][i]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FileNotFoundError(f"image {path} of {self._source} cannot be read: {exc}") from None
            img = decode_rgb(data, self.image_size, name=str(path))
            if self.cache:
                self._cache[key] = img
        return img

    def _draw(self, n_tasks: int, per_class: int, generator):
        classes, picks = draw_episode_plan(self.counts, n_tasks, self.ways, per_class, generator=generator)
        x = torch.stack([torch.stack([torch.stack([self._image(int(c), int(i)) for i in picks[t, j]])
                                      for j, c in enumerate(classes[t])]) for t in range(n_tasks)])
        y = torch.arange(self.ways).view(1, self.ways, 1).expand(n_tasks, self.ways, per_class)
        return x.to(torch.float32) / 255.0, y

    def sample(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
               device=None) -> TaskBatch:
        """x float32 ``[T, N·K, 3, S, S]``, y long ``[T, N·K]`` (class-major)."""
        device = _check_device(device)
        x, y = self._draw(n_tasks, self.shots, generator)
        return TaskBatch(x.reshape(n_tasks, -1, *x.shape[3:]).to(device),
                         y.reshape(n_tasks, -1).contiguous().to(device))

    def sample_episodes(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
                        device=None) -> Episodes:
        """Support ``[T, N·shots, 3, S, S]`` and query ``[T, N·query_shots, 3, S, S]`` episodes."""
        if self.query_shots < 1:
            raise ValueError("sample_episodes needs query_shots >= 1 (this MiniImageNet has 0)")
        device = _check_device(device)
        K = self.shots
        x, y = self._draw(n_tasks, K + self.query_shots, generator)

        def flat(t):
            return t.reshape(n_tasks, -1, *t.shape[3:]).contiguous().to(device)

        return Episodes(TaskBatch(flat(x[:, :, :K]), flat(y[:, :, :K])),
                        TaskBatch(flat(x[:, :, K:]), flat(y[:, :, K:])), self.ways)


def _read_csv(csv_path: Path) -> Dict[str, List[str]]:
    """``{class: [file under images/, ...]}`` from a ``filename,label`` CSV, in the file's order."""
    by_class: Dict[str, List[str]] = {}
    first_line: Dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's) too: QA69
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise ValueError(f"{csv_path}: the first line must be the header 'filename,label'")
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        # fields stripped, as the header is: " n00" was another class than "n00", so a class
        # shared with the training split passed the disjointness check (QA46)
        row = [c.strip() for c in row]
        if len(row) != 2 or not row[0] or not row[1]:
            raise ValueError(f"{csv_path}:{n}: expected 'filename,label', got {row!r}")
        row[0] = os.path.normpath(row[0])  # "a.png" and "./a.png" are one image (QA69)
        if row[0] in first_line:
            # the same image twice could be drawn as both a support and a query image
            raise ValueError(f"{csv_path}:{n}: image {row[0]} is listed again (first on line "
                             f"{first_line[row[0]]}); every image must appear once")
        first_line[row[0]] = n
        by_class.setdefault(row[1], []).append(row[0])
    if not by_class:
        raise ValueError(f"{csv_path} lists no images")
    return by_class


def _class_dirs(folder: Path) -> List[Path]:
    """A split folder's class folders, sorted: not hidden ones (``.ipynb_checkpoints``) nor macOS
    archive debris (``__MACOSX``)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _read_class_folders(folder: Path) -> Dict[str, List[str]]:
    """``{class: [SPLIT/class/file, ...]}`` (sorted) from a split's class folders."""
    by_class: Dict[str, List[str]] = {}
    for class_dir in _class_dirs(folder):
        # (macOS's AppleDouble debris "._n01_0.jpg", beside each image a Mac copies to another disk,
        # was read as an image, which failed to decode mid-training: QA90, as Omniglot skips it)
        images = sorted(p.name for p in class_dir.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not images:
            # skipped, it would leave one class fewer without a word (as Omniglot's empty folders)
            raise ValueError(f"class folder {class_dir} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        by_class[class_dir.name] = [f"{folder.name}/{class_dir.name}/{name}" for name in images]
    if not by_class:
        raise ValueError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    return by_class
