"""Omniglot (Lake et al. 2015): N-way K-shot character classification tasks.

Reads the standard layout ``alphabet/characterNN/*.png`` from a folder or straight from the
official zips (``images_background.zip``, ``images_background_small1.zip``,
``images_evaluation.zip`` …; nothing is extracted), at any depth (``images_background/Greek/…``
and ``Greek/…`` both work).  Images become float32 ``[1, 28, 28]``, by default with strokes 1 on
a 0 background (area-averaged resize); ``pixels="official"`` reads them as the official code does
(nearest-neighbour, white 1, ink 0; see ``images.decode_grey``).

Classes are characters; ``rotations=(0, 90, 180, 270)`` adds each character's rotations as
extra classes (the paper's augmentation, for training only).  Classes are split by alphabet
(``alphabets=`` / ``exclude_alphabets=``), so test alphabets can be kept out of training, or by
character (``characters=``; ``official_character_split`` draws the official code's split: 1200
characters of all alphabets for training, the rest for testing).

``load_official_runs`` reads the 20 within-alphabet 20-way one-shot runs of Lake et al. 2015
(``all_runs.zip``) for evaluation only.
"""
from __future__ import annotations

import numbers
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .base import TaskBatch, _check_device, _check_positive_int
from .episodes import Episodes, check_ways, draw_episode_plan, images_needed
from .images import PIXELS, decode_grey
from ..validation import check_choice, check_int

__all__ = ["Omniglot", "OmniglotImages", "load_omniglot_images", "load_official_runs", "ROTATIONS",
           "official_character_split", "OFFICIAL_TRAIN_CHARACTERS"]

ROTATIONS = (0, 90, 180, 270)
#: training characters of the official code's split (openai/supervised-reptile ``split_dataset``)
OFFICIAL_TRAIN_CHARACTERS = 1200
PathLike = Union[str, os.PathLike]


