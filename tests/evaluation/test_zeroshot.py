"""Zero-shot scoring against a brute-force reference, batching, determinism, metrics."""

from __future__ import annotations

import math

import pytest
import torch

import infmoe
from infmoe.data import Tokenizer
from infmoe.errors import DataError
from infmoe.evaluation.tasks import Request
from infmoe.evaluation.zeroshot import encode_pairs, evaluate_task, judge, mean_and_stderr

N_CTX = 48


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from pydoc_data.topics import topics

    return Tokenizer.train_bpe([topics[k] for k in sorted(topics)][:200], 300, progress=False)


def tiny_model(tokenizer: Tokenizer, **overrides) -> infmoe.GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=tokenizer.vocab_size, n_ctx=N_CTX, n_layer=1, d_model=32, n_head=2)
    return infmoe.build_model(config | overrides).eval()


@pytest.fixture(scope="module")
def dense(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def infinite(tokenizer):
    return tiny_model(tokenizer, ffn="infmoe", ffn_options=dict(d_z=4))


LONG = "The quick brown fox jumps over the lazy dog, then naps in the warm sun by the river bank. " * 3


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    """A mix of every shape: several choices, partial scoring, greedy, an empty context, a
    context ending in spaces, and contexts longer than n_ctx (cut from the left)."""
    return [
        Request.choice("Question: What colour is the sky?\nAnswer:", ["blue", "green", "a very dark red"], 0),
        Request.choice("The cat sat on the", ["mat.", "moon, far away."], 0),
        Request.choice(LONG + "Finally the fox", ["slept.", "went home to its den."], 1),
        Request.choice("Ends in spaces  ", ["word", "two words"], 1),
        Request.choice("", ["an empty context", "none"], 0),
        Request(
            contexts=("Ann lent Bo a pen because Ann", "Ann lent Bo a pen because Bo"),
            continuations=(" had two.",) * 2,
            gold=1,
        ),
        Request(contexts=(LONG + "said",), continuations=(" Tom",), gold=0, greedy=True),
        Request.choice("Yes or no?", ["no", "yes"], 1, normalise=False),
    ] * 2


def reference_pair(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | context), greedy?), one sequence at a time, unbatched."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:
        context_ids = tokenizer.encode(context)
        target = tokenizer.encode(context + continuation)[len(context_ids) :]
    else:
        context_ids, target = [tokenizer.eot_id], tokenizer.encode(continuation)
    tokens = (context_ids + target)[-(N_CTX + 1) :]
    with torch.no_grad():
        logp = model(torch.tensor([tokens[:-1]])).logits[0].double().log_softmax(-1)
    positions = range(len(tokens) - 1 - len(target), len(tokens) - 1)
    total = sum(logp[t, tokens[t + 1]].item() for t in positions)
    greedy = all(logp[t].argmax().item() == tokens[t + 1] for t in positions)
    return total, greedy


def lls(result: dict) -> list[float]:
    return [ll for p in result["predictions"] for ll in p["loglikelihoods"]]


def test_matches_brute_force_reference(dense, tokenizer, requests):
    result = evaluate_task(dense, tokenizer, requests, batch_size=5, progress=False)
    for request, prediction in zip(requests, result["predictions"]):
        expected = [reference_pair(dense, tokenizer, c, t) for c, t in request.pairs]
        # batched and padded vs one sequence at a time: rounding only (measured 1.3e-6 at most)
        assert prediction["loglikelihoods"] == pytest.approx([e[0] for e in expected], abs=1e-5)
        if request.greedy:
            assert prediction["correct"] == expected[0][1]
    assert result["n"] == len(requests)
    assert set(result) == {"n", "skipped", "acc", "acc_stderr", "seconds", "predictions"}  # some lack acc_norm
    assert result["skipped"] == 0


def test_batching_does_not_change_scores(dense, infinite, tokenizer, requests):
    for model in (dense, infinite):  # ∞-MoE in sample mode: its noise is pinned per sequence
        one = evaluate_task(model, tokenizer, requests, batch_size=1, progress=False)
        seven = evaluate_task(model, tokenizer, requests, batch_size=7, progress=False)
        # Batches of 7 pad and multiply other shapes than batches of 1: the sums of log p
        # differ by rounding (measured 4.8e-7 at most), so abs=1e-5; the choices of a request
        # differ by 0.3 or more, so no prediction, and no accuracy, can flip by rounding.
        assert lls(seven) == pytest.approx(lls(one), abs=1e-5)
        assert seven["acc"] == one["acc"]


def test_sampling_is_seeded_and_settable(infinite, tokenizer, requests):
    state = torch.random.get_rng_state()

    def run(**kw) -> list[float]:
        return lls(evaluate_task(infinite, tokenizer, requests, progress=False, **kw))

    base = run(seed=1)
    assert run(seed=1) == base
    assert run(seed=2) != base
    assert run(seed=1, n_samples=4) != base
    assert run(seed=1, mode="mean") == pytest.approx(run(seed=2, mode="mean"), abs=1e-6)  # z = μ: no noise
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is not disturbed
    layer = infinite.blocks[0].ffn
    assert (layer.n_samples, layer.mode, infinite.training) == (1, "sample", False)  # restored


def test_model_mode_is_restored(tokenizer, requests):
    model = tiny_model(tokenizer).train()
    evaluate_task(model, tokenizer, requests[:2], progress=False)
    assert model.training


