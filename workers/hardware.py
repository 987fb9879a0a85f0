"""What the worker runs on. The hardware class prices its GPU-seconds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.accelerators import hardware_class

__all__ = ["Hardware", "default_device", "default_dtype", "detect", "hardware_class", "rank_device"]


@dataclass(frozen=True)
class Hardware:
    device_type: str
    """torch's device type: "cpu" or "cuda" (ROCm's HIP devices are "cuda" too)."""
    hardware_class: str
    """"cpu", "nvidia-h100", "amd-mi300x", ..."""
    device_name: str
    device_count: int
    """Devices one replica of the model uses."""


def detect(device: torch.device, device_count: int = 1) -> Hardware:
    if device.type == "cpu":
        return Hardware("cpu", "cpu", "cpu", device_count)
    name = torch.cuda.get_device_name(device)
    is_rocm = torch.version.hip is not None
    return Hardware(device.type, hardware_class(name, is_rocm=is_rocm), name, device_count)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPUs (bf16 matmuls are ~300x slower there), bf16 where GPUs support it, else fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def rank_device(name: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of rank `local_rank`: the configured one alone, else <type>:<local rank> (cpu stays cpu)."""
    device = torch.device(name) if name else default_device()
    if world_size == 1 or device.type == "cpu":
        return device
    return torch.device(device.type, local_rank)
