"""QA85: the compiled backend's native program as a build and cache system (``native_build``):
damaged cache entries, a hung compiler, ``$CC`` words that change the arithmetic, a cache folder
mounted noexec, an interrupted write, a compiler that writes garbage.

Each test uses a one-function C program (the smallest there is) and its own cache folder.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reptile_fast import native_build

pytestmark = pytest.mark.skipif(native_build.find_compiler() is None, reason="no C compiler here")

SOURCE = "int rf_qa85(void) { return 85; }\n"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_build, "_HUNG", {}, raising=False)


def _compiled_copy(tmp_path, monkeypatch, edit):
    """The library compiled into one cache folder, then copied, edited by ``edit(bytes)``, into a
    second one that this process has not loaded anything from (``dlopen`` reuses a loaded path)."""
    _, first, _ = native_build.load_library(SOURCE, "qa85")
    second = tmp_path / "second"
    second.mkdir()
    (second / first.name).write_bytes(edit(first.read_bytes()))
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(second))
    return second / first.name


def test_a_damaged_cached_library_is_compiled_afresh_not_run(tmp_path, monkeypatch):
    """One flipped bit in the code (``return 85`` -> ``return 87``): the library still loads, and
    before QA85 it was run from the cache, a wrong answer (other bytes: SIGILL, SIGSEGV)."""
    def flip(data):
        at = data.index(b"\xb8\x55\x00\x00\x00") if b"\xb8\x55\x00\x00\x00" in data else None
        if at is None:
            pytest.skip("the compiler did not write `mov $85, %eax` (another architecture or compiler)")
        return data[:at + 1] + b"\x57" + data[at + 2:]

    path = _compiled_copy(tmp_path, monkeypatch, flip)
    lib, loaded, hit = native_build.load_library(SOURCE, "qa85")
    assert loaded == path and hit is False
    assert lib.rf_qa85() == 85


def test_a_foreign_library_at_the_cached_name_is_compiled_afresh(tmp_path, monkeypatch):
    """A valid library of another program under this program's name: before QA85 it was loaded and
    the function was missing (AttributeError: native_select's caller crashed; the meta-step fell
    back to torch.compile in every later run)."""
    other, _, _ = native_build.load_library("int rf_other(void) { return 1; }\n", "qa85other")
    foreign = Path(other._name).read_bytes()
    _compiled_copy(tmp_path, monkeypatch, lambda data: foreign)
    lib, _, hit = native_build.load_library(SOURCE, "qa85")
    assert hit is False and lib.rf_qa85() == 85


def test_a_truncated_cached_library_does_not_kill_the_process(tmp_path, monkeypatch):
    """A library cut short (a crash before the disk had it all, a partial copy): before QA85
    ``dlopen`` mapped it and the process died of SIGBUS (in a child process here)."""
    path = _compiled_copy(tmp_path, monkeypatch, lambda data: data[:1000])
    code = textwrap.dedent(f"""
        from reptile_fast import native_build
        lib, path, hit = native_build.load_library({SOURCE!r}, "qa85")
        print(lib.rf_qa85(), hit, path)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    assert res.stdout.split() == ["85", "False", str(path)]


