"""Where a run computes: the device by name, and the autocast context for a precision setting."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``amp`` 'bf16', or 'auto' on CUDA; nothing otherwise. (The gates stay float32.)"""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()