def _sources(sources) -> List[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    try:
        sources = list(sources)
        paths = [Path(s) for s in sources]
    except TypeError:
        raise TypeError("sources must be a path or a list of paths (folders or .zip files)") from None
    if not paths:
        raise ValueError("sources is empty: give at least one Omniglot folder or zip")
    for s, p in zip(sources, paths):
        if os.fspath(s) == "":  # Path("") is the current folder, read without a word before QA82
            raise ValueError("an Omniglot source is an empty path, which would read the current folder: "
                             "give a folder or zip")
        if not p.exists():
            raise FileNotFoundError(f"Omniglot source {p} does not exist")
        if not (p.is_dir() or zipfile.is_zipfile(p)):
            raise ValueError(f"Omniglot source {p} is neither a folder nor a zip file")
    return paths


def _is_image(parts) -> bool:
    # alphabet/characterNN/file.png; macOS archive debris (__MACOSX/, ._file.png) is not data
    return (len(parts) >= 3 and parts[-1].endswith(".png") and parts[-2].startswith("character")
            and not parts[-1].startswith("._") and "__MACOSX" not in parts)


def _png_entries(path: Path) -> Iterable[Tuple[Tuple[str, str, str], object]]:
    """``((alphabet, character, file), read)`` for every ``alphabet/character*/file.png``."""
    if path.is_dir():
        for f in sorted(path.rglob("*.png")):
            parts = f.relative_to(path).parts
            if _is_image(parts):
                yield (parts[-3], parts[-2], parts[-1]), f.read_bytes
    else:
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                parts = [p for p in name.split("/") if p]
                if _is_image(parts):
                    yield (parts[-3], parts[-2], parts[-1]), (lambda n=name: zf.read(n))


def _character_dirs(path: Path) -> Iterable[Tuple[str, str]]:
    """``(alphabet, character)`` of every ``alphabet/character*/`` folder that holds no folder
    (a zip's explicit folder entries; a zip without them has no empty folders to find).  A
    folder with subfolders is no character, whatever its name: ``data/characters/images_background/…``
    was taken for an empty character and the whole source refused (QA60)."""
    if path.is_dir():
        for d in sorted(path.rglob("character*")):
            if d.is_dir() and "__MACOSX" not in d.relative_to(path).parts and d.parent != path \
                    and not any(c.is_dir() for c in d.iterdir()):
                yield d.parent.name, d.name
    else:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        entries = [([p for p in name.split("/") if p], name.endswith("/")) for name in names]
        # folders with a folder inside: every ancestor of an entry's own folder
        parents = {tuple(parts[:k]) for parts, is_dir in entries
                   for k in range(1, len(parts) - (0 if is_dir else 1))}
        for parts, is_dir in entries:
            if is_dir and len(parts) >= 2 and parts[-1].startswith("character") and "__MACOSX" not in parts \
                    and tuple(parts) not in parents:
                yield parts[-2], parts[-1]


class OmniglotImages:
    """Decoded Omniglot images, grouped by character.

    Attributes:
        images: float32 ``[n_images, 1, S, S]``.
        characters: ``[(alphabet, character), ...]``, sorted; class ``c`` of this list.
        table: long ``[n_characters, max_count]``: the image indices of each character
            (padded with -1), ``counts``: long ``[n_characters]``.
        image_size: S; pixels: how they were read ("area" or "official", ``images.PIXELS``).
    """

    def __init__(self, images: torch.Tensor, characters: List[Tuple[str, str]], table: torch.Tensor,
                 counts: torch.Tensor, image_size: int, pixels: str = "area"):
        self.images, self.characters, self.table, self.counts = images, characters, table, counts
        self.image_size, self.pixels = image_size, pixels

    @property
    def alphabets(self) -> List[str]:
        return sorted({a for a, _ in self.characters})


def _check_pixels(pixels) -> str:
    return check_choice("pixels", pixels, PIXELS)


def load_omniglot_images(sources, image_size: int = 28, pixels: str = "area") -> OmniglotImages:
    """Read every ``alphabet/characterNN/*.png`` under ``sources`` (folders or zips).

    Several sources are merged; an image present in two of them (same alphabet, character and
    file name: small1 and small2 share Greek and Latin) is read once.  ``pixels``: "area"
    (area-averaged, strokes 1 on 0) or "official" (the official code's: nearest-neighbour,
    white 1, ink 0; ``images.decode_grey``).
    """
    image_size = check_int("image_size", image_size, 1)
    pixels = _check_pixels(pixels)
    paths = _sources(sources)
    files: Dict[Tuple[str, str], Dict[str, Path]] = {}  # character -> file name -> its source
    for path in paths:
        for (alphabet, character, fname), _ in _png_entries(path):
            files.setdefault((alphabet, character), {}).setdefault(fname, path)
    if not files:
        raise ValueError(f"no alphabet/characterNN/*.png images found in {[str(p) for p in paths]}")
    for path in paths:
        for key in _character_dirs(path):
            if key not in files:  # an empty class would silently be no class at all
                raise ValueError(f"character folder {'/'.join(key)} in {path} holds no .png image: "
                                 f"restore its images or remove the folder")
    characters = sorted(files)
    rows = []
    # Zip members are read while their archive is open: group the reads by source.
    by_source: Dict[Path, List[Tuple[int, str]]] = {}
    index = 0
    for ci, key in enumerate(characters):
        row = []
        for fname in sorted(files[key]):
            src = files[key][fname]
            by_source.setdefault(src, []).append((index, "/".join((*key, fname))))
            row.append(index)
            index += 1
        rows.append(row)
    out = torch.empty(index, 1, image_size, image_size)
    for src, wanted in by_source.items():
        want = {name: i for i, name in wanted}
        for (alphabet, character, fname), read in _png_entries(src):
            name = f"{alphabet}/{character}/{fname}"
            if name in want:
                out[want.pop(name), 0] = decode_grey(read(), image_size, name=f"{src}:{name}", pixels=pixels)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    table = torch.full((len(rows), int(counts.max())), -1, dtype=torch.long)
    for ci, row in enumerate(rows):
        table[ci, :len(row)] = torch.tensor(row)
    return OmniglotImages(out, characters, table, counts, image_size, pixels)


def official_character_split(characters: Sequence[Tuple[str, str]], *, seed: int = 0,
                             n_train: int = OFFICIAL_TRAIN_CHARACTERS
                             ) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """The official code's split of Omniglot's characters: ``(train, test)``.

    The official code (openai/supervised-reptile) reads every character of both official sets
    (all 50 alphabets in one folder), sorted by alphabet then character, seeds Python's
    ``random`` with its ``--seed`` (default 0), shuffles the list once and keeps the first 1200
    for training (with 90° rotations) and the other 423 for testing (without).  This is that
    shuffle, on a private ``random.Random(seed)`` (Python's shuffle depends only on the seed and
    the list's length, so the same characters in the same order give the same split; the global
    ``random`` state is not touched).

    Args:
        characters: ``[(alphabet, character), ...]`` — e.g. ``OmniglotImages.characters`` (sorted,
            as the official code lists them; given in another order, they are sorted first).
        seed: the official run's ``--seed``, a non-negative int.
        n_train: training characters (the official 1200), at least 1 and fewer than the characters
            given (the rest are the test set).
    Returns:
        ``(train, test)``: lists of ``(alphabet, character)``, ``train`` in the shuffled order's
        first ``n_train``, ``test`` the rest (each as the official lists them).
    """
    seed = check_int("seed", seed, 0)
    n_train = check_int("n_train", n_train, 1)
    if isinstance(characters, (str, bytes)):
        raise TypeError("characters must be a list of (alphabet, character) pairs, not one string")
    try:
        chars = [tuple(c) for c in characters]
    except TypeError:
        raise TypeError("characters must be a list of (alphabet, character) pairs") from None
    if not all(len(c) == 2 and all(isinstance(part, str) for part in c) for c in chars):
        raise TypeError("characters must be a list of (alphabet, character) pairs of strings")
    if len(set(chars)) != len(chars):
        raise ValueError("characters lists a character twice")
    if n_train >= len(chars):
        raise ValueError(f"n_train={n_train} leaves no test character: the data has {len(chars)} characters "
                         f"(the official split keeps {OFFICIAL_TRAIN_CHARACTERS} of all 1623 for training)")
    chars = sorted(chars)
    random.Random(seed).shuffle(chars)
    return chars[:n_train], chars[n_train:]


def _check_rotations(rotations) -> Tuple[int, ...]:
    # int() would read "90" as 90 and truncate 90.5 to 90: only whole numbers of degrees are taken
    message = f"rotations must be a sequence of int degrees among {ROTATIONS}, got {rotations!r}"
    if isinstance(rotations, (str, bytes)):
        raise TypeError(message)
    try:
        rots = tuple(rotations)
    except TypeError:
        raise TypeError(message) from None
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rots):
        raise TypeError(message)
    rots = tuple(int(r) for r in rots)
    if not rots or any(r not in ROTATIONS for r in rots) or len(set(rots)) != len(rots):
        raise ValueError(f"rotations must be distinct values among {ROTATIONS}, got {rotations!r}")
    return rots