def test_cc_words_cannot_make_the_library_fast_math(tmp_path, monkeypatch):
    """``CC="gcc -ffast-math"``: before QA85 the program was compiled fast-math (``x != x`` folded
    to false: NaN not seen; the meta-step's numbers changed) and GCC linked crtfastmath.o, whose
    loading set flush-to-zero for the whole process (torch's subnormals became 0).  In a child
    process: that setting cannot be undone here."""
    code = textwrap.dedent("""
        import ctypes, torch
        from reptile_fast import native_build
        tiny = torch.tensor([1e-40], dtype=torch.float32)
        lib, _, _ = native_build.load_library("int rf_is_nan(double x) { return x != x; }\\n", "qa85nan")
        lib.rf_is_nan.argtypes = [ctypes.c_double]
        print(lib.rf_is_nan(float("nan")), float(tiny * 1.5) > 0)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               CC=f"{native_build.find_compiler()} -ffast-math")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["1", "True"]


_REAL_CC = native_build.find_compiler()


def _fake_run(calls, hang):
    """``subprocess.run`` where the compiler ``qa85cc`` is the real one, except that its
    ``hang`` call ("compile" or "version") is charged its whole time limit at once."""
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        if os.path.basename(cmd[0]) != "qa85cc":
            return real(cmd, *args, **kwargs)
        if hang == ("version" if "--version" in cmd else "compile"):
            calls.append(kwargs.get("timeout"))
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return real([_REAL_CC, *cmd[1:]], *args, **kwargs)
    return run


@pytest.mark.parametrize("hang", ["compile", "version"])
def test_a_hung_compiler_is_waited_for_once_per_process(tmp_path, monkeypatch, hang):
    """A ``$CC`` that never finishes (here: each call charged its time limit at once): before QA85
    the sine job waited 4 × 300 s (both flag sets, both of its libraries) after "about 1 s", or
    2 × 30 s for one that hung on ``--version``.  Now the first time limit gives it up for the
    process, and a small program's limit is 60 s plus its size."""
    fake = tmp_path / "qa85cc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(native_build, "_COMPILER_IDS", {})
    calls = []
    monkeypatch.setattr(native_build.subprocess, "run", _fake_run(calls, hang))
    with pytest.raises(native_build.NativeCompilerError, match="did not finish|does not run"):
        native_build.load_library(SOURCE, "qa85")
    with pytest.raises(native_build.NativeCompilerError):
        native_build.load_library("int rf_two(void) { return 2; }\n", "qa85two")
    assert len(calls) == 1, calls
    assert calls[0] <= (61 if hang == "compile" else 30)


def test_a_cache_folder_mounted_noexec_is_passed_over(tmp_path, monkeypatch):
    """Libraries on a noexec file system do not load ("failed to map segment"): before QA85 every
    run compiled twice there and fell back to torch.compile (10-25 s)."""
    cache = tmp_path / "cache"
    real_statvfs = os.statvfs

    class NoExec:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            if name == "f_flag":
                return self.st.f_flag | getattr(os, "ST_NOEXEC", 0)
            return getattr(self.st, name)

    def statvfs(path):
        st = real_statvfs(path)
        return NoExec(st) if Path(path) == cache else st

    if not getattr(os, "ST_NOEXEC", 0):
        pytest.skip("no ST_NOEXEC on this platform")
    monkeypatch.setattr(native_build.os, "statvfs", statvfs)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    _, path, _ = native_build.load_library(SOURCE, "qa85")
    assert path.parent.parent == tmp_path / "tmp"
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(cache.parent))
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "reptile_fast-x"))  # both noexec
    monkeypatch.setattr(native_build.os, "statvfs", lambda p: NoExec(real_statvfs(p)))
    with pytest.raises(native_build.NativeCompilerError, match="noexec"):
        native_build.load_library(SOURCE, "qa85")


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C while the library is being put in place: before QA85 its ``.tmp`` stayed in the cache."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(native_build.os, "chmod", interrupt)
    with pytest.raises(KeyboardInterrupt):
        native_build.load_library(SOURCE, "qa85")
    assert list((tmp_path / "cache").iterdir()) == []


def test_what_a_garbage_writing_compiler_wrote_is_not_kept(tmp_path, monkeypatch):
    """A ``$CC`` that exits 0 with junk for a library: the error says it does not load, and the
    junk is not left in the cache under the library's name (before QA85 both files stayed)."""
    fake = tmp_path / "garbage-cc"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo garbage-cc 1; exit 0; }\n'
                    'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                    'echo "not a library" > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(native_build.NativeCompilerError, match="does not load"):
        native_build.load_library(SOURCE, "qa85")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
