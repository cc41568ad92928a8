"""Checkpoints for exact resume, written atomically and loaded safely.

Atomic writes: a temporary file beside the target, flushed and fsync'ed, then renamed over it, so
a crash in the middle of a save never leaves a corrupt file behind.

A training checkpoint (``save_checkpoint``) holds everything needed to continue a run so that it
ends with exactly the parameters of an uninterrupted one: the trainer's state (model parameters
and buffers, outer-optimizer state, iteration, schedule length, hyper-parameters), every RNG in
play (the ``torch.Generator`` given to ``fit``, torch's global CPU RNG, CUDA's when initialised,
numpy's and Python's), the loss history and the caller's ``extra`` (e.g. the CLI job's config).
Everything is stored as tensors, lists, dicts, strings and numbers, so ``load_checkpoint`` reads
it with ``torch.load(weights_only=True)``: a checkpoint cannot run code.  Files are also checked
against the CRC-32 that torch's zip format stores for every record, so a truncated or
bit-flipped file is reported instead of loading wrong numbers.

Layout of a checkpoint directory: ``checkpoint.pt`` (the latest) and ``checkpoint.prev.pt`` (the
one before it, kept until the new one is in place).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .validation import check_loadable

__all__ = ["validate_checkpoint", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "CHECKPOINT_NAME", "PREVIOUS_NAME", "FORMAT", "VERSION",
           "save_checkpoint", "load_checkpoint", "restore_checkpoint", "resolve_checkpoint_path",
           "capture_rng_state", "restore_rng_state", "rng_state_problem", "prepare_directory", "prepare_checkpoint_directory",
           "removed_if_left_empty", "directory_lock", "DirectoryInUseError", "LOCK_NAME",
           "remove_stale_temporaries", "CheckpointReplacedWarning"]

PathLike = Union[str, os.PathLike]


class CheckpointReplacedWarning(UserWarning):
    """A new run (``fit`` at meta-step 0 without ``resume_from``) was given a ``checkpoint_dir``
    that already holds a checkpoint: its saves replace it (the CLI jobs print their own note)."""


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _write_failed(path: Path, exc: OSError, what: str = "") -> OSError:
    """``exc`` (a full disk, a read-only or unwritable directory, ...) as the same kind of
    ``OSError`` naming the file: torch and the OS name none, or a temporary (``[Errno 28] No space
    left on device``)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    kept = f"the existing {path.name} there is unchanged" if path.exists() else "nothing was written"
    return OSError(exc.errno, f"cannot write {path}{what}: {reason} ({kept})")


