"""∞-MoE's block paths compiled on the CPU: the static plan's grouped path against the full
path, the data behind the rule's "compiled-cpu" cost (`infmoe.layers.dispatch.SPARSE_COST`).

    python benchmarks/compiled_paths.py [--d 768] [--hidden 6144] [--block 64] [--tokens 2048] [--repeats 5]

Forward+backward, fp32, `torch.compile(fullgraph=True)` (Inductor), compiled before timing,
variants alternated; prints ms (median) and each variant over the compiled dense MLP of the
active width.
"""

import argparse
import statistics
import time

import torch

from infmoe import DenseMLP, InfiniteMoE
from infmoe.markdown import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--d", 768), ("--hidden", 6144), ("--block", 64), ("--tokens", 2048), ("--repeats", 5)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    torch.manual_seed(0)
    d, h = args.d, args.hidden
    variants = {
        "dense, active width": DenseMLP(d, h // 2),
        f"∞-MoE B={args.block} K=1 grouped": InfiniteMoE(d, h, d_z=48, units_per_block=args.block, impl="sparse"),
        f"∞-MoE B={args.block} K=1 full": InfiniteMoE(d, h, d_z=48, units_per_block=args.block, impl="full"),
    }
    compiled = {name: torch.compile(layer, fullgraph=True) for name, layer in variants.items()}
    x = torch.randn(args.tokens, d, requires_grad=True)

    def step(layer) -> float:
        start = time.perf_counter()
        layer(x).sum().backward()
        return time.perf_counter() - start

    for layer in compiled.values():  # compile, then warm up
        step(layer), step(layer)
    times = {name: [] for name in compiled}
    for _ in range(args.repeats):
        for name, layer in compiled.items():
            times[name].append(step(layer))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    base = ms["dense, active width"]
    rows = [[name, getattr(variants[name].aux, "path", None) or "—", f"{value:.3f}", f"{value / base:.2f}"]
            for name, value in ms.items()]
    print("\n".join(markdown_table(["variant, compiled", "path", "fwd+bwd ms", "vs dense active"], rows)))


if __name__ == "__main__":
    main()
