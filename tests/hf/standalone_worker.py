"""Loads exports the way a user without infmoe does; run by test_standalone.py, not by pytest.

    python -I standalone_worker.py SPEC.json

-I keeps the working directory, PYTHONPATH and user site-packages off sys.path; infmoe is
installed in editable mode, which site-packages' .pth files would still find, so a finder at
the front of sys.meta_path makes every ``infmoe`` import fail as it fails where the package
is not installed. SPEC names the export folders, the text to encode and the output file;
the results (token ids, logits, generated tokens, module names) go to that file via
torch.save, and the test compares them with our own model.
"""

import importlib.abc
import json
import os
import sys


class NotInstalled(importlib.abc.MetaPathFinder):
    """Finds nothing named infmoe, and says so the way a missing package does."""

    def find_spec(self, name, path=None, target=None):
        if name == "infmoe" or name.startswith("infmoe."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def infmoe_importable() -> bool:
    try:
        import infmoe  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def main(spec_path: str) -> None:
    assert "infmoe" not in sys.modules
    sys.meta_path.insert(0, NotInstalled())
    importable = infmoe_importable()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    folders = spec["folders"]

    def load(folder, **kwargs):
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()

    def logits(model, ids, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(ids).logits

    results = {}
    for ffn in ("dense", "moe", "infmoe"):
        tokenizer = AutoTokenizer.from_pretrained(folders[ffn], trust_remote_code=True)
        ids = torch.tensor([tokenizer(spec["text"])["input_ids"]])
        model = load(folders[ffn])
        layer = model.transformer.blocks[0].ffn
        result = {
            "ids": ids,
            "logits": logits(model, ids, 1),
            "modules": [type(model).__module__, type(model.transformer).__module__, type(layer).__module__],
            "layer": type(layer).__name__,
            "impls": getattr(sys.modules[type(layer).__module__], "IMPLS", None),
        }
        torch.manual_seed(7)
        result["generated"] = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        if ffn == "infmoe":
            result["config"] = (model.config.n_samples, model.config.mode)
            model.config.mode = "mean"
            result["mean"] = logits(model, ids, 2)
            k4 = load(folders[ffn], n_samples=4)
            result["k4"] = (k4.config.n_samples, logits(k4, ids, 1))
            result["mean_kwarg"] = logits(load(folders[ffn], mode="mean"), ids, 3)
            k3 = load(folders["infmoe_k3"])  # config.json edited to n_samples 3
            result["k3"] = (k3.config.n_samples, logits(k3, ids, 1))
            model.save_pretrained(spec["resaved"])  # copies the code files along
            result["resaved"] = (sorted(os.listdir(spec["resaved"])), logits(load(spec["resaved"]), ids, 4))
        results[ffn] = result

    cache = os.path.realpath(os.environ["HF_MODULES_CACHE"])
    remote = [m for name, m in sys.modules.items() if name.startswith("transformers_modules.")]
    results["infmoe_importable"] = importable
    results["infmoe_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "infmoe")
    results["remote_files_outside_cache"] = sorted(
        m.__file__ for m in remote
        if getattr(m, "__file__", None) and not os.path.realpath(m.__file__).startswith(cache + os.sep))
    torch.save(results, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