def _atomic_write(path: PathLike, write) -> Path:
    """Write through ``write(fileobj)`` into a temporary file beside ``path``, fsync, rename.

    An ``OSError`` on the way (a full disk, an unwritable directory) leaves ``path`` as it was and
    is raised as the same kind of ``OSError`` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise _write_failed(path, exc) from exc
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _strict_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None: strict JSON has no NaN token (Python's reader accepts
    one, most others refuse the whole file), and a diverged run's metrics must stay readable."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (non-finite floats as null), atomically."""
    return atomic_write_text(path, json.dumps(_strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------- directories
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
FORMAT = "reptile_fast.checkpoint"
VERSION = 1


def _as_path(path, what: str) -> Path:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if str(path) == "":
        raise ValueError(f"{what} must not be empty")
    return Path(path)


def prepare_directory(path: PathLike, what: str = "directory") -> Path:
    """Create ``path`` (and parents) if needed and check that files can be written into it.

    Raises ``NotADirectoryError`` when it (or a parent) is a file, ``PermissionError`` when it
    cannot be created or written, each naming the path.
    """
    path = _as_path(path, what)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} exists and is not a directory")
    if path.is_symlink() and not path.exists():
        # mkdir fails on it with FileExistsError, which would be blamed on a parent below
        raise NotADirectoryError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    try:
        for attempt in range(3):
            try:
                path.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                # a parent made a moment ago was removed again before its child was made: another
                # job that had counted it as its own new folder and stopped early
                # (``removed_if_left_empty``); make it again
                if attempt == 2:
                    raise
    except (FileExistsError, NotADirectoryError):
        # a parent that is a symbolic link to nothing: mkdir meets it as FileExistsError too
        dangling = next((p for p in path.parents if p.is_symlink() and not p.exists()), None)
        if dangling is not None:
            raise NotADirectoryError(f"cannot create {what} {path}: {dangling} is a symbolic link to "
                                     f"{os.readlink(dangling)}, which does not exist") from None
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        raise NotADirectoryError(f"cannot create {what} {path}: "
                                 f"{parent if parent is not None else 'a parent'} is a file, not a directory") from None
    except PermissionError:
        raise PermissionError(f"cannot create {what} {path}: permission denied") from None
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create {what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} is not writable")
    return path


@contextlib.contextmanager
def removed_if_left_empty(path: PathLike):
    """Within it, the folders that do not exist yet of ``path`` and its parents (made by
    ``prepare_directory`` inside) are removed again, deepest first, if the block raises while
    they are still empty: a job stopped by a mistyped data path or flag leaves no empty ``--out``
    behind.  ``os.rmdir`` removes only empty folders: nothing written is touched.  The folders
    are those of the path as the kernel resolves it (``os.path.realpath``: symlinks followed,
    ``..`` after them), so an existing folder reached through a missing one (``new/../mine``:
    ``new`` missing, ``mine`` the user's) is not taken for a new one."""
    try:
        p = Path(os.path.realpath(os.fspath(path)))
        new = [d for d in (p, *p.parents) if not d.exists() and not d.is_symlink()]
    except (TypeError, ValueError, OSError):  # a bad path: prepare_directory names it
        new = []
    try:
        yield
    except BaseException:
        for d in new:
            try:
                d.rmdir()
            except OSError:  # not empty (a checkpoint was written), or already gone
                break
        raise


def prepare_checkpoint_directory(path: PathLike, what: str = "checkpoint_dir") -> Path:
    """``prepare_directory``, and refuse a ``checkpoint.pt`` or ``checkpoint.prev.pt`` in it that is
    not a regular file (a directory there made the first save fail, after training up to it)."""
    path = prepare_directory(path, what)
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        f = path / name
        if (f.exists() or f.is_symlink()) and not f.is_file():
            kind = IsADirectoryError if f.is_dir() else ValueError
            raise kind(f"{what} {path}: {name} there is not a regular file; checkpoints are written under "
                       f"that name: move it away or choose another directory")
    return path


def resolve_checkpoint_path(path: PathLike) -> Path:
    """The checkpoint file for ``path``: a checkpoint file, or a directory holding ``checkpoint.pt``.

    Raises ``FileNotFoundError`` / ``PermissionError`` / ``ValueError`` naming the path.
    """
    path = _as_path(path, "checkpoint path")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        file = path / CHECKPOINT_NAME
        if not file.exists():
            previous = path / PREVIOUS_NAME
            if previous.is_file():
                # the latest was lost (deleted, or a crash between the two files' renames): the
                # one before it is the run's newest, and naming it saves the user a search (QA72)
                raise FileNotFoundError(f"no {CHECKPOINT_NAME} in directory {path}, but {previous} is there "
                                        f"(the checkpoint before the latest): resume from that file")
            raise FileNotFoundError(f"no checkpoint in directory {path}: expected {file} (written by "
                                    f"fit(checkpoint_dir=...) or `reptile-fast sine --out DIR`)")
        path = file
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"checkpoint {path} is not readable (permission denied)")
    return path


