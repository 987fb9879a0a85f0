"""What the worker runs on. The hardware class prices its GPU-seconds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.accelerators import hardware_class

__all__ = ["Hardware", "default_device", "default_dtype", "detect", "hardware_class"]


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
