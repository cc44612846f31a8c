"""An export loads where infmoe is not installed, and its code is our source.

One subprocess (`standalone_worker.py`, in which every import of infmoe fails) loads the
dense, top-k MoE and ∞-MoE exports with AutoModelForCausalLM and AutoTokenizer; the tests
here compare what it computed with our own model. The other tests check the generated
files against the source they come from, so a generator that dropped or altered code
fails here even where the outputs would happen to agree.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from infmoe.checkpoint import load_checkpoint
from infmoe.generation import generate
from infmoe.hf.standalone import ALLOWED_IMPORTS, StandaloneError, standalone_files
from infmoe.layers import FFN_TYPES, InfiniteMoE, TopKMoE, sampling
from infmoe.models import GPT, GPTConfig

TOL = 1e-5
WORKER = Path(__file__).with_name("standalone_worker.py")


def ours(checkpoint):
    return load_checkpoint(checkpoint).build_model().eval()


def logits_seeded(model, ids, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def remote(exported, tmp_path_factory, text):
    """What the worker computed from the exports, with infmoe not importable."""
    tmp = tmp_path_factory.mktemp("standalone")
    k3 = shutil.copytree(exported("infmoe"), tmp / "infmoe-k3")
    config = json.loads((k3 / "config.json").read_text())
    (k3 / "config.json").write_text(json.dumps({**config, "n_samples": 3}))
    folders = {ffn: str(exported(ffn)) for ffn in ("dense", "moe", "infmoe")}
    spec = {"folders": {**folders, "infmoe_k3": str(k3)}, "text": text, "out": str(tmp / "results.pt"),
            "resaved": str(tmp / "resaved")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-I", str(WORKER), str(tmp / "spec.json")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "results.pt")


def test_worker_runs_without_infmoe(remote):
    assert remote["infmoe_importable"] is False
    assert remote["infmoe_modules"] == []
    assert remote["remote_files_outside_cache"] == []
    for ffn in ("dense", "moe", "infmoe"):
        assert all(name.startswith("transformers_modules.") for name in remote[ffn]["modules"])


@pytest.mark.parametrize("ffn", ["dense", "moe", "infmoe"])
def test_standalone_logits_tokens_and_generate_equal_ours(ffn, remote, checkpoint, tokenizer, text):
    result, reference = remote[ffn], ours(checkpoint(ffn))
    ids = torch.tensor([tokenizer.encode(text)])
    assert torch.equal(result["ids"], ids)
    assert max_diff(result["logits"], logits_seeded(reference, ids, 1)) <= TOL  # ∞-MoE: sample mode, same seed
    expected = list(generate(reference, ids[0].tolist(), max_new_tokens=8, temperature=0, seed=7))
    assert result["generated"] == expected and len(set(expected)) > 1
    layer = reference.ffn_layers()[0]
    assert result["layer"] == type(layer).__name__
    # topk_moe and infinite_moe each define IMPLS: each generated module keeps its own.
    assert result["impls"] == getattr(sys.modules[type(layer).__module__], "IMPLS", None)


def test_standalone_k_and_mode_settable(remote, checkpoint, tokenizer, text):
    result, reference = remote["infmoe"], ours(checkpoint("infmoe"))
    ids = torch.tensor([tokenizer.encode(text)])
    assert result["config"] == (1, "sample")
    with sampling(reference, mode="mean"):
        mean = logits_seeded(reference, ids, 0)
    assert max_diff(result["mean"], mean) <= TOL  # model.config.mode = "mean"
    assert max_diff(result["mean_kwarg"], mean) <= TOL  # from_pretrained(mode="mean")
    assert max_diff(result["mean"], result["logits"]) > 1e-3  # the mode made a difference
    for key, k in (("k4", 4), ("k3", 3)):  # from_pretrained(n_samples=4); config.json edited
        n_samples, logits = result[key]
        assert n_samples == k
        with sampling(reference, n_samples=k):
            assert max_diff(logits, logits_seeded(reference, ids, 1)) <= TOL


def test_standalone_save_pretrained_keeps_the_code(remote, checkpoint, tokenizer, text):
    files, logits = remote["infmoe"]["resaved"]  # saved after model.config.mode = "mean"
    assert {f.name for f in standalone_files()} <= set(files)
    reference = ours(checkpoint("infmoe"))
    with sampling(reference, mode="mean"):
        assert max_diff(logits, logits_seeded(reference, torch.tensor([tokenizer.encode(text)]), 0)) <= TOL


def test_export_writes_the_generated_files(exported):
    generated = {f.name: f.text for f in standalone_files()}
    folder = exported("infmoe")
    assert {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.py")} == generated


def test_re_export_removes_code_files_the_new_export_does_not_write(exported, tmp_path):
    from infmoe.hf import export_hf

    folder = export_hf(exported("infmoe"), tmp_path / "again")
    stale = folder / "infmoe_layers_renamed_since.py"  # as a module renamed after an earlier export leaves it
    stale.write_text((folder / "infmoe_errors.py").read_text(encoding="utf-8"), encoding="utf-8")
    mine = folder / "notes.py"  # not generated: never touched
    mine.write_text("# my own notes\n", encoding="utf-8")
    export_hf(exported("infmoe"), folder)
    assert not stale.exists() and mine.exists()
    assert {p.name for p in folder.glob("*.py")} == {f.name for f in standalone_files()} | {"notes.py"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(level, module) of every import statement in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_generated_code_imports_only_stdlib_torch_and_transformers():
    files = {f.name.removesuffix(".py"): ast.parse(f.text) for f in standalone_files()}
    assert {"configuration_infmoe", "modeling_infmoe"} <= set(files)
    for name, tree in files.items():
        for level, module in imported_modules(tree):
            if level:
                assert level == 1 and module in files, (name, module)
            else:
                assert module.split(".")[0] in ALLOWED_IMPORTS and module.split(".")[0] != "infmoe", (name, module)
    assert all(module.split(".")[0] != "infmoe" for tree in files.values() for _, module in imported_modules(tree))


class _DropImports(ast.NodeTransformer):
    def visit_Import(self, node):
        return None

    def visit_ImportFrom(self, node):
        return None


def bound_by_imports(tree: ast.AST) -> list[str]:
    return sorted(alias.asname or alias.name for node in ast.walk(tree)
                  if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names)


def test_generated_code_is_our_source_but_for_imports():
    for generated in standalone_files():
        source = Path(importlib.util.find_spec(generated.module).origin).read_text(encoding="utf-8")
        ours_tree, theirs_tree = ast.parse(source), ast.parse(generated.text)
        assert bound_by_imports(theirs_tree) == bound_by_imports(ours_tree), generated.name
        assert ast.dump(_DropImports().visit(theirs_tree)) == ast.dump(_DropImports().visit(ours_tree)), generated.name


def class_methods(tree: ast.Module, name: str) -> set[str]:
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def methods_in_source(cls: type) -> set[str]:
    """Names of the methods (properties too) of the live class `cls` written in its source
    file, not those @dataclass writes."""
    names = set()
    for name, value in vars(cls).items():
        functions = [value.fget, value.fset] if isinstance(value, property) else [getattr(value, "__func__", value)]
        functions = [inspect.unwrap(f) if callable(f) else f for f in functions]  # through @torch.no_grad()
        if any(inspect.isfunction(f) and f.__code__.co_filename == inspect.getsourcefile(cls) for f in functions):
            names.add(name)
    return names


def test_generated_classes_have_our_methods():
    from infmoe.hf import InfmoeConfig, InfmoeForCausalLM

    trees = {f.module: ast.parse(f.text) for f in standalone_files()}
    classes = [GPT, GPTConfig, InfiniteMoE, TopKMoE, InfmoeConfig, InfmoeForCausalLM, *FFN_TYPES.values()]
    for cls in classes:
        assert cls.__module__ in trees, cls  # every FFN type and the model are generated, wherever they live
        assert class_methods(trees[cls.__module__], cls.__name__) == methods_in_source(cls), cls
    assert sampling.__module__ in trees


def fake_package(root: Path, core: str) -> Path:
    """An infmoe source tree whose entry files import `Thing` from infmoe.core (text `core`)."""
    package = root / "infmoe"
    (package / "hf").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "hf" / "__init__.py").write_text("")
    (package / "hf" / "configuration_infmoe.py").write_text("from infmoe.core import Thing\n")
    (package / "hf" / "modeling_infmoe.py").write_text("from .configuration_infmoe import Thing\n")
    (package / "core.py").write_text(core)
    return package


@pytest.mark.parametrize("core, message", [
    ("import numpy\nThing = 1\n", "may import only the standard library, torch and transformers"),
    ("import infmoe.extra\nThing = 1\n", "write `from infmoe.extra import NAME`"),
    ("from infmoe.extra import Other; Thing = 1\n", "give it lines of its own"),
    ("from infmoe.extra import Missing as Thing\n", "'Missing' from infmoe.extra, which does not define it"),
], ids=["numpy", "import-infmoe", "shared-line", "missing-name"])
def test_generator_refuses_code_that_would_not_load(tmp_path, core, message):
    package = fake_package(tmp_path, core)
    (package / "extra.py").write_text("Other = 2\n")
    with pytest.raises(StandaloneError, match=message.replace("(", r"\(")):
        standalone_files(package)


def test_generator_follows_reexports_and_keeps_namespaces(tmp_path):
    core = ("from infmoe.sub import helper as help_, IMPLS\n\nThing = 1\n\n\n"
            "def later():\n    from infmoe.sub.b import IMPLS\n    return IMPLS, help_()\n")
    package = fake_package(tmp_path, core)
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("from infmoe.sub.a import IMPLS, helper\n")
    (package / "sub" / "a.py").write_text("IMPLS = ('a',)\n\n\ndef helper():\n    return IMPLS\n")
    (package / "sub" / "b.py").write_text("IMPLS = ('b',)\n")
    files = {f.name: f.text for f in standalone_files(package)}
    assert sorted(files) == ["configuration_infmoe.py", "infmoe_core.py", "infmoe_sub_a.py", "infmoe_sub_b.py",
                             "modeling_infmoe.py"]  # sub/__init__ only re-exports: not needed
    assert "from .infmoe_core import Thing\n" in files["configuration_infmoe.py"]
    assert "from .infmoe_sub_a import helper as help_, IMPLS\n" in files["infmoe_core.py"]
    assert "    from .infmoe_sub_b import IMPLS\n" in files["infmoe_core.py"]
    folder = tmp_path / "export" / "pkg"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    for name, body in files.items():
        (folder / name).write_text(body)
    sys.path.insert(0, str(folder.parent))
    try:
        core_module = importlib.import_module("pkg.infmoe_core")
        # Both a and b define IMPLS; each function reads its own module's.
        assert (core_module.IMPLS, core_module.later(), core_module.Thing) == (("a",), (("b",), ("a",)), 1)
    finally:
        sys.path.remove(str(folder.parent))
        for name in [n for n in sys.modules if n == "pkg" or n.startswith("pkg.")]:
            del sys.modules[name]
