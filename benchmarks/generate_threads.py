"""Greedy generation speed with 1 and 2 CPU threads: the data behind `infmoe generate
--threads`'s default, and what that default costs each model against the first one named.

    python benchmarks/generate_threads.py TOKENS NAME [NAME ...] [--samples K]
    python benchmarks/generate_threads.py 128 gpt2-small-dense gpt2-small-infmoe

Every (model, threads) pair runs once per repeat, in an order rotated from repeat to repeat;
median of 5. Random weights, a 3-token prompt, the KV cache, as `infmoe generate` decodes.
Run it once on an idle machine and once with another process busy on one core
(`python -c "while True: pass" &`): decoding feeds one token per step, so a second thread
has little to share and, when the other core is taken, waits for it.
"""

import argparse
import statistics
import time

import torch

from infmoe.generation import generate
from infmoe.layers import InfiniteMoE
from infmoe.markdown import markdown_table
from infmoe.models import build_model

THREADS = (1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=int)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--samples", type=int, default=1, help="∞-MoE samples K (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {}
    for name in args.names:
        models[name] = build_model(name, vocab_size=4096 if name.startswith("tiny") else 50257).eval()
        for layer in models[name].modules():
            if isinstance(layer, InfiniteMoE):
                layer.n_samples = args.samples
    pairs = [(name, threads) for name in args.names for threads in THREADS]
    times: dict[tuple[str, int], list[float]] = {pair: [] for pair in pairs}
    for repeat in range(args.repeats):
        shift = repeat % len(pairs)
        for name, threads in pairs[shift:] + pairs[:shift]:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            list(generate(models[name], [1, 2, 3], max_new_tokens=args.tokens, temperature=0, seed=0))
            times[name, threads].append(time.perf_counter() - start)
    speed = {pair: args.tokens / statistics.median(t) for pair, t in times.items()}
    first = args.names[0]
    print(f"{args.tokens} new tokens, K = {args.samples}, median of {args.repeats}, torch {torch.__version__}")
    print()
    rows = []
    for name in args.names:
        one, two = speed[name, 1], speed[name, 2]
        rows.append([name, f"{one:.1f}", f"{two:.1f}", f"{one / two:.2f}", f"{one / speed[first, 1]:.2f}",
                     f"{two / speed[first, 2]:.2f}"])
    print("\n".join(markdown_table(["model", "tokens/s, 1 thread", "tokens/s, 2 threads", "2 threads / 1, time",
                                    f"vs {first}, 1 thread", f"vs {first}, 2 threads"], rows)))


if __name__ == "__main__":
    main()
