"""``python -m infmoe.bench --peak-of SHAPE TOKENS VARIANT THREADS PRECISION``: the fresh
process in which `infmoe.bench.memory.peak_rss_rise` measures one training step (the
command is `infmoe bench`)."""

import sys

from infmoe.bench.memory import print_peak_rss_rise

if sys.argv[1:2] == ["--peak-of"]:
    print_peak_rss_rise(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