# ---------------------------------------------------------------------------------- RNG states
def capture_rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Every RNG state in play, in forms ``torch.load(weights_only=True)`` reads back.

    Returns a dict: ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, or None when CUDA
    is not initialised), ``numpy`` (dict of name, int64 ``[624]`` keys, pos, has_gauss,
    cached_gaussian), ``python`` (dict of version, int64 ``[625]`` internal state, gauss_next) and
    ``generator`` (``{"state": uint8 tensor, "device": str}`` or None).
    """
    import numpy as np

    _check_generator(generator)
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
        "generator": None if generator is None else {"state": generator.get_state(),
                                                     "device": str(generator.device)},
    }


def _check_generator(generator) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator`` or None (a string failed with an
    AttributeError for ``get_state`` or ``device``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_generator_compatible(rng: Mapping, generator: Optional[torch.Generator], source) -> None:
    _check_generator(generator)
    saved = rng.get("generator")
    if saved is not None and generator is None:
        raise ValueError(f"checkpoint {source} was written by a run that drew tasks from a "
                         f"torch.Generator: pass generator=torch.Generator(device='{saved['device']}') "
                         f"to resume it (its state is restored from the checkpoint)")
    if saved is None and generator is not None:
        raise ValueError(f"checkpoint {source} was written by a run that drew tasks from torch's "
                         f"global RNG (generator=None): resume it with generator=None")
    if saved is not None and torch.device(saved["device"]) != generator.device:
        raise ValueError(f"checkpoint {source} holds the state of a generator on {saved['device']}, "
                         f"but the generator given is on {generator.device}")


_NUMPY_KEYS = 624    # MT19937's state words (numpy's legacy RandomState)
#: byte sizes torch's CUDA generators take as a state: seed + Philox offset (16; 8, a seed alone,
#: torch still accepts); any other size fails in torch.cuda.set_rng_state_all / Generator.set_state
_CUDA_STATE_BYTES = (16, 8)
_PYTHON_STATE = 625  # random.getstate()'s internal tuple: 624 words and the position


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def rng_state_problem(rng: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with ``capture_rng_state``'s dict ``rng``, or None when every RNG can be set
    from it.  Checked before anything is restored: torch, numpy and ``random`` would otherwise
    fail deep inside (a RuntimeError, an IndexError) after the model had been replaced."""
    if not isinstance(rng, Mapping):
        return f"the RNG state is a {type(rng).__name__}, not a dict"
    cpu_size = torch.get_rng_state().numel()

    def bad_cpu_state(t) -> bool:
        return not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != cpu_size
    if bad_cpu_state(rng.get("torch")):
        return f"a malformed torch RNG state (expected a uint8 tensor of {cpu_size} bytes)"
    cuda_sizes = set(_CUDA_STATE_BYTES)
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this torch's own size, whatever it is
        cuda_sizes.add(torch.cuda.get_rng_state().numel())

    def bad_cuda_state(t) -> bool:
        return (not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1
                or t.numel() not in cuda_sizes)
    cuda = rng.get("cuda")
    if cuda is not None and (not isinstance(cuda, (list, tuple)) or any(bad_cuda_state(t) for t in cuda)):
        return "a malformed CUDA RNG state (expected a list of 16-byte uint8 tensors, one per device)"
    npst = rng.get("numpy")
    if (not isinstance(npst, Mapping) or npst.get("name") != "MT19937"
            or not isinstance(npst.get("keys"), torch.Tensor) or tuple(npst["keys"].shape) != (_NUMPY_KEYS,)
            or npst["keys"].is_floating_point() or npst["keys"].is_complex()
            or not _is_int(npst.get("pos")) or not 0 <= npst["pos"] <= _NUMPY_KEYS
            or npst.get("has_gauss") not in (0, 1) or not isinstance(npst.get("cached_gaussian"), (int, float))):
        return f"a malformed numpy RNG state (expected MT19937 with {_NUMPY_KEYS} integer keys)"
    pyst = rng.get("python")
    if (not isinstance(pyst, Mapping) or not _is_int(pyst.get("version"))
            or not isinstance(pyst.get("internal"), torch.Tensor) or tuple(pyst["internal"].shape) != (_PYTHON_STATE,)
            or pyst["internal"].is_floating_point() or pyst["internal"].is_complex()
            or not (pyst.get("gauss_next") is None or isinstance(pyst["gauss_next"], (int, float)))):
        return f"a malformed Python RNG state (expected {_PYTHON_STATE} integers)"
    try:
        random.Random().setstate((int(pyst["version"]), tuple(int(v) for v in pyst["internal"].tolist()),
                                  pyst["gauss_next"]))
    except (ValueError, TypeError, OverflowError) as exc:
        return f"a malformed Python RNG state ({exc})"
    gen = rng.get("generator")
    if gen is not None:
        if not isinstance(gen, Mapping) or not isinstance(gen.get("state"), torch.Tensor) \
                or gen["state"].dtype != torch.uint8 or not isinstance(gen.get("device"), str):
            return "a malformed generator state"
        try:
            device = torch.device(gen["device"])
        except (RuntimeError, ValueError):
            return f"a generator state on an unknown device {gen['device']!r}"
        if device.type == "cpu" and bad_cpu_state(gen["state"]):
            return f"a malformed generator state (expected a uint8 tensor of {cpu_size} bytes)"
        if device.type == "cuda" and bad_cuda_state(gen["state"]):
            return "a malformed generator state (expected a uint8 tensor of 16 bytes for a CUDA generator)"
    return None


