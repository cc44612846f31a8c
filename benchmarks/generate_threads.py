"""Greedy generation time with 1 and 2 CPU threads, alternated, median of 5: the data
behind `infmoe generate --threads`'s default.

    python benchmarks/generate_threads.py tiny-infmoe 100
    python benchmarks/generate_threads.py gpt2-small-dense 30

Run it once on an idle machine and once with another process busy on one core
(`python -c "while True: pass" &`): decoding feeds one token per step, so a second thread
has little to share and, when the other core is taken, waits for it.
"""

import statistics
import sys
import time

import torch

from infmoe.generation import generate
from infmoe.models import build_model


def main(name: str, new_tokens: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, vocab_size=4096 if name.startswith("tiny") else 50257).eval()
    times: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(5):
        for threads in (1, 2) if repeat % 2 == 0 else (2, 1):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            list(generate(model, [1, 2, 3], max_new_tokens=new_tokens, temperature=0, seed=0))
            times[threads].append(time.perf_counter() - start)
    one, two = (statistics.median(times[t]) for t in (1, 2))
    print(f"{name}, {new_tokens} tokens: 1 thread {one:.3f} s, 2 threads {two:.3f} s, 2 / 1 = {two / one:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
