"""`infmoe bench`: what the FFN variants cost, as ratios measured in one process.

These tables, each row a ratio to a baseline timed in the same run:

- **Training, one layer** (per shape, T tokens, `--tokens` or the shape's own, forward+backward):
  a dense MLP of the ∞-MoE's *active* width H/2 (the baseline), a dense MLP of the full width
  H, ∞-MoE as the shape's named config builds it (`tiny-infmoe`: B = 64; `gpt2-small-infmoe`:
  B = 1, per unit), at B = 64 and 256 with K = 1 and B = 64 with K = 4, one masked-reference
  row, our top-k MoE (4 of 8), and the peers: HF transformers' `MixtralSparseMoeBlock` at
  equal total and active parameters (`MixtralPeer`), eager and grouped_mm, when transformers
  imports. Each row names the path that ran (`FFNAux.path` of its last timed call), the
  measured union of its K masks, its time over both dense MLPs, and two GFLOP/s: what each
  method needs (`FFNLayer.flops_per_token`; ∞-MoE at the measured union, the Mixtral peer
  its router and the three matmuls of each of its top-k experts), and what the path that
  training takes there executes (``executed=True``, which asks the same dispatch rule; the
  full path computes all of H), 3 × the forward each. The executed GFLOP/s is also given
  against a plain matmul timed in the same run (the most this machine does with one matrix
  product).
- **Training, one layer, compiled** (`--compile`): both dense MLPs, ∞-MoE at B = 1 and 64
  with K = 1, and the peers, each under ``torch.compile(fullgraph=True)`` (inductor),
  compiled and warmed up before anything is timed, then timed alternated with the eager rows:
  ratios to the compiled dense MLPs and to the same layer eager. A layer that does not
  compile whole gets a row that says so.
- **Saved for backward** (unless `--no-memory`): bytes autograd keeps of ∞-MoE at B = 1 with
  K = 1, 4 and 16 on `SAVED_TOKENS` tokens: K must not multiply them.
- **Decoding, one layer** (no grad, T = 1, 16, 128 tokens per call): both dense MLPs and
  ∞-MoE at B = 1 and 64, K = 1, 4, 16 and mode "mean", each on the path `impl="auto"` takes.
  At T = 1 the cost is reading weights, and a layer timed over and over is served from the
  CPU cache (a gpt2-small dense MLP of the active width is 19 MB, this machine's L3 32 MiB),
  while in a model every layer's weights are evicted by the other layers' reads. So each
  variant cycles through copies of itself whose weights total `CACHE_FACTOR` × the L3
  cache, the i-th call on copy i mod n: a copy comes round again only after the others
  have been read, and its weights come from memory.
- **Whole model, training**: tokens/s of the training step (`infmoe.training.step.train_step`:
  forward, backward, gradient clipping, AdamW) of the dense, top-k MoE and ∞-MoE configs of a
  size (and ∞-MoE with blocks where the config routes per unit), over the dense model's; with
  `--compile` also the dense and ∞-MoE configs with the forward compiled as
  ``infmoe train --compile`` compiles it (``torch.compile(model)``).
- **Whole model, generation**: tokens/s of `infmoe.generation.generate` (KV cache, batch 1,
  greedy, fixed seed, random weights; the short prompt's prefill included) for the dense
  config and the ∞-MoE config at K = 1, 4, 16 and mode "mean", over the dense model's.
- **Targets** (`TARGETS`, one table): each ratio the speed work aims at, measured, its
  target, met or not; a target whose rows this run did not measure is left out.

`--grid` instead prints fwd+bwd time of the sparse path over the full path, per block size
and K (the data behind the host plan's cost model, `dispatch.SPARSE_COST`).

Timing: all variants of a table in one process, alternated within each repeat (order
rotated) so drift in the machine's speed hits them alike; the median over repeats. Memory:
bytes autograd keeps between forward and backward (``saved``) and the rise of peak resident
memory over one forward+backward in a fresh process (``peak``; CPU only, eager only).

Precision: training rows run under the autocast a training run of the same ``precision``
setting uses (`infmoe.device`; "auto" is bf16 on CUDA, fp32 on the CPU), and decoding and
generation rows in the weights' dtype, as `infmoe generate` runs: that is what a user pays
for. Each row records the dtype its matrix products actually ran in, seen below autocast
(HF's grouped_mm experts, for one, are not cast on the CPU).

The package: `variants` (shapes, settings, rows), `peers` (HF Mixtral), `harness` (timing
and counting), `memory` (saved bytes, peak resident set, weight copies), `tables` (each
table and `run`), `targets` (the speed targets), `rendering` (markdown, load and save).
"""

from infmoe.bench.harness import executed_flops
from infmoe.bench.memory import saved_bytes
from infmoe.bench.rendering import markdown, render, save
from infmoe.bench.tables import run, sparse_grid
from infmoe.bench.variants import DECODE_TOKENS, SHAPES

__all__ = ["DECODE_TOKENS", "SHAPES", "executed_flops", "markdown", "render", "run", "save", "saved_bytes",
           "sparse_grid"]
