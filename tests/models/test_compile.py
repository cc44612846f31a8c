"""The GPU path, proven on a CPU.

- Every FFN and every training option compiles whole: `torch.compile(model,
  fullgraph=True)` of a GPT forward, loss with auxiliary losses included, then backward.
  ``backend="aot_eager"`` captures the same forward and backward graphs Inductor would get,
  without its code generation, so the tests stay fast; Inductor's speed is the bench's.
  The compiled model follows the static plan (fixed shapes, device offsets), the eager CPU
  model the host's: equal losses and gradients check one against the other.
- A training step of CUDA's plan, run on CPU tensors, issues no data-dependent operator:
  nothing that would make CUDA wait for the host (`count_data_dependent_ops`).
"""

import pytest
import torch

import infmoe
from dispatch_count import count_data_dependent_ops
from infmoe.layers import draw_train_samples, grouped
from infmoe.layers.dispatch import plan_device
from infmoe.training.step import clip_gradients, micro_step

TINY = dict(n_layer=1, d_model=32, n_head=2, vocab_size=128, n_ctx=32)
# name → (config, overrides): every FFN, ∞-MoE on both sides of the dispatch rule (grouped
# blocks, full width) at K = 1, 2, 4, and every training option
CASES = {
    "dense": ("tiny-dense", {}),
    "moe": ("tiny-moe", {}),
    "moe-capacity": ("tiny-moe", dict(capacity_factor=1.0)),
    "moe-swiglu-shared": ("tiny-moe", dict(glu=True, n_experts=7, top_k=3, shared_experts=1,
                                           capacity_factor=1.0)),
    "infmoe-B64-K1": ("tiny-infmoe", dict(d_hidden=512, units_per_block=64)),  # 8 blocks: grouped
    "infmoe-B64-K2": ("tiny-infmoe", dict(d_hidden=1024, units_per_block=64, n_samples=2, active_fraction=0.25)),
    "infmoe-B1-K1": ("tiny-infmoe", dict(units_per_block=1)),
    "infmoe-B1-K4": ("tiny-infmoe", dict(units_per_block=1, n_samples=4)),
    "infmoe-softmax": ("tiny-infmoe", dict(gate="softmax", n_samples=2)),
    "infmoe-constant-gate-kl": ("tiny-infmoe", dict(gate="constant", kl_weight=0.1, kl_free=0.5)),
    "infmoe-mixture": ("tiny-infmoe", dict(n_components=3, n_samples=2, mu_norm=True)),
    "infmoe-train-samples": ("tiny-infmoe", dict(train_samples=[1, 2, 4], sigma_min=0.3)),
    "infmoe-glu-B64-K2": ("tiny-infmoe", dict(d_hidden=1024, units_per_block=64, n_samples=2, active_fraction=0.25,
                                              glu=True)),  # gated: grouped on CUDA's plan
}


def build(case: str) -> infmoe.GPT:
    config, overrides = CASES[case]
    torch.manual_seed(0)
    return infmoe.build_model(config, **TINY, **overrides).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, TINY["vocab_size"], (2, 17), generator=g)  # 34 tokens: nothing divides evenly
    return idx[:, :-1], idx[:, 1:]


def loss_and_grads(model: infmoe.GPT, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same K and noise eager and compiled
    out = micro_step(model, forward, x, y)
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_the_whole_model_compiles_into_one_graph_forward_and_backward(case, monkeypatch):
    model = build(case)
    monkeypatch.setattr(grouped, "_SUPPORTED", {})  # compiled first, as a fresh process would
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with plan_device("cuda"):  # the choices CUDA's plan makes, compiled as a GPU would compile them
        loss, grads = loss_and_grads(model, compiled)
    eager_loss, eager_grads = loss_and_grads(model, model)  # the CPU's host plan
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    stats = model.routing_stats()  # read outside the graph, from what the graph left
    assert all(torch.isfinite(v).all() for v in stats.values())

    compiled(*batch())  # the last call was eager: read what the compiled one ran
    paths = {f.aux.path for f in model.ffn_layers()} - {None}
    assert paths <= {"full", "grouped", "masked"}  # the static plan's training paths only


def test_compiled_on_the_cpu_blocks_take_the_full_path():
    """The CPU's compiled cost model: gathering all K · T · n_kept rows at once costs more
    than Inductor's fused full path, so auto picks full there and grouped for CUDA."""
    model = build("infmoe-B64-K1")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(*batch())
    assert model.ffn_layers()[0].aux.path == "full"
    with plan_device("cuda"):
        compiled(*batch())
    assert model.ffn_layers()[0].aux.path == "grouped"


@pytest.mark.parametrize("case", CASES)
def test_a_training_step_of_cudas_plan_never_waits_on_the_host(case):
    model = build(case)
    x, y = batch()
    draw_train_samples(model)  # on the host from torch's CPU generator: no device data read

    def step():
        model(x, y).loss.backward()
        clip_gradients(model, 1.0)

    with plan_device("cuda"):
        counts = count_data_dependent_ops(step)
    assert not counts, f"data-dependent operators on CUDA's plan: {dict(counts)}"


def test_the_counter_sees_what_the_host_plan_reads():
    """The count above can fail: the CPU's own plan reads routing results on the host."""
    model = build("infmoe-B64-K1")
    x, y = batch()
    counts = count_data_dependent_ops(lambda: micro_step(model, model, x, y))
    assert counts, "the host plan's nonzero and counts went unseen"


def test_compiled_training_samples_need_k_drawn_on_the_host():
    model = build("infmoe-train-samples")
    x, y = batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="draw_train_samples"):
        compiled(x, y)
