import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from infmoe import cli
from infmoe.bench import harness, memory, tables, variants
from infmoe.bench.harness import fixed_noise
from infmoe.bench.memory import CACHE_FACTOR
from infmoe.bench.peers import PEER_IMPLEMENTATIONS, MixtralPeer, _mixtral, peer_label
from infmoe.bench.rendering import dtype_label, markdown
from infmoe.bench.tables import build_layers
from infmoe.bench.targets import TARGETS, measurements, targets
from infmoe.bench.variants import (BASELINE, FULL, SHAPES, Shape, compile_variants, compiled_label, decode_variants,
                                   generation_variants, infmoe_label, layer_variants)
from infmoe.cli import main
from infmoe.layers import DenseMLP, InfiniteMoE, build_ffn
from infmoe.models import build_model, get_config

SMALL_MODEL = dict(n_layer=1, d_model=32, n_head=2, vocab_size=256)
needs_transformers = pytest.mark.skipif(_mixtral() is None, reason="transformers does not import")


def union_from_selection(layer: InfiniteMoE, x: torch.Tensor) -> float:
    """Mean over tokens of |∪_k blocks kept by sample k| / n_blocks, from the layer's own
    selection with the bench's noise, counted with Python sets."""
    index = layer.select(x.detach(), **fixed_noise(layer, x)).index  # (K, T, n_kept)
    sizes = [len(set(index[:, t].flatten().tolist())) for t in range(index.shape[1])]
    return sum(sizes) / (len(sizes) * layer.n_blocks)


def by(rows: list[dict], *keys: str) -> dict:
    return {tuple(r[k] for k in keys): r for r in rows}


@contextlib.contextmanager
def bench_output():
    """stdout captured, and torch's thread count restored after `--threads`: one thread,
    since small ops on two threads wait on each other for milliseconds when another
    process holds a core (these runs check what is recorded, not how fast it is)."""
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            yield out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `infmoe bench --quick` run: (result, markdown file, stdout)."""
    folder = tmp_path_factory.mktemp("bench")
    with bench_output() as out:
        assert main(["bench", "--quick", "--threads", "1", "--json", str(folder / "b.json"),
                     "--markdown", str(folder / "b.md")]) == 0
    return json.loads((folder / "b.json").read_text()), (folder / "b.md").read_text(), out.getvalue()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full run's code path (both named shapes, both models, T = 1, 16, 128, --compile,
    --tokens) at small sizes: the shapes, models, batches, generated tokens and the cache
    budget shrunk, the peak-memory processes skipped, and compiled with a backend that
    compiles in seconds (the graphs, whole or not, are the same)."""
    folder = tmp_path_factory.mktemp("bench_full")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "tiny", Shape("tiny", 32, 768, 64, 64, 8))
        mp.setitem(SHAPES, "gpt2-small", Shape("gpt2-small", 32, 768, 64, 1, 8))
        mp.setattr(tables, "build_model", lambda **kwargs: build_model(**kwargs, **SMALL_MODEL))
        for size in ("tiny", "gpt2-small"):
            mp.setitem(variants.GENERATE_TOKENS, size, 4)
            mp.setitem(cli.MODEL_BATCH, size, (2, 32))
        mp.setattr(tables, "l3_cache_bytes", lambda: 64 * 1024)
        mp.setattr(tables, "peak_rss_rise", lambda *args: 0)
        mp.setattr(tables, "COMPILE_BACKEND", "aot_eager")
        with bench_output():
            assert main(["bench", "--shapes", "tiny,gpt2-small", "--models", "tiny,gpt2-small", "--repeats", "1",
                         "--threads", "1", "--compile", "--tokens", "48", "--json", str(folder / "b.json"),
                         "--markdown", str(folder / "b.md")]) == 0
    return json.loads((folder / "b.json").read_text()), folder


