"""Estimated training throughput of the GPU-scale configs on one H100, from FLOPs.

    python benchmarks/gpu_estimate.py [--mfu 0.4] [--tokens 10e9]

An estimate, not a measurement: training FLOPs per token (3 x the forward FLOPs of every
matmul the token actually goes through, attention over a full 1024-token context; for
∞-MoE on the full path that is the whole large FFN) divided into an H100 SXM's dense
bf16 peak (989 TFLOP/s) times an assumed model FLOP utilisation.
"""

import argparse

import torch

from infmoe.layers import InfiniteMoE
from infmoe.markdown import markdown_row, markdown_table
from infmoe.models import GPT, get_config
from infmoe.params import model_flops_per_token

H100_BF16_DENSE_TFLOPS = 989.0
CONFIGS = ("gpt2-small-dense", "gpt2-small-moe", "gpt2-small-infmoe", "gpt2-medium-dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    parser.add_argument("--tokens", type=float, default=10e9, help="training tokens for the hours column")
    args = parser.parse_args()
    print("\n".join(markdown_table(["config", "path", "training GFLOP/token", f"est. tokens/s (MFU {args.mfu:.0%})",
                                    f"est. hours for {args.tokens / 1e9:g}B tokens"], [])))
    for name in CONFIGS:
        for block in ([None, 256] if name.endswith("infmoe") else [None]):
            config = get_config(name, **({"units_per_block": block} if block else {}))
            with torch.device("meta"):
                model = GPT(config)
            train_flops = 3 * model_flops_per_token(model, 1, executed=True)
            tokens_per_s = H100_BF16_DENSE_TFLOPS * 1e12 * args.mfu / train_flops
            routed = [f for f in model.ffn_layers() if isinstance(f, InfiniteMoE)]
            path = ("sparse" if routed[0].uses_sparse(1) else "full") + f", B={routed[0].units_per_block}" if routed else "-"
            print(markdown_row([f"{name}{f' --units_per_block {block}' if block else ''}", path, f"{train_flops / 1e9:.2f}",
                                f"{tokens_per_s:,.0f}", f"{args.tokens / tokens_per_s / 3600:.1f}"]))


if __name__ == "__main__":
    main()
