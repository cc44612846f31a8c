import math

import pytest
import torch

from infmoe import GPT, ConfigError, DenseMLP, GPTConfig, InfiniteMoE, TopKMoE, build_model, sampling

TINY = dict(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16)


def tiny(ffn="dense", **kw) -> GPT:
    torch.manual_seed(0)
    options = {"infmoe": dict(d_z=4), "moe": dict(n_experts=4, top_k=2)}.get(ffn, {})
    return build_model(dict(TINY, ffn=ffn, ffn_options=options) | kw)


def batch(b=3, t=16, vocab=64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("ffn", ["dense", "moe", "infmoe"])
def test_forward_shapes_and_initial_loss_near_uniform(ffn):
    model = tiny(ffn)
    idx = batch()
    out = model(idx, torch.roll(idx, 1, dims=1))
    assert out.logits.shape == (3, 16, 64)
    assert abs(out.lm_loss.item() - math.log(64)) < 0.1  # small init: near-uniform predictions
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert model(idx).loss is None


@pytest.mark.parametrize("ffn", ["dense", "moe", "infmoe"])
def test_is_causal(ffn):
    model = tiny(ffn).eval()
    idx = batch()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with sampling(model, mode="mean"):  # deterministic routing for ∞-MoE
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_embeddings_tied_and_parameters_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_ffn_field_chooses_the_layer_and_ffn_every_interleaves_dense():
    assert all(isinstance(f, InfiniteMoE) for f in tiny("infmoe").ffn_layers())
    model = tiny("moe", n_layer=4, ffn_every=2)
    kinds = [type(f) for f in model.ffn_layers()]
    assert kinds == [DenseMLP, TopKMoE, DenseMLP, TopKMoE]
    assert model.ffn_layers()[0].d_hidden == 4 * 16


def test_aux_losses_collected_from_every_routed_block():
    model = tiny("moe", n_layer=3)
    idx = batch()
    out = model(idx, idx)
    expected = sum(f.aux.loss for f in model.ffn_layers())
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss > 0
    kl = tiny("infmoe", ffn_options=dict(d_z=4, kl_weight=0.1))
    out = kl(idx, idx)
    torch.testing.assert_close(out.aux_loss, sum(0.1 * f.aux.stats["kl"] for f in kl.ffn_layers()))
    assert tiny("infmoe")(idx, idx).aux_loss == 0


def test_routing_stats_keyed_by_block():
    model = tiny("infmoe")
    model(batch())
    stats = model.routing_stats()
    assert {"block0.sigma_mean", "block1.union_fraction", "block1.block_usage"} <= set(stats)
    assert stats["block1.block_usage"].shape == (8 * 16,)


def test_residual_projections_use_scaled_init():
    model = build_model(dict(TINY, d_model=64, n_head=2, n_layer=8, ffn="infmoe", ffn_options=dict(d_z=4)))
    out_std = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.blocks[0].ffn.w_out.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.blocks[0].ffn.w_in.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("ffn", ["dense", "moe", "infmoe"])
def test_tiny_model_learns_a_batch(ffn):
    model = tiny(ffn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = batch()
    targets = torch.roll(idx, -1, dims=1)
    first = None
    for _ in range(40):
        loss = model(idx, targets).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sampling_context_reaches_every_infmoe_layer():
    model = tiny("infmoe", n_layer=3)
    with sampling(model, n_samples=3):
        assert [f.n_samples for f in model.ffn_layers()] == [3, 3, 3]
    assert [f.n_samples for f in model.ffn_layers()] == [1, 1, 1]


def test_too_long_sequence_is_rejected():
    with pytest.raises(ConfigError, match="n_ctx=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_head=3), "n_head=3"),
        (dict(ffn="mlp"), "ffn='mlp'"),
        (dict(ffn_every=0), "ffn_every=0"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(ffn="infmoe"), "needs the option 'd_z'"),
        (dict(ffn="infmoe", ffn_options=dict(d_z=4, units_per_block=7)), "units_per_block=7"),
        (dict(ffn="dense", ffn_options=dict(d_z=4)), "ffn_options.d_z"),
    ],
)
def test_bad_config_fields_raise_one_clear_error(fields, message):
    with pytest.raises(ConfigError) as err:
        GPTConfig(**(TINY | fields))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("ffn,b", [("dense", 3), ("moe", 3), ("infmoe", 3), ("infmoe", 1)])
def test_kv_cache_gives_the_same_logits_as_the_full_pass(ffn, b):
    """With one sequence, ∞-MoE decodes each token on the row-reading path; the full pass
    runs the full-width one."""
    from infmoe import KVCache

    model = tiny(ffn).eval()
    idx = batch(b=b, t=12)
    with sampling(model, mode="mean"), torch.no_grad():
        full = model(idx).logits
        cache = KVCache(model.config, batch_size=b)
        pieces = [model(idx[:, :5], cache=cache).logits]  # prefill, then one token at a time
        pieces += [model(idx[:, i : i + 1], cache=cache).logits for i in range(5, 9)]
        pieces.append(model(idx[:, 9:], cache=cache).logits)  # a chunk after cached tokens
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_rejects_overflow():
    from infmoe import KVCache

    model = tiny()
    cache = KVCache(model.config, batch_size=1)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ConfigError, match="n_ctx=16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