def test_training_rows_are_ratios_of_their_own_times_to_both_dense_mlps(quick):
    result, _, _ = quick
    rows = result["layers"]
    assert [r["variant"] for r in rows] == list(layer_variants(SHAPES["quick"]))
    base, full = rows[0], rows[1]
    assert (base["variant"], full["variant"]) == (BASELINE, FULL)
    # No order between fwd and fwd+bwd times is asserted: forwards and backwards are timed
    # apart, and on a shared machine three quick repeats of one can run at a quarter speed.
    for row in rows:
        assert row["fwd_bwd_ms"] > 0 and row["fwd_ms"] > 0
        assert row["vs_dense"] == pytest.approx(row["fwd_bwd_ms"] / base["fwd_bwd_ms"], rel=1e-9)
        assert row["vs_full"] == pytest.approx(row["fwd_bwd_ms"] / full["fwd_bwd_ms"], rel=1e-9)
        assert 0 < row["gflops"] and row["saved_mb"] >= 0 and row["peak_mb"] is None  # peak: not in --quick


def test_training_rows_record_the_layers_own_path_union_and_flops(quick):
    result, _, _ = quick
    layers, x = build_layers(SHAPES["quick"], torch.device("cpu"))
    paths = set()
    for row in result["layers"]:
        layer = layers[row["variant"]]
        k = getattr(layer, "n_samples", 1)
        harness.layer_step(layer, x, True)()  # the same call as the timed ones
        if isinstance(layer, InfiniteMoE):
            # the path that ran, which is the one the dispatch rule names for training
            assert row["path"] == layer.aux.path == layer.training_path(), row["variant"]
            # The unions are measured: the same layers' selections (same seed, same noise) give them.
            assert row["union"] == pytest.approx(union_from_selection(layer, x), abs=1e-6), row["variant"]
            paths.add(row["path"])
        else:
            assert row["path"] is None and row["union"] is None
        # GFLOP/s from the layer's own FLOP counts at the measured union, what the method needs
        # and what its path executes; backward = 2 x forward
        flops = 3 * x.shape[0] * layer.flops_per_token(k, union=row["union"])
        executed = 3 * x.shape[0] * layer.flops_per_token(k, union=row["union"], executed=True)
        assert row["gflops"] == pytest.approx(flops / row["fwd_bwd_ms"] / 1e6, rel=1e-9), row["variant"]
        assert row["executed_gflops"] == pytest.approx(executed / row["fwd_bwd_ms"] / 1e6, rel=1e-9), row["variant"]
        assert not row["compiled"] and (row["executed_gflops"] > row["gflops"]) == (row["path"] in ("full", "masked"))
    assert "masked" in paths and len(paths) >= 2  # the reference row and at least one fast path


@needs_transformers
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixtral_peer_has_the_total_and_active_parameters_of_the_infmoe_ffn(shape):
    s = SHAPES[shape]
    peer, ours = MixtralPeer(s.d_model, s.d_hidden, "eager"), InfiniteMoE(s.d_model, s.d_hidden, d_z=s.d_z)
    experts = sum(p.numel() for p in peer.block.experts.parameters())
    ffn = ours.w_in.numel() + ours.w_out.numel()
    assert experts == pytest.approx(ffn, rel=0.01)
    active = peer.active_parameters() - peer.block.gate.weight.numel()
    assert active == pytest.approx(ours.active_fraction * experts, rel=1e-9)
    assert peer.block.top_k == 4 and peer.block.experts.num_experts == 8


