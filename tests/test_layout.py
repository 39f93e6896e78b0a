"""The package's shape: no import cycles inside sgpo_jax, no private name imported across
modules, and importing the package has no side effects (checked with ``ast``, independently of
how Python resolves imports at run time)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sgpo_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules):
    """``[(imported module, [names], line)]`` of every sgpo_jax import in the file, function-level
    imports included; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("sgpo_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sgpo_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in modules else (node.module, [alias.name], node.lineno))
    return found


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, _, _ in _imports(path, modules):
            # importing a.b.c runs a/__init__, a.b/__init__ and a.b.c
            parts = module.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # a package's own ancestors run before it anyway: not an edge
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and t not in ancestors}
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_detects_a_cycle():
    """The checker itself: a planted cycle is found, an acyclic graph passes."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30  # every module was parsed
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for module, names, line in _imports(path, modules):
            for imported in names + [module.rsplit(".", 1)[-1]]:
                if imported.startswith("_") and not imported.startswith("__"):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}.{imported}")
    assert not offenders, "\n".join(offenders)


def test_importing_the_package_has_no_side_effects():
    """No device, no absl flags, no distributed runtime, no file written by any module import."""
    names = sorted(n for n in _modules() if n != "sgpo_jax.__main__")
    code = ("import sys, importlib\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "import jax\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, 'a module import initialized a JAX backend'\n"
            "from absl import flags\n"
            "assert 'workdir' not in flags.FLAGS, 'a module import defined the CLI flags'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