def restore_rng_state(state: Mapping[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Set every RNG from ``capture_rng_state``'s dict (``generator``'s too, when saved).

    Raises ``ValueError`` naming the problem, before setting any RNG, for a malformed state."""
    import numpy as np

    problem = rng_state_problem(state)
    if problem is not None:
        raise ValueError(f"the RNG state to restore has {problem}")
    _check_generator_compatible(state, generator, "state")
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(saved)} devices but "
                          f"{torch.cuda.device_count()} are visible: CUDA RNGs not restored")
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    pyst = state["python"]
    random.setstate((int(pyst["version"]), tuple(int(v) for v in pyst["internal"].tolist()),
                     pyst["gauss_next"]))
    if generator is not None:
        generator.set_state(state["generator"]["state"])


# ---------------------------------------------------------------------------------- save
def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` an exact copy of ``src`` atomically (a hard link where the filesystem allows)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


#: the file a run holds (``flock``) while it saves into a checkpoint directory
LOCK_NAME = ".reptile_fast.lock"


class DirectoryInUseError(OSError):
    """Another run holds the checkpoint directory (``directory_lock``)."""


def _lock_fd(path: str):
    """An fd holding ``flock(path)``, or None where locking is unavailable (no ``fcntl``, a folder
    we cannot write, a filesystem without ``flock``).  The lock file is removed by its holder when
    done, so a lock taken on a file already unlinked (opened just before that) holds nothing: the
    fd's inode is checked against the path's, and the open is retried."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a directory we cannot write: the save fails later, with its own message
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DirectoryInUseError(
                f"{os.path.dirname(path)} is in use by another run (pid {pid}) saving checkpoints there: two runs "
                f"in one folder would replace each other's checkpoints; wait for it to end, or use another folder"
            ) from None
        except OSError:  # flock unsupported here
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:  # removed meanwhile
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder's file, unlinked: take the new one
    return None


@contextlib.contextmanager
def directory_lock(directory: PathLike):
    """Hold ``directory/.reptile_fast.lock`` (an exclusive, non-blocking ``flock``) for the block:
    two runs saving into one folder replaced each other's checkpoints — a ``--resume`` continued
    whichever had saved last — and a run starting there deleted the other's save in flight as a
    stale temporary (QA72).  A second holder (another process, or another ``fit`` of this one) gets
    ``DirectoryInUseError`` naming the first's pid; the lock file goes when the block ends.  Where
    ``flock`` is missing or unsupported (Windows, some network filesystems) the block runs
    unlocked, as before."""
    path = os.path.join(os.fspath(directory), LOCK_NAME)
    fd = _lock_fd(path)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):  # the folder as the run found it (an empty one is removed)
            os.unlink(path)
        os.close(fd)  # (releases the lock)


