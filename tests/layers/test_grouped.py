"""The static grouped executor (`grouped_ffn_static`) against the host one (`grouped_ffn`) and a
plain autograd reference; the grouped-matmul kernel's contract (`strict_grouped_mm`); the
1023-groups cap; `torch.compile`.

Rows come unsorted, with groups no row reached (first, last, in the middle); groups are
GELU MLPs or gated (`glu`: w1 holds each group's B gate columns, then its B up columns).
Tolerances:
float64 1e-10 (the loop runs), float32 1e-5 (torch._grouped_mm runs), bfloat16 against
float64 arithmetic on the same bf16-rounded inputs, loosely (its sums are kept in fp32).
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dispatch_count import count_data_dependent_ops
from infmoe import ConfigError
from infmoe.layers import grouped
from infmoe.layers.grouped import (
    MAX_GROUPS, grouped_ffn, grouped_ffn_static, grouped_mm_contract, grouped_mm_supported, plan_chunks,
    static_grouped_mm, strict_grouped_mm,
)

NAMES = ("x", "gate", "w1", "b1", "w2")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = dict(argvalues=[torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
EMPTY = (0, 3, 6)  # of 7 groups
GLUS = dict(argvalues=[None, "silu", "gelu"], ids=["gelu-mlp", "swiglu", "geglu"])


class Case:
    """Rows (token, group) in random order over `groups` groups, none in `empty`; float64
    master values of x (T, d), gate (rows,), w1 (G, d, B) (stored (G, B, d) when
    transposed), b1 (G, B), w2 (G, B, d), and dy (T, d). `empty` (G,): the groups no row
    reached."""

    def __init__(self, *, t=6, d=16, b=8, groups=7, rows=20, empty=EMPTY, transposed=False, seed=0, glu=None):
        g = torch.Generator().manual_seed(seed)
        used = torch.tensor([i for i in range(groups) if i not in empty])
        self.group = used[torch.randint(len(used), (rows,), generator=g)]
        self.token = torch.randint(t, (rows,), generator=g)
        self.empty = torch.bincount(self.group, minlength=groups) == 0
        self.transposed, self.glu = transposed, glu
        r = b if glu is None else 2 * b  # w1's columns per group
        w1_shape = (groups, r, d) if transposed else (groups, d, r)
        shapes = [(t, d), (rows,), w1_shape, (groups, r), (groups, b, d)]
        scale = [1, 1, d**-0.5, 1, b**-0.5]
        self.values = [torch.randn(*s, generator=g, dtype=torch.float64) * c for s, c in zip(shapes, scale)]
        self.dy = torch.randn(t, d, generator=g, dtype=torch.float64)

    def round_to(self, dtype: torch.dtype) -> "Case":
        """Round the values to dtype (kept in float64): a reference on the same inputs."""
        self.values = [v.to(dtype).double() for v in self.values]
        self.dy = self.dy.to(dtype).double()
        return self

    def run(self, ffn, dtype, **kw) -> dict[str, torch.Tensor]:
        """Output and the five gradients of ffn(x, token, group, gate, w1, b1, w2) in dtype."""
        leaves = [v.to(dtype, copy=True).requires_grad_() for v in self.values]
        x, gate, w1, b1, w2 = leaves
        w1 = w1.transpose(1, 2) if self.transposed else w1
        y = ffn(x, self.token, self.group, gate, w1, b1, w2, glu=self.glu, **kw)
        y.backward(self.dy.to(y.dtype))
        return {"y": y.detach()} | {f"d{n}": p.grad for n, p in zip(NAMES, leaves)}


def host(x, token, group, gate, w1, b1, w2, glu=None):
    """`grouped_ffn` on the same rows: sorted by group, counted on the host."""
    order = group.argsort(stable=True)
    counts = torch.bincount(group, minlength=w1.shape[0])
    return grouped_ffn(x, token[order], counts, gate[order], w1, b1, w2, glu=glu)


def reference(x, token, group, gate, w1, b1, w2, glu=None):
    """The definition, with autograd: Σ over rows of gate · GELU(x[token] @ w1[group] + b1) @ w2,
    or gated: act(a[:, :B]) ⊙ a[:, B:] in GELU's place."""
    a = torch.einsum("rd,rdb->rb", x[token], w1[group]) + b1[group]
    b = w2.shape[1]
    h = F.gelu(a, approximate="tanh") if glu is None else {
        "silu": F.silu(a[:, :b]), "gelu": F.gelu(a[:, :b], approximate="tanh")}[glu] * a[:, b:]
    rows = torch.einsum("rb,rbd->rd", gate[:, None] * h, w2[group])
    return torch.zeros_like(x).index_add(0, token, rows)


def assert_close(actual: dict, expected: dict, tol: float) -> None:
    for key, value in expected.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(actual[key].double(), value.double(), rtol=tol, atol=tol * scale, msg=key)


