"""`infmoe inspect`: its files for ∞-MoE, top-k MoE and exported models, its numbers against
direct computations on hand-made cases, and its bad input."""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from infmoe.checkpoint import save_checkpoint
from infmoe.cli import main
from infmoe.evaluation import validation_batches
from infmoe.evaluation.routing_report import (
    collect_routing, inspect_model, jaccard, pack, pairs, pca_2d, token_class, usage_entropy)
from infmoe.layers import sampling
from infmoe.loading import load_model
from infmoe.models import build_model

TOKENS = 512
PNG = b"\x89PNG\r\n\x1a\n"


def argv(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def models(tmp_path_factory, micro, corpus, cache_dir):
    """An ∞-MoE trained for 2 steps (16 blocks), a fresh top-k MoE and a fresh dense
    checkpoint with its tokenizer, and the ∞-MoE's export."""
    root = tmp_path_factory.mktemp("inspect")
    run = root / "infmoe"
    assert main(["train", *argv(micro(run, max_steps=2, warmup_steps=1, eval_interval=2, save_interval=2,
                                      log_interval=1, units_per_block=16))]) == 0
    loaded = load_model(run)
    sizes = {k: getattr(loaded.model.config, k) for k in ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model")}
    paths = {"infmoe": run / "checkpoint.safetensors", "run": run, "export": root / "export"}
    for kind in ("moe", "dense"):
        torch.manual_seed(0)
        paths[kind] = save_checkpoint(root / f"{kind}.safetensors",
                                      build_model(f"tiny-{kind}", **sizes),
                                      tokenizer_files=loaded.tokenizer.files())
    assert main(["export", str(paths["infmoe"]), "--hf", str(paths["export"])]) == 0
    return paths


def inspect(model, out, *extra, cache_dir) -> int:
    return main(["inspect", str(model), "--tokens", str(TOKENS), "--cache_dir", str(cache_dir), "--out", str(out),
                 *map(str, extra)])


@pytest.fixture(scope="module")
def inspected(models, tmp_path_factory, corpus, cache_dir):
    """inspected(kind) → (output folder, what it printed) of `infmoe inspect` on that model,
    run once per kind; the ∞-MoE checkpoint with --run and its own corpus, the others --data."""
    done = {}

    def run(kind):
        if kind not in done:
            out, printed = tmp_path_factory.mktemp(f"inspect-{kind}"), io.StringIO()
            extra = ["--run", models["run"]] if kind == "infmoe" else ["--data", corpus]
            with contextlib.redirect_stdout(printed):
                assert inspect(models[kind], out, *extra, cache_dir=cache_dir) == 0
            done[kind] = out, printed.getvalue()
        return done[kind]

    return run


@pytest.mark.parametrize("kind", ["infmoe", "moe", "export"])
def test_every_file_is_written_and_the_summary_is_consistent(inspected, kind):
    out, printed = inspected(kind)
    assert "never chosen" in printed and "block1" in printed
    sampled = kind != "moe"
    pngs = ["usage.png", "expert-space-class.png", "expert-space-frequency.png", "overlap.png"]
    pngs += ["sigma.png"] if sampled else []
    assert sorted(p.name for p in out.iterdir()) == sorted(pngs + ["index.html", "summary.json"])
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG
    page = (out / "index.html").read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == pngs and page.count("<figcaption>") == len(pngs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == TOKENS and list(summary["layers"]) == ["block0", "block1"]
    assert sum(summary["token_classes"].values()) == sum(summary["frequency_buckets"].values()) == TOKENS
    for stats in summary["layers"].values():
        counts = np.array(stats["usage_counts"])
        assert stats["n_units"] == len(counts) == (16 if sampled else 8)
        assert stats["never_chosen_share"] == pytest.approx(np.mean(counts == 0))
        p = counts[counts > 0] / counts.sum()
        assert stats["usage_entropy"] == pytest.approx(-(p * np.log(p)).sum())
        assert stats["max_entropy"] == pytest.approx(math.log(len(counts)))
        assert stats["usage_share_sorted"] == sorted(counts / TOKENS, reverse=True)
        assert 0 < stats["pca_explained_variance_ratio"][1] <= stats["pca_explained_variance_ratio"][0] <= 1
        assert set(stats["overlap"]) >= {"same token id", "neighbours", "random pairs"}
        assert all(0 <= o["mean"] <= 1 and o["pairs"] > 0 for o in stats["overlap"].values())
        if sampled:  # each token keeps N = 50% of the blocks per sample, K = 1
            assert counts.sum() == TOKENS * 8 and stats["mean_share"] == 0.5
            assert stats["sample_overlap"] == stats["overlap"]["two samples of a token"]["mean"]
            q = stats["sigma_quantiles"]
            assert 0 < q["q00"] <= q["q50"] <= q["q100"]
        else:  # top-k: exactly k = 4 experts per token
            assert counts.sum() == TOKENS * 4 and "sigma_quantiles" not in stats
    curve = summary["sigma_over_training"]
    assert (curve["step"] == [1, 2] and len(curve["sigma_mean"]) == 2) if kind == "infmoe" else curve == {}


def test_an_export_routes_as_its_checkpoint(inspected):
    checkpoint, export = (json.loads((inspected(kind)[0] / "summary.json").read_text()) for kind in ("infmoe", "export"))
    assert export["layers"] == checkpoint["layers"] and export["tokens"] == checkpoint["tokens"]


@pytest.mark.parametrize("kind", ["infmoe", "moe"])
def test_usage_counts_are_those_of_the_layers_own_forward(models, kind, corpus, cache_dir):
    """In mean mode ∞-MoE routing is deterministic, as top-k routing is: the counts must equal
    what each layer's forward reports in its statistics (block_usage, expert_load)."""
    loaded = load_model(models[kind])
    _, batches = validation_batches(loaded.model, loaded.tokenizer, str(corpus), max_tokens=TOKENS,
                                    cache_dir=cache_dir)
    with sampling(loaded.model, mode="mean"):
        records = collect_routing(loaded.model, batches)
        expected = [np.zeros(r.n_units) for r in records]
        with torch.no_grad():
            for x, _ in batches:
                loaded.model(x)
                for total, layer in zip(expected, loaded.model.ffn_layers()):
                    stats = layer.aux.stats
                    total += (stats["block_usage"] * x.numel() if kind == "infmoe"
                              else stats["expert_load"] * x.numel() * layer.top_k).numpy()
    for record, total in zip(records, expected):
        assert record.counts.sum() > 0
        np.testing.assert_allclose(record.counts, total, atol=1e-3)


def test_a_layer_set_to_known_routing_gives_known_numbers(models, tmp_path, corpus, cache_dir):
    """Block 0's router made constant: μ = 1, σ = 0.01, scores decreasing with the block
    index, so every token keeps blocks 0-7 of 16 whatever its sample."""
    loaded = load_model(models["infmoe"])
    layer = loaded.model.ffn_layers()[0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias[: layer.d_z] = 1.0
        layer.router.bias[layer.d_z :] = -50.0  # softplus(-50) + sigma_min = sigma_min = 0.01
        layer.score.weight.zero_()
        layer.score.bias.copy_(-torch.arange(16.0))
    _, batches = validation_batches(loaded.model, loaded.tokenizer, str(corpus), max_tokens=TOKENS,
                                    cache_dir=cache_dir)
    summary = inspect_model(loaded.model, loaded.tokenizer, batches, tmp_path)
    stats = summary["layers"]["block0"]
    assert stats["usage_counts"] == [TOKENS] * 8 + [0] * 8
    assert stats["never_chosen_share"] == 0.5
    assert stats["usage_entropy"] == pytest.approx(math.log(8)) and stats["max_entropy"] == pytest.approx(math.log(16))
    assert all(o["mean"] == 1.0 for o in stats["overlap"].values()) and stats["sample_overlap"] == 1.0
    assert stats["sample_disagreement_as_logged"] == 0.0
    assert all(q == pytest.approx(0.01) for q in stats["sigma_quantiles"].values())
    assert stats["pca_explained_variance_ratio"] == [0.0, 0.0]  # μ is the same for every token
    assert summary["layers"]["block1"]["never_chosen_share"] < 0.5  # the other layer untouched
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_jaccard_usage_entropy_and_pca_on_hand_made_cases():
    masks = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0, 0, 1],
                          [1, 0, 0, 1, 1, 0, 0, 0, 0, 1],
                          [0, 0, 1, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 10 units: across a byte
    packed = pack(masks)
    assert packed.shape == (3, 2)
    np.testing.assert_allclose(jaccard(packed[[0, 0, 0]], packed[[0, 1, 2]]), [1.0, 3 / 5, 0.0])
    assert jaccard(pack(torch.zeros(1, 5, dtype=torch.bool)), pack(torch.zeros(1, 5, dtype=torch.bool))) == [1.0]
    entropy, most = usage_entropy(np.array([3, 3, 0, 0]))
    assert entropy == pytest.approx(math.log(2)) and most == pytest.approx(math.log(4))
    assert usage_entropy(np.array([5, 5, 5, 5]))[0] == pytest.approx(math.log(4))
    t = np.linspace(-1, 1, 50)
    line = np.stack([t, 2 * t, np.zeros_like(t)], 1)  # all variance along (1, 2, 0)
    coords, ratio = pca_2d(line)
    assert ratio == pytest.approx([1.0, 0.0], abs=1e-12)
    np.testing.assert_allclose(coords[:, 0], t * math.sqrt(5), atol=1e-12)  # sign fixed: increasing with t


def test_pairs_are_of_their_kind():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, 256)
    found = pairs(ids, seq_len=32, n=500, rng=rng)
    i, j = found["same token id"]
    assert len(i) == 500 and (ids[i] == ids[j]).all() and (i != j).all()
    i, j = found["neighbours"]
    assert len(i) == 256 - 256 // 32 and (j == i + 1).all() and (i // 32 == j // 32).all()  # within a window
    i, j = found["random pairs"]
    assert len(i) == 500 and (i != j).all() and j.max() < 256
    lonely = pairs(np.arange(64), seq_len=32, n=10, rng=rng)["same token id"]  # no id repeats
    assert len(lonely[0]) == 0


@pytest.mark.parametrize("text,kind", [
    (" the", "word"), ("Don't", "word"), (" 1984", "number"), ("3.14", "number"), (",", "punctuation"),
    (" (", "punctuation"), ("\n\n", "space/other"), (" ", "space/other"), ("\ufffd", "space/other"),
    ("a1", "space/other"),
])
def test_token_class(text, kind):
    assert token_class(text) == kind


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("dense", "no routing to inspect"),
    ("unwritable", "cannot write to"),
    ("tokens", "--tokens=0 is invalid"),
    ("run", "holds no metrics.jsonl"),
    ("no data", "does not name its training data: pass --data"),
])
def test_bad_input_is_one_line_and_exit_2(models, case, needle, tmp_path, cache_dir, capsys):
    out, model, extra = tmp_path / "out", models["infmoe"], []
    if case == "missing":
        model = tmp_path / "nowhere.safetensors"
    elif case == "dense":
        model = models["dense"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"  # under a file: no folder can be made there
    elif case == "tokens":
        extra = ["--tokens", 0]
    elif case == "run":
        extra = ["--run", tmp_path]
    else:
        model = models["export"]  # an export does not name its corpus
    assert inspect(model, out, *extra, cache_dir=cache_dir) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.is_dir() or not any(out.iterdir())  # nothing written


def test_the_old_module_name_still_imports_and_warns(monkeypatch):
    """infmoe.evaluation.inspect (shadowing the standard library's name) was documented."""
    import importlib
    import sys

    from infmoe.deprecation import RenamedWarning
    from infmoe.evaluation import routing_report

    monkeypatch.setattr("infmoe.deprecation._warned", set())
    monkeypatch.delitem(sys.modules, "infmoe.evaluation.inspect", raising=False)
    with pytest.warns(RenamedWarning, match="infmoe.evaluation.inspect is now infmoe.evaluation.routing_report"):
        assert importlib.import_module("infmoe.evaluation.inspect") is routing_report
