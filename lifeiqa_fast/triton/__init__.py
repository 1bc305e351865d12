"""Triton kernels, one module per op family. Importable without Triton (the kernels are then absent).

Every wrapper that launches a kernel is decorated with on_tensor_device: Triton launches on the current
CUDA device and its current stream, so tensors on cuda:1 while cuda:0 is current would otherwise run
with the wrong device's context (the CUDA ops take a device guard for the same reason).
"""
from __future__ import annotations

import contextlib
import functools

import torch


def on_tensor_device(launch):
    """launch(x, ...) run with x's CUDA device current (torch.cuda.device), as a CUDA op's device guard;
    unchanged for tensors on other devices (CPU tensors under TRITON_INTERPRET=1)."""

    @functools.wraps(launch)
    def guarded(x: torch.Tensor, *args, **kwargs):
        guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launch(x, *args, **kwargs)

    guarded.on_tensor_device = True
    return guarded
