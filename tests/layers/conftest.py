"""The device the layer tests run on: the CPU always, and CUDA where a GPU is present, so
a GPU machine runs the very tests the CPU does (benchmarks/gpu_check.py selects them with
``-k cuda``). Without a GPU there is no CUDA case at all, rather than a skipped one."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