def remove_stale_temporaries(directory: PathLike) -> None:
    """Delete temporaries a killed writer left in a checkpoint directory (``.checkpoint.pt.*.tmp``).

    Only for a directory that one run owns (``directory_lock``): a concurrent writer's temporary
    would go too.
    """
    for pattern in (f".{CHECKPOINT_NAME}.*.tmp", f".{PREVIOUS_NAME}.*.tmp"):
        for stale in Path(directory).glob(pattern):
            try:
                stale.unlink()
            except OSError:
                pass


def save_checkpoint(directory: PathLike, trainer, *, generator: Optional[torch.Generator] = None,
                    history: Optional[Mapping[str, Any]] = None,
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``directory/checkpoint.pt`` atomically; the one it replaces becomes ``checkpoint.prev.pt``.

    Args:
        directory: created if missing.
        trainer: a ``Reptile`` (anything with ``state_dict()``).
        generator: the ``torch.Generator`` the run draws tasks and plans from, if any.
        history: e.g. ``{"loss": [...]}``, stored as float64 tensors.
        extra: the caller's data (tensors, dicts, lists, strings, numbers), returned by
            ``load_checkpoint`` under ``"extra"``.

    Returns the path of the checkpoint written.
    """
    # a Reptile: a plain nn.Module has a state_dict too, but not the trainer's (KeyError 'model')
    if not callable(getattr(trainer, "state_dict", None)) or not hasattr(trainer, "iteration"):
        raise TypeError(f"trainer must be a reptile_fast.Reptile (its state_dict() holds the model, the outer "
                        f"optimizer and the iteration), got {type(trainer).__name__}")
    directory = prepare_checkpoint_directory(directory, "checkpoint directory")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    # checked here: a list or a string failed with AttributeError ('items'), a list of strings with
    # torch's "too many dimensions 'str'"
    for what, value in (("history", history), ("extra", extra)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
        # keys are stored as strings: {1: "a", "1": "b"} came back as {"1": "b"}, an entry lost
        if value is not None and len({str(k) for k in value}) != len(value):
            raise ValueError(f"{what} has keys that are one key as strings (a checkpoint stores str(key)): "
                             f"{sorted(map(repr, value))[:6]}")
    curves = {}
    for k, v in (history or {}).items():
        try:
            curves[str(k)] = torch.as_tensor(list(v), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"history[{k!r}] must be a sequence of numbers, got {v!r:.80}") from None
    state = {
        "format": FORMAT,
        "version": VERSION,
        "trainer": trainer.state_dict(),
        "rng": capture_rng_state(generator),
        "history": curves,
        "extra": {str(k): v for k, v in (extra or {}).items()},
        "info": {"torch": str(torch.__version__), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    check_loadable(state, "checkpoint")
    # never replace the last good checkpoint with one that loading would refuse
    _validate(state, directory / CHECKPOINT_NAME)
    for name, value in state["trainer"]["model"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"model entry {name} holds NaN or inf values: not writing a checkpoint from it "
                             f"(the previous one in {directory} is kept)")
    if getattr(trainer, "outer_optimizer", None) is not None and state["trainer"]["outer_optimizer"] is not None:
        from .trainer_state import optimizer_state_problem

        problem = optimizer_state_problem(trainer.outer_optimizer, state["trainer"]["outer_optimizer"])
        if problem is not None:  # loading would refuse it
            raise ValueError(f"outer optimizer: {problem}; not writing a checkpoint from it (the previous one in "
                             f"{directory} is kept)")
    path = directory / CHECKPOINT_NAME
    if path.exists() and _intact(path):
        # Keep the previous checkpoint under its own name before the new one replaces it; the
        # latest name always points at a complete file (the rename below is atomic).  A damaged
        # latest is not kept: copied over checkpoint.prev.pt (the file a run resumes from when
        # its latest is damaged) it would leave no loadable checkpoint should this write fail.
        try:
            _link_or_copy(path, directory / PREVIOUS_NAME)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise _write_failed(directory / PREVIOUS_NAME, exc, f" (the copy of {CHECKPOINT_NAME} kept before it is "
                                                                f"replaced); {CHECKPOINT_NAME} is unchanged") from exc
    return atomic_torch_save(state, path)


def _intact(path: Path) -> bool:
    """Whether ``path`` is a readable archive whose records match their CRC-32 (one read of the
    file, which the last save left in the page cache: ~0.5 ms for a 37 KB sine checkpoint here)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError):
        return False


