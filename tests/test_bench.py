import json

import pytest
import torch

from infmoe import bench
from infmoe.bench import BASELINE, SHAPES, Shape, build_layers, fixed_noise, layer_variants, markdown
from infmoe.cli import main
from infmoe.layers import InfiniteMoE
from infmoe.models import build_model


def union_from_selection(layer: InfiniteMoE, x: torch.Tensor) -> float:
    """Mean over tokens of |∪_k blocks kept by sample k| / n_blocks, from the layer's own
    selection with the bench's noise, counted with Python sets."""
    index = layer.select(x.detach(), **fixed_noise(layer, x)).index  # (K, T, n_kept)
    sizes = [len(set(index[:, t].flatten().tolist())) for t in range(index.shape[1])]
    return sum(sizes) / (len(sizes) * layer.n_blocks)


def test_quick_bench_reports_every_variant_as_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    result = json.loads(out.read_text())
    rows = result["layers"]
    assert [r["variant"] for r in rows] == list(layer_variants(SHAPES["quick"]))
    base = next(r for r in rows if r["variant"] == BASELINE)
    # No order between fwd and fwd+bwd times is asserted: forwards and backwards are timed
    # apart, and on a shared machine three quick repeats of one can run at a quarter speed.
    for row in rows:
        assert row["fwd_bwd_ms"] > 0 and row["fwd_ms"] > 0
        assert row["vs_dense"] == pytest.approx(row["fwd_bwd_ms"] / base["fwd_bwd_ms"], rel=1e-9)
        assert 0 < row["gflops"] and row["saved_mb"] >= 0
    # The unions are measured: the same layers' selections (same seed, same noise) give them.
    layers, x = build_layers(SHAPES["quick"], torch.device("cpu"))
    for row in rows:
        layer = layers[row["variant"]]
        if isinstance(layer, InfiniteMoE):
            assert row["union"] == pytest.approx(union_from_selection(layer, x), abs=1e-6), row["variant"]
        else:
            assert row["union"] is None
        # GFLOP/s from the layer's own FLOP count at the measured union; backward = 2 x forward
        flops = 3 * x.shape[0] * layer.flops_per_token(getattr(layer, "n_samples", 1), union=row["union"])
        assert row["gflops"] == pytest.approx(flops / row["fwd_bwd_ms"] / 1e6, rel=1e-9), row["variant"]
    unions = [r["union"] for r in rows if "sparse" in r["variant"]]
    assert unions == sorted(unions) and unions[0] < unions[-1] <= 1  # K = 1, 2, 4, 8
    # No --precision on the CPU: fp32, as training's "auto" there.
    assert result["machine"]["precision"] == "auto" and result["machine"]["dtype"] == "float32"
    assert {r["dtype"] for r in rows + result["models"]} == {"float32"}
    assert [r["config"] for r in result["models"]] == ["tiny-dense", "tiny-moe", "tiny-infmoe"]
    md = (tmp_path / "bench.md").read_text()
    assert md == markdown(result) and ", fp32;" in md.splitlines()[0]
    assert "| tiny-infmoe |" in capsys.readouterr().out


def test_bench_precision_bf16_computes_and_says_bf16(tmp_path, monkeypatch):
    # smaller than --quick's own sizes, to keep the test fast; the code paths are the same
    monkeypatch.setitem(bench.SHAPES, "quick", Shape("quick", 32, 256, 64, 32, 8))
    small = dict(n_layer=1, d_model=64, n_head=2, vocab_size=256)
    monkeypatch.setattr(bench, "build_model", lambda **kwargs: build_model(**kwargs, **small))
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny bf16 matmuls on two busy cores wait on each other for milliseconds
        assert main(["bench", "--quick", "--precision", "bf16", "--repeats", "1", "--no-memory",
                     "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["machine"]["precision"] == "bf16"
    # measured below autocast: the dtype the matmuls of each layer and model really got
    assert {r["dtype"] for r in result["layers"] + result["models"]} == {"bfloat16"}
    assert result["machine"]["dtype"] == "bfloat16"
    assert ", bf16 autocast;" in markdown(result).splitlines()[0]


def test_bench_layer_step_runs_the_forward_under_the_autocast_given():
    layer = bench.DenseMLP(16, 32)
    x = torch.randn(8, 16, requires_grad=True)
    outputs = []
    layer.register_forward_hook(lambda module, args, y: outputs.append(y.dtype))
    bench.layer_step(layer, x, True, lambda: torch.autocast("cpu", dtype=torch.bfloat16))()
    bench.layer_step(layer, x, True)()
    assert outputs == [torch.bfloat16, torch.float32]
    assert layer.c_fc.weight.grad.dtype == torch.float32


def test_rendering_a_result_saved_before_dtypes_were_recorded_says_fp32():
    machine = dict(device="cpu", gpu=None, processor="x86_64", threads=2, torch="2.13")
    assert ", fp32;" in markdown(dict(machine=machine, repeats=1, layers=[], models=[])).splitlines()[0]


def test_bad_shape_is_one_line(capsys):
    assert main(["bench", "--shapes", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--shapes='huge'" in err and err.count("\n") == 1