@needs_transformers
@pytest.mark.parametrize("implementation", PEER_IMPLEMENTATIONS)
def test_mixtral_peer_flop_count_is_what_its_matmuls_do(implementation):
    torch.manual_seed(0)
    peer = MixtralPeer(32, 768, implementation)
    x = torch.randn(64, 32)
    with harness._MatmulFlops() as seen:
        y = peer(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0  # its parameters were set
    assert 2 * sum(seen.by_dtype.values()) == 64 * peer.flops_per_token()


@needs_transformers
def test_quick_bench_has_the_peer_rows(quick):
    result, md, _ = quick
    peers = [r for r in result["layers"] if r["variant"].startswith("HF Mixtral")]
    assert [r["variant"] for r in peers] == [peer_label(i) for i in PEER_IMPLEMENTATIONS]
    assert result["machine"]["transformers"] and "does not import" not in md


def test_without_transformers_the_layer_table_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr("infmoe.bench.peers._mixtral", lambda: None)
    assert not any(name.startswith("HF") for name in layer_variants(SHAPES["quick"]))
    machine = dict(device="cpu", gpu=None, processor="x86_64", threads=2, torch="2.13", transformers=None)
    row = dict(shape="quick", variant=BASELINE, union=None, fwd_ms=1.0, fwd_bwd_ms=3.0, vs_dense=1.0, gflops=1.0,
               matmul_limit_gflops=2.0)
    md = markdown(dict(machine=machine, repeats=1, layers=[row], models=[]))
    assert len([line for line in md.splitlines() if "transformers" in line]) == 1
    machine["transformers"] = "5.0"  # the peers measured: no such line, the version in the header
    assert [i for i, line in enumerate(markdown(dict(machine=machine, repeats=1, layers=[row], models=[]))
                                       .splitlines()) if "transformers" in line] == [0]


def test_decode_rows_read_weights_from_memory_and_are_ratios(quick):
    result, _, _ = quick
    rows = result["decode"]
    assert [(r["tokens"], r["variant"]) for r in rows] == [(1, name) for name in decode_variants(SHAPES["quick"])]
    budget = CACHE_FACTOR * memory.l3_cache_bytes()
    torch.manual_seed(0)
    fresh = {name: build() for name, build in decode_variants(SHAPES["quick"]).items()}
    base, full = rows[0], rows[1]
    for row in rows:
        assert row["ms"] > 0 and row["calls"] >= 30
        assert row["vs_dense"] == pytest.approx(row["ms"] / base["ms"], rel=1e-9)
        assert row["vs_full"] == pytest.approx(row["ms"] / full["ms"], rel=1e-9)
        layer = fresh[row["variant"]]
        assert row["copy_bytes"] == 4 * sum(p.numel() for p in layer.parameters())
        # the fewest copies whose weights exceed the cache budget
        assert row["budget_bytes"] == budget and budget <= row["copies"] * row["copy_bytes"]
        assert (row["copies"] - 1) * row["copy_bytes"] < budget
        if isinstance(layer, InfiniteMoE):
            harness.layer_step(layer, torch.randn(1, layer.d_model), False)()
            assert row["path"] == layer.aux.path, row["variant"]
        else:
            assert row["path"] is None
    unions = [by(rows, "variant")[(infmoe_label(64, k),)]["union"] for k in (1, 4, 16)]
    assert unions == sorted(unions) and unions[0] == pytest.approx(0.5)


def test_l3_size_is_read_from_sysfs_or_assumed(tmp_path):
    size = tmp_path / "size"
    for text, expected in (("1024K\n", 2**20), ("3M", 3 * 2**20), ("4096", 4096)):
        size.write_text(text)
        assert memory.l3_cache_bytes(str(size)) == expected
    assert memory.l3_cache_bytes(str(tmp_path / "absent")) == memory.DEFAULT_L3


def test_weight_copies_are_equal_layers_with_memory_of_their_own():
    torch.manual_seed(0)
    layer = InfiniteMoE(16, 64, d_z=4, units_per_block=8, n_samples=2)
    copies = memory.weight_copies(layer, 3)
    x = torch.randn(5, 16)
    noise = torch.randn(2, 5, 4)
    spans = []
    for c in copies:
        assert c is not layer and type(c) is InfiniteMoE and c.n_samples == 2
        for (name, p), q in zip(layer.named_parameters(), c.parameters()):
            assert torch.equal(p, q) and q.requires_grad, name
            spans.append((q.data_ptr(), q.data_ptr() + q.numel() * q.element_size()))
        assert torch.equal(c(x, noise=noise), layer(x, noise=noise))
    spans += [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in layer.parameters()]
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two share a byte
    with torch.no_grad():
        copies[0].w_in.add_(1)
    assert torch.equal(copies[1].w_in, layer.w_in)


def test_cycling_runs_each_step_in_turn():
    calls = []
    step = harness.cycling([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        step()
    assert calls == [0, 1, 2, 0, 1, 2, 0]


def test_generation_rows_are_tokens_per_second_over_dense(quick):
    result, _, _ = quick
    rows = result["generation"]
    assert [r["variant"] for r in rows] == list(generation_variants("tiny"))
    dense = rows[0]
    for row in rows:
        assert row["new_tokens"] == 8 and row["tokens_per_s"] > 0
        assert row["vs_dense"] == pytest.approx(row["tokens_per_s"] / dense["tokens_per_s"], rel=1e-9)
        assert row["ms_per_token"] * row["tokens_per_s"] == pytest.approx(1e3, rel=1e-9)
    assert [r["config"] for r in result["models"]] == ["tiny-dense", "tiny-moe", "tiny-infmoe"]


def test_quick_result_renders_to_the_markdown_it_wrote(quick, tmp_path):
    result, md, stdout = quick
    assert md == markdown(result) == stdout
    # no --precision on the CPU: fp32, as training's "auto" there
    assert result["machine"]["precision"] == "auto" and result["machine"]["dtype"] == "float32"
    assert ", fp32;" in md.splitlines()[0]
    # no target's rows are measured at the quick shape: none is shown, none faked
    assert targets(result) == [] and "| what |" not in md


def not_compiled(result: dict) -> set[tuple]:
    """The row keys of the layers and models that did not compile in `result`."""
    return ({("train", r["shape"], r["variant"]) for r in result["layers"] if "error" in r}
            | {("model", r["config"]) for r in result["models"] if "error" in r})


def test_full_run_has_every_table_and_every_target(full):
    result, folder = full
    assert {r["shape"] for r in result["layers"]} == {"tiny", "gpt2-small"}
    assert sorted({(r["shape"], r["tokens"]) for r in result["decode"]}) == [
        (s, t) for s in ("gpt2-small", "tiny") for t in variants.DECODE_TOKENS]
    assert "gpt2-small-infmoe --units_per_block 256" in [r["config"] for r in result["models"]]
    # Every target is measured, but one whose layer or model did not compile (its row says so).
    unmeasured = [t for t in TARGETS if any(term not in measurements(result) for term in t.terms)]
    assert all(set(t.terms) & not_compiled(result) for t in unmeasured), [t.what for t in unmeasured]
    assert [c["what"] for c in targets(result)] == [t.what for t in TARGETS if t not in unmeasured]
    md = (folder / "b.md").read_text()
    assert md == markdown(result)
    with bench_output() as out:
        assert main(["bench", "--render", str(folder / "b.json"), "--markdown", str(folder / "again.md")]) == 0
    assert out.getvalue() == md == (folder / "again.md").read_text()


def test_compiled_rows_are_timed_with_the_eager_ones_and_say_what_did_not_compile(full):
    result, folder = full
    md = (folder / "b.md").read_text()
    train = by(result["layers"], "shape", "variant")
    for shape in ("tiny", "gpt2-small"):
        rows = [r for r in result["layers"] if r["shape"] == shape and r["compiled"]]
        assert [r["variant"] for r in rows] == list(compile_variants(SHAPES[shape]))
        base, full_width = (train[shape, compiled_label(name)] for name in (BASELINE, FULL))
        for r in rows:
            if "error" in r:
                assert f"| {shape} | {r['variant']} | did not compile: {r['error']} |" in md
                continue
            assert r["fwd_ms"] is None and r["fwd_bwd_ms"] > 0 and r["saved_mb"] >= 0 and r["peak_mb"] is None
            assert r["vs_dense"] == pytest.approx(r["fwd_bwd_ms"] / base["fwd_bwd_ms"], rel=1e-9)
            assert r["vs_full"] == pytest.approx(r["fwd_bwd_ms"] / full_width["fwd_bwd_ms"], rel=1e-9)
            eager = r["variant"].removesuffix(", compiled")
            twin = train.get((shape, eager)) or train.get((shape, f"{eager} (as configured)"))
            assert r["vs_eager"] == (None if twin is None else pytest.approx(r["fwd_bwd_ms"] / twin["fwd_bwd_ms"]))
        # compiled on the CPU, ∞-MoE takes the static plan, whose CPU costs pick the fused
        # full path at B = 1 and B = 64 alike (docs/speed.md)
        for block in (1, 64):
            assert train[shape, compiled_label(infmoe_label(block, 1))]["path"] == "full"
    models = {r["config"]: r for r in result["models"]}
    for size in ("tiny", "gpt2-small"):
        for ffn in variants.COMPILE_MODELS:
            row = models[f"{size}-{ffn} --compile"]
            assert row["compiled"] and ("error" in row or row["tokens_per_s"] > 0)
    assert result["machine"]["compile_backend"] == "aot_eager" and "`torch.compile(fullgraph=True)`, aot_eager" in md


def test_a_layer_that_does_not_compile_whole_gets_a_row_that_says_so(monkeypatch):
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 32)

        def forward(self, x):
            torch._dynamo.graph_break()
            return self.linear(x)

    shape = Shape("quick", 32, 768, 64, 64, 8)
    monkeypatch.setattr(tables, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(tables, "layer_variants", lambda shape, peers=True: variants.dense_variants(shape))
    monkeypatch.setattr(tables, "compile_variants", lambda shape: {compiled_label(BASELINE): lambda: DenseMLP(32, 384),
                                                                  "breaks, compiled": Breaks})
    with bench_output():
        rows = tables.layer_table(shape, 1, False, torch.device("cpu"), compile=True)
    assert [r["variant"] for r in rows] == [BASELINE, FULL, compiled_label(BASELINE), "breaks, compiled"]
    assert rows[3]["error"].startswith("Unsupported: ") and "graph_break" in rows[3]["error"]
    assert rows[2]["vs_eager"] == pytest.approx(rows[2]["fwd_bwd_ms"] / rows[0]["fwd_bwd_ms"])
    md = markdown(dict(machine=dict(device="cpu", gpu=None, processor="x", threads=1, torch="2"), repeats=1,
                       layers=rows, models=[]))
    assert f"| quick | breaks, compiled | did not compile: {rows[3]['error']} |" in md


def test_saved_for_backward_per_k_is_measured_and_a_target(quick, full):
    result, md, _ = quick
    rows = result["saved"]
    assert [(r["shape"], r["samples"], r["tokens"]) for r in rows] == [("quick", k, 512) for k in (1, 4, 16)]
    x = torch.randn(512, SHAPES["quick"].d_model, requires_grad=True)
    for r in rows:
        assert r["vs_k1"] == pytest.approx(r["saved_mb"] / rows[0]["saved_mb"])
        layer = variants.infmoe_builder(SHAPES["quick"], 1, r["samples"])()
        assert r["saved_mb"] == pytest.approx(memory.saved_bytes(layer, x) / 2**20) and r["path"] == layer.aux.path
        assert f"| quick | {r['samples']} | {r['path']} | {r['saved_mb']:.1f} | {r['vs_k1']:.2f} |" in md
    saved = {r["samples"]: r["saved_mb"] for r in full[0]["saved"] if r["shape"] == "gpt2-small"}
    (check,) = [c for c in targets(full[0]) if c["what"].startswith("saved for backward gpt2-small")]
    assert check["measured"] == pytest.approx(saved[16] / saved[1]) and check["limit"] == 1.25


def test_targets_are_measured_from_their_rows_and_met_when_within(full):
    result, _ = full
    checks = {c["what"]: c for c in targets(result)}
    for c in checks.values():
        assert c["met"] == {"<=": c["measured"] <= c["limit"], "<": c["measured"] < c["limit"],
                            ">=": c["measured"] >= c["limit"]}[c["op"]]
    train = by(result["layers"], "shape", "variant")
    decode = by(result["decode"], "shape", "tokens", "variant")
    generate = {r["variant"]: r["tokens_per_s"] for r in result["generation"]}
    configured = train["gpt2-small", "∞-MoE B=1 K=1 (as configured)"]["fwd_bwd_ms"]
    assert checks["training gpt2-small: ∞-MoE as configured / dense full H"]["measured"] == pytest.approx(
        configured / train["gpt2-small", FULL]["fwd_bwd_ms"])
    peers = [train["gpt2-small", peer_label(i)]["fwd_bwd_ms"] for i in PEER_IMPLEMENTATIONS]
    assert checks["training gpt2-small: ∞-MoE B=256 K=1 / the faster HF Mixtral peer"]["measured"] == pytest.approx(
        train["gpt2-small", "∞-MoE B=256 K=1"]["fwd_bwd_ms"] / min(peers))
    assert checks["decoding gpt2-small T=1: ∞-MoE B=64 mean / B=64 K=1"]["measured"] == pytest.approx(
        decode["gpt2-small", 1, "∞-MoE B=64 mean"]["ms"] / decode["gpt2-small", 1, "∞-MoE B=64 K=1"]["ms"])
    k1, k4, k16 = (generate[f"gpt2-small-infmoe K={k}"] for k in (1, 4, 16))
    falls = checks["model: gpt2-small-infmoe generate tokens/s falls with K (least of K=1/K=4, K=4/K=16)"]
    assert falls["measured"] == pytest.approx(min(k1 / k4, k4 / k16)) and falls["met"] == (k1 >= k4 >= k16)


def test_a_target_follows_its_rows(full):
    result, _ = full
    what = "training tiny: ∞-MoE as configured / dense active"
    for scale, met in ((0.1, True), (10.0, False)):
        doctored = json.loads(json.dumps(result))
        rows = by(doctored["layers"], "shape", "variant")
        base = rows["tiny", BASELINE]["fwd_bwd_ms"]
        rows["tiny", "∞-MoE B=64 K=1 (as configured)"]["fwd_bwd_ms"] = scale * base
        check = next(c for c in targets(doctored) if c["what"] == what)
        assert check["measured"] == pytest.approx(scale) and check["met"] is met
    doctored["generation"] = [r for r in doctored["generation"] if r["variant"] != "gpt2-small-dense"]
    left = [c["what"] for c in targets(doctored)]
    assert len(left) == len(targets(result)) - 1
    assert "model: gpt2-small-infmoe generate tokens/s at K=1 / dense" not in left


def test_the_named_shapes_are_what_the_configs_build():
    for name in ("tiny", "gpt2-small"):
        config = get_config(f"{name}-infmoe")
        layer = build_ffn(config.ffn, config.d_model, config.ffn_hidden, config.ffn_options)
        shape = SHAPES[name]
        assert (shape.d_model, shape.d_hidden, shape.units_per_block, shape.d_z) == (
            layer.d_model, layer.d_hidden, layer.units_per_block, layer.d_z)


def test_bench_precision_bf16_computes_and_says_bf16(tmp_path, monkeypatch):
    # smaller than --quick's own sizes, to keep the test fast; the code paths are the same
    monkeypatch.setitem(SHAPES, "quick", Shape("quick", 32, 768, 64, 64, 8))
    monkeypatch.setattr(tables, "build_model", lambda **kwargs: build_model(**kwargs, **SMALL_MODEL))
    monkeypatch.setattr(tables, "l3_cache_bytes", lambda: 64 * 1024)
    out = tmp_path / "bench.json"
    with bench_output():
        assert main(["bench", "--quick", "--precision", "bf16", "--repeats", "1", "--no-memory",
                     "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["precision"] == "bf16"
    # measured below autocast: the dtype the matmuls of each of our layers and models really got
    ours = [r for r in result["layers"] if not r["variant"].startswith("HF")]
    assert {r["dtype"] for r in ours + result["models"]} == {"bfloat16"}
    # decoding as `infmoe generate` does it: in the weights' dtype, no autocast
    assert {r["dtype"] for r in result["decode"] + result["generation"]} == {"float32"}
    ran = sorted({r["dtype"] for section in ("layers", "decode", "models", "generation") for r in result[section]})
    assert result["machine"]["dtype"] == (ran[0] if len(ran) == 1 else "mixed: " + ", ".join(ran))
    assert f", {dtype_label(result['machine'])};" in markdown(result).splitlines()[0]


def test_bench_layer_step_runs_the_forward_under_the_autocast_given():
    layer = DenseMLP(16, 32)
    x = torch.randn(8, 16, requires_grad=True)
    outputs = []
    layer.register_forward_hook(lambda module, args, y: outputs.append(y.dtype))
    harness.layer_step(layer, x, True, lambda: torch.autocast("cpu", dtype=torch.bfloat16))()
    harness.layer_step(layer, x, True)()
    assert outputs == [torch.bfloat16, torch.float32]
    assert layer.c_fc.weight.grad.dtype == torch.float32


def test_rendering_a_result_saved_before_dtypes_were_recorded_says_fp32():
    machine = dict(device="cpu", gpu=None, processor="x86_64", threads=2, torch="2.13")
    assert ", fp32;" in markdown(dict(machine=machine, repeats=1, layers=[], models=[])).splitlines()[0]


def test_a_result_saved_before_decoding_and_generation_renders_what_it_has():
    # the shape of docs/bench.json before those tables existed: no path, vs_full, decode, generation
    layer = dict(shape="gpt2-small", variant=BASELINE, union=None, fwd_ms=127.4, fwd_bwd_ms=342.8, vs_dense=1.0,
                 gflops=169.0, matmul_limit_gflops=185.0, saved_mb=48.0, peak_mb=92.0)
    models = [dict(config=f"gpt2-small-{ffn}", tokens_per_s=tps, vs_dense=tps / 182, step_ms=1024e3 / tps)
              for ffn, tps in (("dense", 182), ("infmoe", 93))]
    machine = dict(torch="2.13.0+cpu", threads=2, device="cpu", processor="x86_64", cpus=2, gpu=None)
    old = dict(machine=machine, repeats=7, layers=[layer], models=models)
    md = markdown(old)
    (line,) = [line for line in md.splitlines() if BASELINE in line]
    assert "127.4" in line and "342.8" in line
    assert all(f"| {r['config']} |" in md for r in models)
    assert "Decoding" not in md and "generation" not in md and "transformers" not in md
    (check,) = targets(old)  # the one target whose rows it has
    assert all(term[0] == "model" for term in next(t for t in TARGETS if t.what == check["what"]).terms)
    assert check["measured"] == pytest.approx(93 / 182) and check["met"] is False


def test_the_committed_bench_json_renders():
    result = json.loads((Path(__file__).parents[1] / "docs" / "bench.json").read_text())
    md = markdown(result)
    assert all(f"| {r['variant']} |" in md for r in result["layers"] + result.get("decode", []))
    assert all(f"| {r['config']} |" in md for r in result["models"])


def test_grid_compares_sparse_and_full_at_each_block_size_and_k(monkeypatch):
    monkeypatch.setitem(SHAPES, "quick", Shape("quick", 32, 768, 64, 64, 8))
    with bench_output() as out:
        assert main(["bench", "--grid", "--quick", "--repeats", "1", "--threads", "1"]) == 0
    lines = out.getvalue().splitlines()
    assert "fp32" in lines[0]
    assert lines[2] == "| B | " + " | ".join(f"K={k}" for k in variants.GRID_SAMPLES) + " |"
    rows = [line.split(" | ") for line in lines[4:]]
    assert [int(r[0].strip("| ")) for r in rows] == [b for b in variants.GRID_BLOCKS if 768 % b == 0]
    assert all(float(cell.strip(" |")) > 0 for r in rows for cell in r[1:])


def test_peak_of_runs_in_a_fresh_process():
    assert memory.peak_rss_rise(SHAPES["quick"], BASELINE, 1) > 0


@pytest.mark.parametrize("argv, expected", [(["--shapes", "huge"], "--shapes='huge'"),
                                            (["--repeats", "0"], "--repeats=0")])
def test_bad_input_is_one_line(capsys, argv, expected):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
