"""Where the compiled full path of ∞-MoE spends its time on the CPU: torch.profiler over
forward+backward of one layer compiled with `torch.compile(fullgraph=True)` (Inductor),
ops grouped by name, sorted by their own CPU time.

    python benchmarks/profile_full.py [--d 768] [--hidden 6144] [--tokens 2048] [--top 8]

Prints one table: op, self CPU ms per step, share of the step. The dense MLP of width H,
compiled and profiled the same way, is the first line's baseline.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from infmoe import DenseMLP, InfiniteMoE
from infmoe.markdown import markdown_table


def self_ms(layer, x, steps: int = 3) -> tuple[dict[str, float], float]:
    """Self CPU ms per step of each op name, and the total, over `steps` profiled steps."""
    for _ in range(2):  # compile and warm up outside the profile
        layer(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            layer(x).sum().backward()
    events = prof.key_averages()
    per_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    return per_op, sum(per_op.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--d", 768), ("--hidden", 6144), ("--tokens", 2048), ("--top", 8)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    _, dense_total = self_ms(torch.compile(DenseMLP(args.d, args.hidden), fullgraph=True), x)
    layer = InfiniteMoE(args.d, args.hidden, d_z=48, units_per_block=1, impl="full")
    per_op, total = self_ms(torch.compile(layer, fullgraph=True), x)
    rows = [["(dense MLP of width H, whole step)", f"{dense_total:.1f}", f"{dense_total / total:.0%}"],
            *([name, f"{ms:.1f}", f"{ms / total:.0%}"] for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])
              [: args.top]),
            ["(∞-MoE B=1 K=1, whole step)", f"{total:.1f}", "100%"]]
    print("\n".join(markdown_table(["op", "self CPU ms / step", "share"], rows)))


if __name__ == "__main__":
    main()