def assert_empty_groups_exactly_zero(grads: dict, empty: torch.Tensor) -> None:
    for name in ("dw1", "db1", "dw2"):
        grad = grads[name]
        assert torch.equal(grad[empty], torch.zeros_like(grad[empty])), name
        assert (grad[~empty].flatten(1).abs().sum(1) > 0).all(), name


@pytest.mark.parametrize("glu", **GLUS)
@pytest.mark.parametrize("transposed", [False, True], ids=["w1", "w1-transposed"])
@pytest.mark.parametrize("dtype", **DTYPES)
def test_static_equals_host_and_reference(dtype, transposed, glu):
    case = Case(transposed=transposed, glu=glu).round_to(dtype)
    assert case.empty.nonzero().flatten().tolist() == list(EMPTY)
    static = case.run(grouped_ffn_static, dtype)
    assert_close(static, case.run(reference, torch.float64), TOL[dtype])
    assert_close(static, case.run(host, dtype), TOL[dtype])
    assert_empty_groups_exactly_zero(static, case.empty)
    assert all(static[key].dtype == dtype for key in static)


def nan_for_empty_groups(a, b, offs):
    """A kernel that leaves garbage where it has nothing to compute, as a grouped GEMM may:
    the weight-gradient form's groups without rows come back NaN."""
    out = torch._grouped_mm(a, b, offs=offs)
    if b.dim() == 2:
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        out[sizes == 0] = float("nan")
        nan_for_empty_groups.calls += 1
    return out


