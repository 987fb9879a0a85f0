"""What the worker runs on. The hardware class prices its GPU-seconds."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Device names as torch reports them -> hardware class; first match wins.
_KNOWN_ACCELERATORS: dict[str, str] = {
    r"\bH200\b": "nvidia-h200",
    r"\bH100\b": "nvidia-h100",
    r"\bGH200\b": "nvidia-gh200",
    r"\bB200\b": "nvidia-b200",
    r"\bA100\b": "nvidia-a100",
    r"\bL40S\b": "nvidia-l40s",
    r"\bL4\b": "nvidia-l4",
    r"\bA10G\b": "nvidia-a10g",
    r"\bT4\b": "nvidia-t4",
    r"\bV100\b": "nvidia-v100",
    r"\bMI325X\b": "amd-mi325x",
    r"\bMI300X\b": "amd-mi300x",
    r"\bMI250X?\b": "amd-mi250",
    r"\bMI210\b": "amd-mi210",
}


@dataclass(frozen=True)
class Hardware:
    device_type: str
    """torch's device type: "cpu" or "cuda" (ROCm's HIP devices are "cuda" too)."""
    hardware_class: str
    """"cpu", "nvidia-h100", "amd-mi300x", ..."""
    device_name: str
    device_count: int
    """Devices one replica of the model uses."""


def hardware_class(device_name: str, *, is_rocm: bool) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100'; unknown names become a slug with the vendor prefix."""
    for pattern, cls in _KNOWN_ACCELERATORS.items():
        if re.search(pattern, device_name, re.IGNORECASE):
            return cls
    vendor = "amd" if is_rocm else "nvidia"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    slug = re.sub(rf"^({vendor}|amd|nvidia)-", "", slug)
    return f"{vendor}-{slug or 'unknown'}"


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
