"""The package's import structure: every module imports on its own, the layers of `LAYERS`
import only downward, and no chain of imports leads from a module back to itself.

Imports are read with `ast`, anywhere in a module (inside functions too: a function-local
import hides a cycle from the interpreter, not from the design), and so are the module
names a package's lazy `__getattr__` loads (`infmoe.lazy`), which are string constants.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

PACKAGE = "infmoe"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
# The extra `hf` (pyproject.toml): a module that needs it may be unimportable in a base install.
OPTIONAL = {"transformers", "datasets", "lm_eval"}

# Bottom to top, by top-level module or subpackage of infmoe ("__init__": the package's own,
# which re-exports from below). A module may import from its own layer and the layers below,
# never from above; every module must have a layer. Within a layer the cycle check decides:
# infmoe.hf.export → infmoe.loading → infmoe.hf.reading.
LAYERS = [
    ("errors", "lazy"),
    ("io", "randomness", "device", "markdown", "deprecation"),  # small helpers, torch at most
    ("layers",),
    ("models",),
    ("data",),
    ("checkpoint", "params", "generation"),  # a model's file, size and sampling
    ("hf", "loading"),  # every MODEL a command takes, and the Hugging Face format
    ("evaluation",),  # loss, K sweep, zero-shot, routing report of a trained model
    ("training",),  # evaluates on validation batches while it trains
    ("experiments", "bench"),  # grids of training runs; timings of the layers and training steps
    ("cli",),
    ("launch",),
    ("train", "__main__", "__init__"),
]


def module_names() -> dict[str, Path]:
    """Every module of the package (dotted name → source file)."""
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the package that importing `name` binds: the longest dotted prefix that
    is one (``infmoe.layers.sampling`` → ``infmoe.layers``); None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names}  # a submodule, or a name in base
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            found |= {node.value} & modules.keys()  # importlib.import_module("infmoe.x"), lazy re-exports
    resolved = {_resolve(name, modules) for name in found if name.split(".")[0] == PACKAGE}
    return resolved - {None, module}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    modules = module_names()
    return {module: frozenset(imports_of(module, modules)) for module in modules}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, members in enumerate(LAYERS):
        if key in members:
            return index
    raise AssertionError(f"{module} has no layer: add {key!r} to LAYERS in {Path(__file__).name}")


def upward_imports(graph: dict[str, frozenset[str]]) -> list[str]:
    """One line per import of a higher layer."""
    return [f"{source} (layer {layer_of(source)}: {'/'.join(LAYERS[layer_of(source)])}) imports {target} "
            f"(layer {layer_of(target)}: {'/'.join(LAYERS[layer_of(target)])})"
            for source, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(source)]


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """A chain of imports [a, b, ..., a], or None when the graph has no cycle."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_layers_import_only_downward():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checks_see_an_upward_import_and_a_cycle():
    graph = dict(import_graph())
    graph["infmoe.layers.base"] = graph["infmoe.layers.base"] | {"infmoe.loading"}  # loading reaches layers
    assert [line.split()[0] for line in upward_imports(graph)] == ["infmoe.layers.base"]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "infmoe.loading" in cycle


def test_imports_read_from_source_include_function_local_and_lazy_ones():
    graph = import_graph()
    assert "infmoe.hf.reading" in graph["infmoe.loading"]  # module level
    assert "infmoe.hf.modeling_infmoe" in graph["infmoe.hf"]  # inside register(), and lazily
    assert "infmoe.layers" in graph["infmoe"]  # lazy re-export only: a string
    assert "infmoe.cli" in graph["infmoe.launch"]  # inside main()


_IMPORT_EACH = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "infmoe" or m.startswith("infmoe.")]:
        del sys.modules[loaded]  # each module starts from no infmoe module loaded
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in OPTIONAL:  # an extra that is not installed
            failed[name] = repr(err)
    except Exception as err:
        failed[name] = repr(err)
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module, imported first, in a process where no other module of the package is
    loaded (third-party modules stay loaded between modules, so one process does all)."""
    code = f"OPTIONAL = {sorted(OPTIONAL)!r}\n" + _IMPORT_EACH
    done = subprocess.run([sys.executable, "-c", code, *module_names()], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE_DIR.parent, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