@pytest.mark.parametrize("glu", [None, "silu"], ids=["gelu-mlp", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ffn", [grouped_ffn_static, host], ids=["static", "host"])
def test_empty_groups_get_exact_zeros_whatever_the_kernel_leaves(ffn, dtype, glu):
    nan_for_empty_groups.calls = 0
    with grouped_mm_contract(nan_for_empty_groups):
        grads = Case(transposed=True, glu=glu).run(ffn, dtype)
    assert nan_for_empty_groups.calls == 2  # dw1 and dw2 came back with NaNs for the empty groups
    assert_empty_groups_exactly_zero(grads, Case().empty)  # without the zeroing: NaN


def test_static_refuses_more_groups_than_one_kernel_call_takes():
    x, token, group, gate = torch.randn(2, 8), torch.tensor([0, 1]), torch.tensor([5, 1000]), torch.ones(2)
    w1, b1, w2 = torch.randn(1024, 8, 8), torch.randn(1024, 8), torch.randn(1024, 8, 8)
    grouped_ffn_static(x, token, group, gate, w1[:MAX_GROUPS], b1[:MAX_GROUPS], w2[:MAX_GROUPS])  # 1023: fine
    with pytest.raises(ConfigError) as err:
        grouped_ffn_static(x, token, group, gate, w1, b1, w2)
    message = str(err.value)
    assert "1024 groups" in message and "at most 1023" in message and "impl='full'" in message
    assert "\n" not in message


def test_host_chunks_hold_at_most_1023_groups_without_a_byte_limit():
    counts = torch.ones(6144, dtype=torch.long)
    counts[::7] = 0
    chunks = plan_chunks(torch.arange(int(counts.sum())), counts, row_bytes=0, max_bytes=None)
    assert [c.group_end - c.group_start for c in chunks] == [1023] * 6 + [6]
    assert all(len(c.offs) == len(c.counts) for c in chunks)


def test_host_path_with_cudas_settings_keeps_each_kernel_call_under_1024_groups(monkeypatch):
    """On CUDA `row_bytes_for` is 0: no byte limit, one chunk, which at block size 1 put all
    6144 groups of the gpt2-small width in one kernel call. The strict stand-in refuses 1024
    groups or more. 2047 groups (chunks of 1023, 1023, 1) keep torch's per-group CPU loop short."""
    monkeypatch.setattr(grouped, "row_bytes_for", lambda x: 0)
    case = Case(t=64, d=8, b=8, groups=2047, rows=1500, empty=range(0, 2047, 7), seed=1)
    case.round_to(torch.bfloat16)
    with grouped_mm_contract():
        fast = case.run(host, torch.bfloat16)
    assert_close(fast, case.run(reference, torch.float64), TOL[torch.bfloat16])
    assert_empty_groups_exactly_zero(fast, case.empty)


# --- the kernel's contract ---------------------------------------------------------------


def operands(dtype=torch.bfloat16, rows=12, k=8, n=8, groups=3):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(groups, k, n, generator=g).to(dtype)
    offs = torch.tensor([4, 4, rows], dtype=torch.int32)[:groups]
    return a, b, offs


def misaligned_address():
    a, b, offs = operands()
    return torch.empty(a.numel() + 1, dtype=a.dtype)[1:].view_as(a).copy_(a), b, offs


@pytest.mark.parametrize("make,problem", [
    (lambda: operands(torch.float32), "bfloat16 only"),
    (lambda: operands(k=3), "not 16-byte aligned"),  # bf16 rows of 3: 6-byte strides
    (misaligned_address, "address is not 16-byte aligned"),
    (lambda: (*operands()[:2], operands()[2].long()), "int32"),
    (lambda: (*operands(groups=1)[:2], torch.full((1024,), 12, dtype=torch.int32)), "1024 groups"),
    (lambda: (operands(rows=16)[0].T.contiguous().T, *operands(rows=16)[1:]), "jagged dim 0 is its contig"),
], ids=["fp32", "stride", "address", "offs-int64", "1024-groups", "jagged-contiguous"])
def test_strict_stand_in_refuses_what_the_cuda_kernel_refuses(make, problem):
    a, b, offs = make()
    with pytest.raises(RuntimeError, match="torch._grouped_mm contract: .*" + problem):
        strict_grouped_mm(a, b, offs)


def test_strict_stand_in_computes_the_op_and_reads_no_values():
    a, b, offs = operands()
    left, right = a.T, torch.randn(12, 16).bfloat16()  # the weight-gradient form: (m, rows) x (rows, n)
    assert count_data_dependent_ops(lambda: strict_grouped_mm(a, b, offs)) == Counter()
    torch.testing.assert_close(strict_grouped_mm(a, b, offs), torch._grouped_mm(a, b, offs=offs))
    assert strict_grouped_mm(left, right, offs).shape == (3, 8, 16)


@pytest.mark.parametrize("glu", **GLUS)
@pytest.mark.parametrize("transposed", [False, True], ids=["w1", "w1-transposed"])
def test_static_keeps_the_kernels_contract_in_bf16(transposed, glu):
    case = Case(transposed=transposed, glu=glu)
    free = case.run(grouped_ffn_static, torch.bfloat16)
    with grouped_mm_contract():
        strict = case.run(grouped_ffn_static, torch.bfloat16)
    assert_close(strict, free, 0)


def test_static_under_bf16_autocast_runs_in_bf16_with_fp32_gradients():
    case = Case()
    with torch.autocast("cpu", dtype=torch.bfloat16), grouped_mm_contract():
        fast = case.run(grouped_ffn_static, torch.float32)
    assert fast["y"].dtype == torch.bfloat16 and fast["dw1"].dtype == torch.float32
    assert_close(fast, case.round_to(torch.bfloat16).run(reference, torch.float64), TOL[torch.bfloat16])


@pytest.mark.parametrize("glu", [None, "silu"], ids=["gelu-mlp", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_compiles_whole_forward_and_backward(dtype, glu):
    """fullgraph: no graph break. float32 runs the opaque op (torch's fake kernel of
    _grouped_mm takes bf16 only), bfloat16 torch._grouped_mm itself."""
    case = Case(transposed=True, glu=glu)
    compiled = torch.compile(grouped_ffn_static, backend="aot_eager", fullgraph=True)
    assert_close(case.run(compiled, dtype), case.run(grouped_ffn_static, dtype), 0)


# --- where the kernel runs -----------------------------------------------------------------


def test_grouped_mm_supported_reads_version_and_capability_once(monkeypatch):
    monkeypatch.setattr(grouped, "_SUPPORTED", {})
    assert grouped_mm_supported("cpu", torch.float32) and grouped_mm_supported("cpu", torch.bfloat16)
    assert not grouped_mm_supported("cpu", torch.float64)
    assert not grouped_mm_supported("meta", torch.bfloat16)
    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    assert not grouped_mm_supported("cuda:0", torch.bfloat16)  # sm80: torch's own host-synchronising loop
    assert grouped_mm_supported("cuda:1", torch.bfloat16) is False
    capability[0] = (9, 0)
    assert grouped_mm_supported("cuda:0", torch.bfloat16) is False  # decided once for cuda:0
    assert grouped_mm_supported("cuda:2", torch.bfloat16)
    assert not grouped_mm_supported("cuda:2", torch.float32)  # torch's own loop again
    capability[0] = (10, 0)
    assert grouped_mm_supported("cuda:3", torch.bfloat16)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.8.0"))
    assert not grouped_mm_supported("cpu", torch.float16)  # torch 2.8 has no CPU kernel
    assert not grouped_mm_supported("cuda:4", torch.bfloat16)  # nor sm100 before 2.9, to be safe


def test_static_plan_without_the_kernel_on_an_accelerator_is_a_clear_error():
    a, b, offs = (t.to("meta") for t in operands(torch.float32))  # not the CPU, not a dtype it takes
    with pytest.raises(ConfigError, match="impl='full'"):
        static_grouped_mm(a, b, offs)