def forced_model(tokenizer: Tokenizer, favourite: list[int]) -> infmoe.GPT:
    """A model whose every next-token distribution puts nearly all its mass, evenly, on
    `favourite`: the final LayerNorm outputs a constant vector e_0 and only the favourite
    tokens' (tied) embeddings have a large component along it."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[:, 0] = 0.0
        model.wte.weight[favourite, 0] = 30.0
    return model


@pytest.mark.parametrize("gold", [0, 1, 2])
def test_forced_preference_gives_known_answer(tokenizer, gold):
    context, choices = "Pick one:", ["the", "is", "in"]
    ids = [target for _, target in encode_pairs(tokenizer, [(context, " " + c) for c in choices])]
    assert sorted(map(len, ids)) == [1, 1, 1] and len(set(map(tuple, ids))) == 3  # one distinct token each
    model = forced_model(tokenizer, ids[1])
    result = evaluate_task(model, tokenizer, [Request.choice(context, choices, gold)], progress=False)
    ll = result["predictions"][0]["loglikelihoods"]
    assert ll[1] > -1e-3 and max(ll[0], ll[2]) < -20
    assert result["predictions"][0]["pred"] == result["predictions"][0]["pred_norm"] == 1
    assert result["acc"] == result["acc_norm"] == float(gold == 1)
    assert math.isnan(result["acc_stderr"])  # one item: no sample standard deviation


def test_greedy_request_is_correct_only_for_the_greedy_word(tokenizer):
    ((_, word),) = encode_pairs(tokenizer, [("Hello", " there")])
    model = forced_model(tokenizer, word[:1])
    greedy_word = tokenizer.decode(word[:1])
    requests = [
        Request(contexts=("Hello",), continuations=(c,), gold=0, greedy=True) for c in (greedy_word, " zebra")
    ]
    result = evaluate_task(model, tokenizer, requests, progress=False)
    assert [p["correct"] for p in result["predictions"]] == [True, False]
    assert result["acc"] == 0.5 and "acc_norm" not in result


def test_acc_norm_divides_by_characters():
    request = Request.choice("Q:", ["short", "a much longer answer"], 1)
    assert request.norm_lengths == (5, 20)
    prediction = judge(request, [-10.0, -12.0], [False, False])
    assert (prediction["pred"], prediction["pred_norm"]) == (0, 1)  # -10/5 = -2 < -12/20 = -0.6
    assert (prediction["correct"], prediction["correct_norm"]) == (False, True)


def test_acc_norm_differs_from_acc_on_a_model(dense, tokenizer):
    requests = [Request.choice("Tell me:", ["it", "a long and winding sentence about many things"], 0)] * 3
    result = evaluate_task(dense, tokenizer, requests, progress=False)
    prediction = result["predictions"][0]
    ll = prediction["loglikelihoods"]
    assert prediction["pred"] == max(range(2), key=lambda i: ll[i])
    assert prediction["pred_norm"] == max(range(2), key=lambda i: ll[i] / requests[0].norm_lengths[i])
    assert prediction["pred"] != prediction["pred_norm"]  # the long choice loses on sum, wins per character
    assert (result["acc"], result["acc_norm"]) == (1.0, 0.0)


def test_stderr_is_sample_std_over_sqrt_n():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert stderr == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25, n = 4


def test_encoding_moves_trailing_spaces_to_the_continuation(tokenizer):
    ((context, target),) = encode_pairs(tokenizer, [("Hello  ", "world")])
    assert tokenizer.decode(context) == "Hello"
    assert tokenizer.decode(target) == "  world"
    ((context, target),) = encode_pairs(tokenizer, [("", " world")])
    assert context == [tokenizer.eot_id] and tokenizer.decode(target) == " world"


def test_continuation_longer_than_n_ctx_is_refused(dense, tokenizer):
    with pytest.raises(DataError, match=r"item 0, choice 1: the continuation is \d+ tokens; it must be 1 to"):
        evaluate_task(dense, tokenizer, [Request.choice("Q", ["ok", LONG], 0)], progress=False)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer, requests):
    small = tiny_model(tokenizer, vocab_size=260)
    with pytest.raises(DataError, match="outside the model's vocabulary of 260; use the tokenizer the model"):
        evaluate_task(small, tokenizer, requests, progress=False)


def test_no_requests(dense, tokenizer):
    with pytest.raises(DataError, match="no requests"):
        evaluate_task(dense, tokenizer, [], progress=False)


def test_skip_too_long_leaves_out_only_the_items_that_cannot_fit():
    from infmoe import build_model
    from infmoe.data import Tokenizer
    from infmoe.errors import DataError
    from infmoe.evaluation.tasks import Request
    from infmoe.evaluation.zeroshot import evaluate_task

    tokenizer = Tokenizer.train_bpe(["a b c d e f g h"] * 20, 300, progress=False)
    model = build_model(dict(vocab_size=tokenizer.vocab_size, n_ctx=8, n_layer=1, d_model=16, n_head=2))
    requests = [Request(contexts=("a b", "a b"), continuations=(" c" * length, " d"), gold=0)
                for length in (2, 30, 3)]
    with pytest.raises(DataError, match="item 1"):
        evaluate_task(model, tokenizer, requests, progress=False)
    result = evaluate_task(model, tokenizer, requests, progress=False, skip_too_long=True)
    assert result["n"] == 2 and result["skipped"] == 1
