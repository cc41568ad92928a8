"""Compiling small generated C programs once and caching them on disk: the C compiler, the cache
folder, and ``load_library`` (compile or load, then ``ctypes``).

Used by ``native_step`` (the whole meta-step) and ``native_select`` (the minibatch plan's
selection).  A library is named by a hash of its source, the compiler's identity, its flags and
the CPU's feature flags (``-march=native`` depends on them), so a later process loads it in
milliseconds; files are written to a temporary name and renamed, so concurrent processes never
load a half-written library, and each ends in a digest of its name and bytes that is checked
before it is loaded, so a truncated, damaged or foreign file is compiled afresh instead.  Nothing
here runs at import.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["NativeCompilerError", "find_compiler", "cache_dir", "load_library", "library_key"]

#: part of every cache key: bump when the way libraries are built changes meaning
#: (2: the digest trailer and -fno-fast-math, QA85)
_BUILD_VERSION = 2
# -O2: the products are written with explicit vectors, -O2 vectorises the elementwise loops
# (activations) and compiles ~25 % faster than -O3, which ran no faster here; -march=native:
# this CPU's vector width (the CPU's flags are in the cache key); -ffp-contract=fast: a·b + c as
# one fused multiply-add where the CPU has one; no -ffast-math: nothing is reassociated and
# NaN/inf survive.  -fno-fast-math -fno-unsafe-math-optimizations (the compiler's defaults, the
# same code) undo such words in $CC (``CC="gcc -ffast-math"``): they changed the program's numbers,
# and GCC linked crtfastmath.o into the library, whose loading set flush-to-zero for the whole
# process, torch's arithmetic included (QA85).  They come before -fno-math-errno, which
# -fno-fast-math would undo.
_FLAGS = ("-O2", "-march=native", "-fPIC", "-shared", "-fno-fast-math", "-fno-unsafe-math-optimizations",
          "-fno-math-errno", "-fno-strict-aliasing", "-ffp-contract=fast", "-std=gnu99")
_FLAGS_PORTABLE = ("-O2", "-fPIC", "-shared", "-fno-fast-math", "-fno-unsafe-math-optimizations",
                   "-fno-math-errno", "-fno-strict-aliasing", "-std=gnu99")
#: what ends every cached library: this, then the SHA-256 of its file name and the bytes before it
_TRAILER = b"reptile_fast-sha256:"


class NativeCompilerError(RuntimeError):
    """No working C compiler, or it failed on the generated program (the message says which)."""


class _CompilerHung(NativeCompilerError):
    """The compiler ran past its time limit: no use trying it again in this process."""


# ----------------------------------------------------------------------------- environment
def find_compiler() -> Optional[str]:
    """The C compiler to use: ``$CC`` if set (its first word, found on PATH; further words are
    passed as arguments), else the first of cc, gcc, clang on PATH."""
    env = os.environ.get("CC")
    if env and shlex.split(env):
        return shutil.which(shlex.split(env)[0])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_extra_args() -> List[str]:
    """Words after the first in ``$CC`` (e.g. ``CC="gcc -m64"``)."""
    env = os.environ.get("CC")
    return shlex.split(env)[1:] if env else []


def cache_dir() -> Path:
    """Where compiled programs live: ``$REPTILE_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/reptile_fast``,
    else ``~/.cache/reptile_fast``."""
    env = os.environ.get("REPTILE_FAST_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reptile_fast"


def _private(path: Path) -> bool:
    """Whether ``path`` (in the shared temporary directory) is ours alone: owned by this user and
    writable by nobody else.  Its libraries are loaded into this process, and its name is
    predictable, so another user could otherwise create it first and plant a library there."""
    if not hasattr(os, "getuid"):
        return True
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _noexec(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted noexec, where a library does not load ("failed
    to map segment"): each run compiled twice there and then fell back to ``torch.compile`` (QA85)."""
    flag = getattr(os, "ST_NOEXEC", 0)
    try:
        return bool(flag and os.statvfs(path).f_flag & flag)
    except OSError:
        return False