def _check_characters(characters, data: OmniglotImages) -> set:
    """``characters`` as a set of ``(alphabet, character)`` pairs that are all in ``data``."""
    if isinstance(characters, (str, bytes)):
        raise TypeError("characters must be a list of (alphabet, character) pairs, not one string")
    try:
        pairs = [tuple(c) if not isinstance(c, (str, bytes)) else c for c in characters]
    except TypeError:
        raise TypeError(f"characters must be a list of (alphabet, character) pairs, "
                        f"got {type(characters).__name__}") from None
    for c in pairs:
        if not (isinstance(c, tuple) and len(c) == 2 and all(isinstance(part, str) for part in c)):
            raise TypeError(f"characters must be (alphabet, character) pairs of strings, got {c!r}")
    unknown = sorted(set(pairs) - set(data.characters))
    if unknown:
        raise ValueError(f"characters {unknown[:5]}{' …' if len(unknown) > 5 else ''} "
                         f"({len(unknown)} in all) are not in the data")
    return set(pairs)


class Omniglot:
    """N-way K-shot Omniglot tasks: ``sample`` for meta-training, ``sample_episodes`` for testing.

    Args:
        sources: a folder or zip (or a list of them) in the standard layout, or an
            ``OmniglotImages`` already loaded (shared between splits without re-reading).
        ways: N >= 2, classes per task.
        shots: K, images per class in ``sample``'s tasks and in an episode's support set
            (the paper trains on 10 "training shots" per class and tests with 1 or 5).
        query_shots: images per class in an episode's query set (0: ``sample`` only).
        rotations: degrees; each character at each rotation is a class.  ``ROTATIONS`` is the
            paper's training augmentation; ``(0,)`` (the default) for testing.
        alphabets: keep only these alphabets (None: all); ``exclude_alphabets``: drop these
            (None: none).
        characters: keep only these ``(alphabet, character)`` pairs (None: all), within the
            alphabets kept — e.g. one side of ``official_character_split``.
        image_size: side of the square images (None: 28, the paper's, or the preloaded images'
            size; a size other than the preloaded images' is refused).
        pixels: "area" (area-averaged resize, strokes 1 on a 0 background) or "official" (as the
            official code reads them: nearest-neighbour resize, white 1, ink 0).  Preloaded
            images keep theirs (another value given here is refused).
    """

    def __init__(self, sources, *, ways: int = 5, shots: int = 1, query_shots: int = 1,
                 rotations: Sequence[int] = (0,), alphabets: Optional[Sequence[str]] = None,
                 exclude_alphabets: Optional[Sequence[str]] = (), image_size: Optional[int] = None,
                 pixels: Optional[str] = None, characters: Optional[Sequence[Tuple[str, str]]] = None):
        self.ways = check_ways(ways)
        self.shots = _check_positive_int("shots", shots)
        self.query_shots = check_int("query_shots", query_shots, 0)
        self.rotations = _check_rotations(rotations)
        if exclude_alphabets is None:
            exclude_alphabets = ()
        # each read once, into a tuple: an iterator (a generator, map, filter) was used up by the
        # check below, so exclude_alphabets=iter(train.alphabets) excluded nothing (QA45)
        for name, given in (("alphabets", alphabets), ("exclude_alphabets", exclude_alphabets)):
            if given is not None and not isinstance(given, str):
                try:
                    given = tuple(given)
                except TypeError:
                    raise TypeError(f"{name} must be a list of alphabet names, got {type(given).__name__}") from None
                if name == "alphabets":
                    alphabets = given
                else:
                    exclude_alphabets = given
        if image_size is not None:
            image_size = check_int("image_size", image_size, 1)
        # (an explicit 28, the old default's value, on preloaded images of another size was taken for
        # "not given" and ignored: QA53)
        if isinstance(sources, OmniglotImages) and image_size is not None and image_size != sources.image_size:
            # the preloaded images' size was kept, silently (QA46)
            raise ValueError(f"image_size={image_size} but the preloaded images are {sources.image_size}×"
                             f"{sources.image_size}: load them at that size (load_omniglot_images(..., image_size))")
        if pixels is not None:
            pixels = _check_pixels(pixels)
        if isinstance(sources, OmniglotImages) and pixels is not None and pixels != sources.pixels:
            raise ValueError(f"pixels={pixels!r} but the preloaded images were read with pixels="
                             f"{sources.pixels!r}: load them so (load_omniglot_images(..., pixels=...))")
        data = sources if isinstance(sources, OmniglotImages) else \
            load_omniglot_images(sources, 28 if image_size is None else image_size, pixels or "area")
        self.data = data
        present = set(data.alphabets)
        for name, given in (("alphabets", alphabets), ("exclude_alphabets", exclude_alphabets)):
            if given is None:
                continue
            if isinstance(given, str):
                raise TypeError(f"{name} must be a list of alphabet names, not one string")
            if not all(isinstance(a, str) for a in given):  # [["Greek"]] failed as "unhashable type" (QA46)
                bad = next(a for a in given if not isinstance(a, str))
                raise TypeError(f"{name} must be a list of alphabet names (strings), got a {type(bad).__name__}")
            unknown = sorted(set(given) - present)
            if unknown and name == "alphabets":
                raise ValueError(f"alphabets {unknown} are not in the data (it has {sorted(present)})")
        keep = set(present) if alphabets is None else set(alphabets)
        keep -= set(exclude_alphabets)
        wanted = None if characters is None else _check_characters(characters, data)
        self.char_ids = torch.tensor([i for i, (a, c) in enumerate(data.characters)
                                      if a in keep and (wanted is None or (a, c) in wanted)], dtype=torch.long)
        if self.char_ids.numel() == 0:
            raise ValueError("no characters left after selecting alphabets "
                             f"(data has {sorted(present)}, kept {sorted(keep)})"
                             + ("" if wanted is None else f" and the {len(wanted)} characters given"))
        # the alphabets that hold a kept character (with ``characters``, not every kept alphabet does)
        self.alphabets = sorted({data.characters[int(i)][0] for i in self.char_ids})
        self._selected_characters = None if wanted is None else self.characters
        counts = data.counts[self.char_ids]
        need = self.shots + self.query_shots
        if int(counts.min()) < need:
            i = int(counts.argmin())
            a, c = data.characters[int(self.char_ids[i])]
            raise ValueError(f"character {a}/{c} has {int(counts[i])} images; tasks need "
                             f"{images_needed(self.shots, self.query_shots)} per class")
        if self.ways > self.n_classes:
            raise ValueError(f"{self.ways}-way tasks need {self.ways} classes; the selected "
                             f"{'alphabets' if wanted is None else 'characters'} "
                             f"give {self.n_classes} ({len(self.char_ids)} characters × "
                             f"{len(self.rotations)} rotations)")
        # class c ↔ character char_ids[c // R] rotated by rotations[c % R]
        self._class_counts = counts.repeat_interleave(len(self.rotations))

    @property
    def n_characters(self) -> int:
        return int(self.char_ids.numel())

    @property
    def n_classes(self) -> int:
        return self.n_characters * len(self.rotations)

    @property
    def characters(self) -> List[Tuple[str, str]]:
        return [self.data.characters[int(i)] for i in self.char_ids]

    def __repr__(self) -> str:
        return (f"Omniglot({len(self.alphabets)} alphabets, {self.n_characters} characters × "
                f"{len(self.rotations)} rotations, ways={self.ways}, shots={self.shots}, "
                f"query_shots={self.query_shots})")

    def subset(self, **changes) -> "Omniglot":
        """A copy with other settings (``ways``, ``shots``, ``alphabets`` …), sharing the images."""
        kw = dict(ways=self.ways, shots=self.shots, query_shots=self.query_shots,
                  rotations=self.rotations, alphabets=self.alphabets, characters=self._selected_characters)
        kw.update(changes)
        return Omniglot(self.data, **kw)

    def _draw(self, n_tasks: int, per_class: int, generator):
        """Images ``[T, N, P, 1, S, S]`` and labels ``[T, N, P]`` of ``n_tasks`` tasks."""
        classes, picks = draw_episode_plan(self._class_counts, n_tasks, self.ways, per_class,
                                           generator=generator)
        R = len(self.rotations)
        chars = self.char_ids[classes // R]                                  # [T, N]
        idx = self.data.table[chars.unsqueeze(-1), picks]                   # [T, N, P]
        x = self.data.images[idx]                                           # [T, N, P, 1, S, S]
        turns = torch.tensor([r // 90 for r in self.rotations])[classes % R]  # [T, N]
        for k in turns.unique().tolist():
            if k:
                sel = turns == k
                x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        y = torch.arange(self.ways).view(1, self.ways, 1).expand(n_tasks, self.ways, per_class)
        return x, y

    def sample(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
               device=None) -> TaskBatch:
        """``n_tasks`` tasks of ``ways × shots`` images: x float32 ``[T, N·K, 1, S, S]``,
        y long ``[T, N·K]`` (labels ``0..N-1``, class-major order)."""
        device = _check_device(device)
        x, y = self._draw(n_tasks, self.shots, generator)
        T = x.shape[0]
        return TaskBatch(x.reshape(T, -1, *x.shape[3:]).to(device),
                         y.reshape(T, -1).contiguous().to(device))

    def sample_episodes(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
                        device=None) -> Episodes:
        """``n_tasks`` episodes: support ``[T, N·shots, 1, S, S]`` and query
        ``[T, N·query_shots, 1, S, S]``, disjoint images of the same ``N`` classes."""
        if self.query_shots < 1:
            raise ValueError("sample_episodes needs query_shots >= 1 (this Omniglot has 0)")
        device = _check_device(device)
        K = self.shots
        x, y = self._draw(n_tasks, K + self.query_shots, generator)
        T = x.shape[0]
        flat = lambda t: t.reshape(T, -1, *t.shape[3:]).contiguous().to(device)  # noqa: E731
        return Episodes(TaskBatch(flat(x[:, :, :K]), flat(y[:, :, :K])),
                        TaskBatch(flat(x[:, :, K:]), flat(y[:, :, K:])), self.ways)


_RUN = re.compile(r"^run(\d+)$")


def load_official_runs(path: PathLike, image_size: int = 28, pixels: str = "area") -> Tuple[Episodes, List[str]]:
    """The 20 official one-shot runs of Lake et al. 2015 (``all_runs.zip`` or its extracted folder).

    Each ``runNN/`` holds ``training/classMM.png`` (one image of each of 20 characters of one
    alphabet), ``test/itemMM.png`` and ``class_labels.txt`` (lines ``runNN/test/itemMM.png
    runNN/training/classKK.png``).  Returns ``(episodes, run_names)``: one 20-way 1-shot
    episode per run, support ``[R, 20, 1, S, S]`` with labels ``classMM → MM - 1`` and query
    ``[R, 20, 1, S, S]`` labelled through ``class_labels.txt``.  For evaluation only.  ``pixels``:
    as ``load_omniglot_images`` (the model's training images must be read the same way).
    """
    image_size = check_int("image_size", image_size, 1)
    pixels = _check_pixels(pixels)
    if not isinstance(path, (str, os.PathLike)):  # Path(None): "expected str, bytes or os.PathLike object"
        raise TypeError(f"path must be the official runs' zip or folder, got {type(path).__name__}")
    if os.fspath(path) == "":  # Path("") is the current folder (QA82)
        raise ValueError("the official runs' path is empty, which would read the current folder: give "
                         "all_runs.zip or its extracted folder")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"official runs {path} do not exist")
    if path.is_dir():
        names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
        read = lambda n: (path / n).read_bytes()  # noqa: E731
        zf = None
    elif zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        read = zf.read
    else:
        raise ValueError(f"official runs {path} is neither a folder nor a zip file")
    try:
        runs: Dict[str, str] = {}
        for n in names:
            parts = [p for p in n.split("/") if p]
            if len(parts) >= 2 and parts[-1] == "class_labels.txt" and _RUN.match(parts[-2]):
                if parts[-2] in runs:  # two copies of the runs: they collapsed into one silently (QA46)
                    raise ValueError(f"{path} holds {parts[-2]} twice ({runs[parts[-2]]} and {n}): give one copy "
                                     f"of the official runs")
                runs[parts[-2]] = n
        if not runs:
            raise ValueError(f"no runNN/class_labels.txt found in {path}: not the official runs layout")
        run_names = sorted(runs, key=lambda r: int(_RUN.match(r).group(1)))
        sx, sy, qx, qy = [], [], [], []
        for run in run_names:
            prefix = runs[run][: -len("class_labels.txt")]
            pairs = []
            for line in read(runs[run]).decode().splitlines():
                if line.strip():
                    fields = line.split()
                    if len(fields) != 2:
                        raise ValueError(f"{path}:{runs[run]}: expected 'test/itemNN.png training/classNN.png', got {line!r}")
                    pairs.append((fields[0].split("/")[-1], fields[1].split("/")[-1]))
            classes = sorted({c for _, c in pairs})
            train_files = sorted(n.split("/")[-1] for n in names
                                 if n.startswith(prefix + "training/") and n.endswith(".png"))
            if train_files != classes or len(classes) < 2:
                raise ValueError(f"{path}:{run}: class_labels.txt names {classes} but training/ holds "
                                 f"{train_files}")
            label = {c: i for i, c in enumerate(classes)}
            sx.append(torch.stack([decode_grey(read(prefix + "training/" + c), image_size, name=f"{run}/training/{c}",
                                               pixels=pixels)
                                   for c in classes]))
            sy.append(torch.arange(len(classes)))
            qx.append(torch.stack([decode_grey(read(prefix + "test/" + t), image_size, name=f"{run}/test/{t}",
                                               pixels=pixels)
                                   for t, _ in pairs]))
            qy.append(torch.tensor([label[c] for _, c in pairs]))
    except (KeyError, FileNotFoundError) as exc:  # a zip's KeyError, a folder's FileNotFoundError (QA46)
        missing = exc.args[0] if isinstance(exc, KeyError) else exc.filename
        raise ValueError(f"{path}: a file named in class_labels.txt is missing: {missing!r}") from None
    finally:
        if zf is not None:
            zf.close()
    ways = {len(s) for s in sy} | {len(q) for q in qy}
    if len(ways) != 1:
        raise ValueError(f"{path}: runs have different numbers of classes or test items: {sorted(ways)}")
    support = TaskBatch(torch.stack(sx).unsqueeze(2), torch.stack(sy))
    query = TaskBatch(torch.stack(qx).unsqueeze(2), torch.stack(qy))
    return Episodes(support, query, len(sy[0])), run_names
