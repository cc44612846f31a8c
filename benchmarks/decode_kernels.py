"""The CPU kernels behind ∞-MoE's decoding path (`infmoe.layers.rows`), timed on weights
that come from memory: what reading a weight matrix costs, one token at a time.

    python benchmarks/decode_kernels.py [--d 768] [--hidden 6144] [--repeats 40]

Each call reads one of 12 copies of a (hidden, d) fp32 matrix in turn, so that 11 other
copies were read since (far more than a 32 MiB L3 holds), and the kernels are alternated.
Half of the rows are "chosen", as one ∞-MoE sample keeps at N = 50%. Prints ms per call
(median) and the bytes each kernel must read per ms.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from infmoe.markdown import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    d, h = args.d, args.hidden
    torch.manual_seed(0)
    weights = [torch.randn(h, d) for _ in range(12)]
    x = torch.randn(d)
    two = torch.stack([x, torch.zeros(d)])
    chosen = torch.randperm(h)[: h // 2].sort().values
    gates = torch.rand(chosen.numel())
    buffer = torch.empty(512, d)

    def gather_then_multiply(w: torch.Tensor) -> torch.Tensor:
        out = torch.empty(chosen.numel())
        for start in range(0, chosen.numel(), 512):
            part = chosen[start : start + 512]
            torch.index_select(w, 0, part, out=buffer[: part.numel()])
            torch.mv(buffer[: part.numel()], x, out=out[start : start + part.numel()])
        return out

    half, full = chosen.numel() * d * 4, h * d * 4
    kernels = {  # name: (call, bytes it must read)
        "embedding_bag, chosen rows, 1 bag": (lambda w: F.embedding_bag(chosen, w, torch.tensor([0]), mode="sum",
                                                                          per_sample_weights=gates), half),
        "embedding_bag, chosen rows, 2 bags": (lambda w: F.embedding_bag(
            chosen, w, torch.tensor([0, chosen.numel() // 2]), mode="sum", per_sample_weights=gates), half),
        "torch.mv, all rows": (lambda w: torch.mv(w, x), full),
        "w @ [x, 0]ᵀ, all rows": (lambda w: w @ two.t(), full),
        "gather chosen rows (chunks of 512), then mv": (gather_then_multiply, half),
    }
    times = {name: [] for name in kernels}
    call = 0
    for _ in range(args.repeats):
        for name, (kernel, _) in kernels.items():
            w = weights[call % len(weights)]
            call += 1
            start = time.perf_counter()
            kernel(w)
            times[name].append(time.perf_counter() - start)
    print(f"d = {d}, hidden = {h}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of "
          f"{args.repeats}\n")
    rows = []
    for name, (_, size) in kernels.items():
        ms = 1e3 * statistics.median(times[name])
        rows.append([name, f"{size / 1e6:.1f}", f"{ms:.3f}", f"{size / ms / 1e6:.1f}"])
    print("\n".join(markdown_table(["kernel", "MB read", "ms", "GB/s"], rows)))


if __name__ == "__main__":
    main()