def _usable_cache_dir() -> Path:
    """``cache_dir()`` if it can be created and written (and libraries there can be loaded: not on a
    file system mounted noexec), else a per-user folder in the temporary directory (e.g. a read-only
    home): the program still compiles once per machine boot."""
    shared = Path(tempfile.gettempdir()) / f"reptile_fast-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    noexec = []
    for path in (cache_dir(), shared):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path == shared and not _private(path):
                continue
            if _noexec(path):
                noexec.append(str(path))
                continue
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    if noexec:
        raise NativeCompilerError(f"no usable cache directory: {', '.join(noexec)} (mounted noexec: compiled "
                                  f"libraries there cannot be loaded; set REPTILE_FAST_CACHE_DIR to a folder on "
                                  f"another file system)")
    raise NativeCompilerError(f"no writable cache directory ({cache_dir()} nor the temporary directory)")


def _cpu_identity() -> str:
    """The CPU's model and feature flags (``-march=native`` depends on them)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    parts.append(line.strip())
                if len(parts) > 6:
                    break
    except OSError:
        pass
    return "\n".join(parts)


_COMPILER_IDS = {}


def _compiler_identity(cc: str) -> str:
    """``cc --version``'s first line (cached per process, and so is a compiler that does not answer:
    one that hangs cost its 30 s time limit once per library, QA85)."""
    if cc not in _COMPILER_IDS:
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
            _COMPILER_IDS[cc] = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else cc
        except (OSError, subprocess.SubprocessError) as exc:
            _COMPILER_IDS[cc] = NativeCompilerError(f"the C compiler {cc} does not run: {exc}")
    if isinstance(_COMPILER_IDS[cc], NativeCompilerError):
        raise _COMPILER_IDS[cc]
    return _COMPILER_IDS[cc]


# ----------------------------------------------------------------------------- compiled libraries
def library_key(source: str, cc: str, flags: Sequence[str]) -> str:
    """The cache key of ``source`` compiled by ``cc`` with ``flags`` on this CPU."""
    h = hashlib.sha256()
    for part in (source, _compiler_identity(cc), os.path.realpath(cc),
                 " ".join(_compiler_extra_args() + list(flags)),
                 _cpu_identity(), sys.platform, str(_BUILD_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _compile_timeout(source: str) -> float:
    """Seconds a compile may take before the compiler counts as hung: 60 plus one per 5,000
    characters of C (the seed's program, 70,000 characters, compiles in 0.75 s; a 2.2-million-
    character one, hidden width 1024 in fp64, in 43 s on a 2-core Xeon).  A fixed 300 s, tried with
    both flag sets for both of the sine job's libraries, kept a job with a hung ``$CC`` silent for
    20 minutes after "about 1 s" (QA85)."""
    return 60.0 + len(source) / 5000


def _digest(path: Path, library: bytes) -> bytes:
    """The digest that ends the library ``library`` cached as ``path``: of its name (the program's
    key) and its bytes."""
    return hashlib.sha256(path.name.encode() + b"\0" + library).digest()


def _intact(path: Path) -> bool:
    """Whether ``path`` is a whole library as ``_compile`` wrote it under this name: its bytes end in
    their digest.  Checked before ``dlopen``: a truncated library (a crash before the disk had it
    all, a partial copy) killed the process with SIGBUS inside ``dlopen``, a damaged one ran as
    code (SIGILL, SIGSEGV or wrong numbers), and a foreign one without the function stayed in the
    cache for good (QA85).  False when it is absent or unreadable."""
    n = len(_TRAILER) + 32
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) > n and data[-n:-32] == _TRAILER and _digest(path, data[:-n]) == data[-32:]


def _compile(source: str, cc: str, flags: Sequence[str], path: Path) -> None:
    """Compile ``source`` into the shared library ``path`` (written under a temporary name, then
    renamed: a concurrent process never loads a half-written file), its digest appended."""
    with tempfile.TemporaryDirectory(prefix="reptile_fast_cc_") as tmp:
        src = Path(tmp) / "program.c"
        src.write_text(source)
        out = Path(tmp) / "program.so"
        cmd = [cc, *_compiler_extra_args(), *flags, str(src), "-o", str(out), "-lm"]
        timeout = _compile_timeout(source)
        try:  # stdin: a compiler that reads it must not wait for the user's terminal
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise _CompilerHung(f"{os.path.basename(cc)} did not finish within {timeout:.0f} s "
                                f"(a compile takes about 1 s; check $CC)") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeCompilerError(f"{' '.join(cmd)}: {exc}") from exc
        if res.returncode != 0 or not out.exists():
            msg = (res.stderr or res.stdout or "").strip().splitlines()
            raise NativeCompilerError(f"{os.path.basename(cc)} {' '.join(flags)} failed: "
                                      f"{msg[0] if msg else 'exit ' + str(res.returncode)}"
                                      f"{'' if res.returncode else ' without writing the library'}")
        try:  # (the cache folder removed meanwhile, no inodes left: a bare OSError crashed fit, QA45)
            fd, tmp_dst = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
        except OSError as exc:
            raise NativeCompilerError(f"cannot write in {path.parent}: {exc}") from exc
        try:
            data = out.read_bytes()
            with os.fdopen(fd, "wb") as f:
                f.write(data + _TRAILER + _digest(path, data))
            os.chmod(tmp_dst, 0o755)
            os.replace(tmp_dst, path)
        except BaseException as exc:  # a full disk, or Ctrl-C: no .tmp file left behind (QA85)
            Path(tmp_dst).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise NativeCompilerError(f"cannot write {path}: {exc}") from exc
            raise


_HUNG = {}  # (compiler, its $CC arguments) -> the error of a compile that ran past its time limit


def load_library(source: str, prefix: str, *, progress: Optional[Callable[[str], None]] = None,
                 what: str = "a native helper") -> Tuple[ctypes.CDLL, Path, bool]:
    """``source`` compiled (this CPU's flags, else portable ones) and loaded: ``(library, path,
    cache_hit)``.  Loaded from ``cache_dir()`` when compiled before; a cached file that is not whole
    (``_intact``) or does not load is compiled afresh.  ``progress(message)`` is told before a compile.
    NativeCompilerError when there is no compiler or every attempt fails (the message says why)."""
    cc = find_compiler()
    if cc is None:
        env = os.environ.get("CC", "")
        if env.strip():  # the user named one: say which, not "set CC" (QA66)
            raise NativeCompilerError(f"$CC={env!r} names no program found on PATH (fix it, or unset CC to use "
                                      f"cc, gcc or clang)")
        raise NativeCompilerError("no C compiler found (set CC, or install gcc or clang)")
    hung = _HUNG.get((cc, tuple(_compiler_extra_args())))
    if hung is not None:  # waiting for it again (the next library, the portable flags) helps nobody
        raise NativeCompilerError(f"{hung} (earlier in this process)")
    errors = []
    directory = _usable_cache_dir()
    for flags in (_FLAGS, _FLAGS_PORTABLE):
        # absolute: dlopen searches the system's library path for a name without a slash, so a
        # relative REPTILE_FAST_CACHE_DIR (".") compiled every time and never loaded (QA45)
        path = Path(os.path.abspath(directory)) / f"{prefix}_{library_key(source, cc, flags)}.so"
        hit = _intact(path)  # absent, truncated, damaged or foreign: compiled afresh over it
        if not hit:
            if progress is not None:
                progress(f"compiling {what} with {os.path.basename(cc)} (first run only, about 1 s)")
            try:
                _compile(source, cc, flags, path)
            except _CompilerHung as exc:
                _HUNG[(cc, tuple(_compiler_extra_args()))] = exc
                errors.append(str(exc))
                break
            except NativeCompilerError as exc:
                errors.append(str(exc))
                continue
        try:
            return ctypes.CDLL(str(path)), path, hit
        except OSError as exc:
            errors.append(f"{path} does not load: {exc}")
            if not hit:
                path.unlink(missing_ok=True)  # what the compiler wrote does not load: not kept
                continue
        # a cache entry that does not load: drop it, compile afresh
        path.unlink(missing_ok=True)
        try:
            _compile(source, cc, flags, path)
            return ctypes.CDLL(str(path)), path, False
        except (NativeCompilerError, OSError) as exc:
            errors.append(str(exc))
            if isinstance(exc, _CompilerHung):
                _HUNG[(cc, tuple(_compiler_extra_args()))] = exc
                break
    raise NativeCompilerError("; ".join(errors))
