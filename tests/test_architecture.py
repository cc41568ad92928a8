"""The package's shape: no import cycle (imports inside functions included), nothing below the
trainer imports the trainer, and bench/ uses public names only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reptile_fast"


def _modules():
    """module name -> file, for every module of reptile_fast (the kernels link included)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = ["reptile_fast", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules) -> set:
    """The reptile_fast modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and target != "reptile_fast":
                found.add(target)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_below_the_trainer_imports_it():
    modules = _modules()
    above = {"reptile_fast", "reptile_fast.trainer", "reptile_fast.dropin", "reptile_fast.jobs",
             "reptile_fast.cli", "reptile_fast.__main__", "reptile_fast.distributed", "reptile_fast.fewshot",
             "reptile_fast.fewshot_job"}
    offenders = [name for name, path in modules.items()
                 if name not in above and "reptile_fast.trainer" in _imports(name, path, modules)]
    assert not offenders, f"modules below the trainer import it: {offenders}"


def test_bench_uses_public_names_only():
    """No ``from reptile_fast... import _private`` and no ``module._private`` of reptile_fast in bench/."""
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reptile_fast"):
                for a in node.names:
                    if a.name.startswith("_"):
                        offenders.append(f"{path.name}: imports {a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname or a.name for a in node.names if a.name.startswith("reptile_fast"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and (base.id in aliases or base.id == "reptile_fast"):
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "bench/ uses private names:\n" + "\n".join(offenders)


def test_no_test_module_switches_on_the_interpreter_unconditionally():
    """Only a condition may set ``TRITON_INTERPRET`` at a module's top level in tests/ and bench/
    (conftest: when there is no CUDA).  An unconditional ``os.environ.setdefault(...)`` in a test
    module ran at collection on an H200 and switched every kernel imported after it to the
    interpreter, so the CUDA cases failed inside it (bench/results/gpu-h200-2026-12-04-s16/
    pytest-gpu/pytest_gpu_first_try_interpreter_leak.log)."""
    offenders = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Expr, ast.Assign)) and "TRITON_INTERPRET" in ast.unparse(node) \
                    and "environ" in ast.unparse(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"set TRITON_INTERPRET only under a condition: {offenders}"
