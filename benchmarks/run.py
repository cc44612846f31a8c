"""The benchmark of `infmoe bench`, runnable from a checkout: the same code, the same flags.

    python benchmarks/run.py                      # every table and the targets (many minutes)
    python benchmarks/run.py --quick              # seconds
    python benchmarks/run.py --grid               # sparse / full over block size and K
    python benchmarks/run.py --json docs/bench.json --markdown docs/bench.md
"""

import sys

from infmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
