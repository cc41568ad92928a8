"""What a newcomer sees (issue 15): the README's test command is what CI runs, ``--version``
names the versions, and a first run of the main job says what it is doing during its long steps
(compiling the program on a fresh machine, the evaluation) instead of a silent terminal."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reptile_fast
from reptile_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _bash_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)
    assert len(section) == 2, f"README.md has no {heading!r} section"
    match = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert match, f"no bash block under {heading!r}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = _bash_block_after("## Run the tests")
    assert "pytest" in command and "pip install" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f".ci/run does not run the README's {command!r}"


def test_version_names_package_torch_and_triton():
    setup_version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert reptile_fast.__version__ == setup_version  # one version, whichever file a reader looks at
    out = subprocess.run([sys.executable, "-m", "reptile_fast", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"reptile-fast {setup_version} (")
    assert f"torch {torch.__version__.split('+')[0]}" in line
    assert "triton " in line


def test_first_run_announces_compile_and_evaluation(tmp_path, monkeypatch, capsys):
    """With an empty program cache (a fresh machine), the default sine job prints that it is
    compiling, and then that it is evaluating, before each of those steps."""
    from reptile_fast.native_build import find_compiler

    if find_compiler() is None:
        pytest.skip("no C compiler: the job falls back (loudly) to another path")
    import reptile_fast.compiled_step as cs

    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    # a fresh process: no program built by an earlier test in this one (the in-memory cache)
    monkeypatch.setattr(cs, "_PROGRAMS", {})
    rc = main(["sine", "--iterations", "20", "--eval-tasks", "4", "--eval-steps", "5", "--seed", "0",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    compiling, evaluating = said.find("compiling"), said.find("evaluating on 4 held-out tasks")
    assert compiling >= 0, said[-2000:]
    assert evaluating > compiling, said[-2000:]
