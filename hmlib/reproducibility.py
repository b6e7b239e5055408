"""Reproducibility: seeded torch random streams and deterministic kernels.

Every stage that draws random numbers (weight initialisation, shuffling, augmentation, the VAE's
reparameterisation noise) runs inside :func:`seeded`, which forks torch's global generator, seeds it
and restores the previous state afterwards: a stage's result depends on its own seed only, never on
what ran before it in the same process (a notebook kernel runs several stages in turn).

What can still differ: results are bit-identical for the same hmlib, torch build, machine type and
``num_threads``; another CPU type, another thread count or a GPU may reorder floating-point
reductions and change the last bits, which training can amplify (see docs/ARCHITECTURE.md).

Per device (:func:`deterministic_kernels`): on the CPU, torch's kernels are deterministic for a fixed thread
count and the settings below change nothing. On CUDA, ``torch.use_deterministic_algorithms`` picks deterministic
kernels (warning where an operation has none), cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for that, cuDNN's
autotuner is off (it may pick another algorithm each run) and TF32 is off for convolutions and matrix products
(full float32, as on the CPU: reduced precision only where measured equal in accuracy). A GPU run then repeats
itself on the same card and driver, but draws its on-device noise (the VAE's reparameterisation) from the
device's own generator and sums in another order than the CPU: its numbers agree with a CPU run's within their
intervals, not bit for bit. On MPS torch offers fewer deterministic kernels; the same holds, best effort.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generator (CPU and CUDA) seeded to ``seed``; restore it after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def deterministic_kernels() -> None:
    """Ask torch for deterministic algorithms wherever it has them (warn, not fail, where it has none), in full
    float32 on every device (no TF32 on CUDA)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS; harmless on CPU
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False  # torch's default lets cuDNN convolutions run in TF32
    torch.backends.cuda.matmul.allow_tf32 = False  # already torch's default; stated, not assumed
