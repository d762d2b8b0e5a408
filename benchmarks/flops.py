"""FLOPs of one call, counted by PyTorch's FLOP counter on the meta device (shapes only, no work).

Convention of ``torch.utils.flop_counter``: a multiply-add is 2 FLOPs; convolutions, matrix
products and attention are counted, elementwise ops and normalisation are not. That is the
convention of MODEL.md's 740 GFLOP per 128x128 output pass, and of vendors' tensor-core peaks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class FlopCounter:
    """Counts FLOPs of a module at any input shapes; keeps one meta copy of the module."""

    def __init__(self, module: nn.Module):
        # fp32 whatever the module's dtype: the count does not depend on it, and inputs are fp32
        self._meta = copy.deepcopy(module).to("meta", torch.float32).eval()

    def count(self, inputs: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
        tensors = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in inputs]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self._meta(*tensors)
        return int(counter.get_total_flops())