# ---------------------------------------------------------------------------------- load
def _fail(path, problem: str) -> ValueError:
    return ValueError(f"checkpoint {path} {problem}")


def _require(mapping: Mapping, key: str, types, path, where: str):
    if key not in mapping:
        raise _fail(path, f"is missing {where}{key!r}: it is not a complete reptile_fast checkpoint")
    value = mapping[key]
    if not isinstance(value, types):
        raise _fail(path, f"has {where}{key!r} of type {type(value).__name__}; expected "
                          f"{getattr(types, '__name__', None) or ' or '.join(t.__name__ for t in types)}")
    return value


def _validate(obj, path) -> Dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise _fail(path, f"is not a reptile_fast checkpoint: it holds a {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        hint = (" (a model.pt holds only the weights: load it with torch.load)" if "state_dict" in obj else "")
        raise _fail(path, f"is not a reptile_fast checkpoint: no 'format': {FORMAT!r} entry{hint}")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise _fail(path, f"has format version {version!r}; this reptile_fast reads versions 1..{VERSION}")
    trainer = _require(obj, "trainer", Mapping, path, "")
    model = _require(trainer, "model", Mapping, path, "trainer.")
    for k, v in model.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _fail(path, f"has a malformed model state entry {k!r}")
    opt = _require(trainer, "outer_optimizer", (Mapping, type(None)), path, "trainer.")
    if opt is not None and ("state" not in opt or "param_groups" not in opt):
        raise _fail(path, "has a malformed outer_optimizer state (needs 'state' and 'param_groups')")
    iteration = _require(trainer, "iteration", int, path, "trainer.")
    if isinstance(iteration, bool) or iteration < 0:
        raise _fail(path, f"has an invalid iteration {iteration!r}")
    _require(trainer, "total_iterations", (int, type(None)), path, "trainer.")
    _require(trainer, "config", Mapping, path, "trainer.")
    rng = _require(obj, "rng", Mapping, path, "")
    _require(rng, "torch", torch.Tensor, path, "rng.")
    npst = _require(rng, "numpy", Mapping, path, "rng.")
    pyst = _require(rng, "python", Mapping, path, "rng.")
    _require(rng, "generator", (Mapping, type(None)), path, "rng.")
    _require(rng, "cuda", (list, tuple, type(None)), path, "rng.")
    for key in ("name", "keys", "pos", "has_gauss", "cached_gaussian"):
        if key not in npst:
            raise _fail(path, f"has a malformed numpy RNG state (no {key!r})")
    for key in ("version", "internal", "gauss_next"):
        if key not in pyst:
            raise _fail(path, f"has a malformed Python RNG state (no {key!r})")
    problem = rng_state_problem(rng)
    if problem is not None:
        raise _fail(path, f"has {problem}")
    history = _require(obj, "history", Mapping, path, "")
    for k, v in history.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise _fail(path, f"has a malformed history entry {k!r}")
    _require(obj, "extra", Mapping, path, "")
    return dict(obj)


def validate_checkpoint(obj, name: str = "state") -> Dict[str, Any]:
    """``obj`` (a dict such as ``load_checkpoint``'s, e.g. rank 0's sent to the other ranks) as a
    checkpoint dict, after the checks a file's contents get; ``ValueError`` naming ``name``."""
    return _validate(obj, name)


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read and validate a checkpoint written by ``save_checkpoint``; tensors land on the CPU.

    ``path`` is a checkpoint file or a directory holding ``checkpoint.pt``.  Loading uses
    ``torch.load(weights_only=True)``, so a file cannot run code.  Raises ``FileNotFoundError``
    for a missing file, and ``ValueError`` naming the file and the problem for an empty,
    truncated, corrupted (CRC mismatch) or foreign file.

    Returns the checkpoint dict: ``trainer`` (``Reptile.state_dict()``), ``rng``
    (``capture_rng_state()``), ``history`` (name -> float64 ``[n]``), ``extra``, ``info``.
    """
    path = resolve_checkpoint_path(path)
    try:
        return _load_checked(path)
    except ValueError as exc:
        previous = path.with_name(PREVIOUS_NAME)
        if path.name == CHECKPOINT_NAME and previous.exists():
            raise ValueError(f"{exc}; the previous checkpoint {previous} may be intact: resume from "
                             f"that file") from None
        raise


def _load_checked(path: Path) -> Dict[str, Any]:
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "is empty (0 bytes): it was truncated, e.g. by an interrupted copy")
    try:
        if not zipfile.is_zipfile(path):
            raise _fail(path, f"is not a torch checkpoint archive ({size} bytes): truncated, corrupted "
                              f"or a different kind of file")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except ValueError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise _fail(path, f"is corrupted: its archive cannot be read ({exc})") from None
    if bad is not None:
        raise _fail(path, f"is corrupted: checksum mismatch in record {bad!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            reason = next((line.strip() for line in str(exc).splitlines() if "WeightsUnpickler" in line), "")
            raise _fail(path, "holds objects that safe loading (torch.load(weights_only=True)) refuses: "
                              f"it is not a reptile_fast checkpoint, and loading it could run code. {reason}") from None
        raise _fail(path, f"cannot be read (corrupted?): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged archives
        raise _fail(path, f"cannot be read (truncated or corrupted?): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return _validate(obj, path)


def restore_checkpoint(trainer, source, *, generator: Optional[torch.Generator] = None,
                       name: Optional[str] = None) -> Dict[str, Any]:
    """Load ``source`` (a path, or a dict from ``load_checkpoint``) into ``trainer`` and every RNG.

    Validates everything (file, model keys/shapes/dtypes, outer optimizer, RNG states, generator)
    before it changes anything.  ``name``: how messages call a dict ``source`` (default "state").
    Returns the checkpoint dict (its ``history`` and ``extra``).
    """
    # a Reptile: an nn.Module has load_state_dict too, but not the trainer's (torch's missing keys)
    if not callable(getattr(trainer, "load_state_dict", None)) or not hasattr(trainer, "iteration"):
        raise TypeError(f"trainer must be a reptile_fast.Reptile, got {type(trainer).__name__}")
    _check_generator(generator)
    if name is None:
        name = source if not isinstance(source, Mapping) else "state"
    ckpt = source if isinstance(source, Mapping) else load_checkpoint(source)
    if not isinstance(ckpt.get("trainer"), Mapping):  # a dict without one failed with KeyError 'trainer'
        raise ValueError(f"checkpoint {name} has no 'trainer' entry (the trainer's state_dict(), which "
                         f"load_checkpoint's dict holds)")
    problem = rng_state_problem(ckpt.get("rng"))
    if problem is not None:  # before the trainer changes (a file was checked by load_checkpoint)
        raise ValueError(f"checkpoint {name} has {problem}")
    _check_generator_compatible(ckpt["rng"], generator, name)
    trainer.load_state_dict(ckpt["trainer"])
    restore_rng_state(ckpt["rng"], generator)
    return ckpt
