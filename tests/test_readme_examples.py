"""The README as a newcomer uses it: its first Python API example runs (with shortened counts),
and every results file the READMEs cite exists in bench/results/."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
READMES = [ROOT / "README.md", ROOT / "bench" / "README.md"]

# The README's sizes and the shortened ones this test runs (each must occur exactly once).
SHORTEN = [
    ("iterations=1000", "iterations=20"),
    ("Sine().sample(200,", "Sine().sample(20,"),
    ("steps=160)", "steps=10)"),
]


def first_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)
    assert len(section) == 2, "README.md has no '## Python API' section"
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match, "no python block under '## Python API'"
    return match.group(1)


def test_first_api_example_runs():
    code = first_api_example()
    for old, new in SHORTEN:
        assert code.count(old) == 1, f"the example no longer contains {old!r}: update SHORTEN"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md:Python API", "exec"), namespace)  # noqa: S102 - the README's own code
    tasks, post, trainer = namespace["tasks"], namespace["post"], namespace["trainer"]
    assert tuple(tasks.x.shape) == (20, 50, 1) and tuple(tasks.y.shape) == (20, 50, 1)  # "x, y: [200, 50, 1]"
    assert tuple(post.shape) == (20,)                                                  # "per-task MSE [200]"
    assert torch.isfinite(post).all() and (post >= 0).all()
    assert trainer.iteration == 20


def cited_results() -> list:
    """(readme, citation, paths) for every bench/results file the READMEs name: full paths
    ``bench/results/...``, bare file names of results files (``*_cpu*.json``, ``triton-*.json``,
    ``cpu-*.md``), ``{a,b}`` alternatives and ``…-suffix`` abbreviations; placeholders in
    ``<...>`` are skipped."""
    found = []
    for readme in READMES:
        text = readme.read_text()
        names = set(re.findall(r"bench/results/((?:\{[^}]*\}|[^\s`'\"),;:{])+)", text))
        names |= set(re.findall(r"`([\w.-]*(?:_cpu|triton-|cpu-amd)[\w.{},…-]*\.(?:json|md|png))`", text))
        names |= set(re.findall(r"`(…[\w.-]+\.(?:json|md|png))`", text))
        for name in sorted(names):
            name = name.rstrip(".")
            if "<" in name:
                continue
            alternatives = re.match(r"(.*)\{([^}]*)\}(.*)", name)
            variants = ([alternatives.group(1) + a + alternatives.group(3)
                         for a in alternatives.group(2).split(",")] if alternatives else [name])
            for v in variants:
                if v.startswith("…"):
                    paths = [p for p in RESULTS.iterdir() if p.name.endswith(v[1:])]
                else:
                    paths = [RESULTS / v]
                found.append((readme.relative_to(ROOT), v, paths))
    return found


def test_readmes_cite_results():
    assert len(cited_results()) >= 30  # the parser still sees the citations


@pytest.mark.parametrize("readme,citation,paths", cited_results(), ids=lambda x: str(x)[:60])
def test_cited_results_file_exists(readme, citation, paths):
    assert paths and all(p.exists() for p in paths), f"{readme} cites {citation}, which is not in bench/results/"
