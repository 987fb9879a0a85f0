"""Hardware class names: the accelerator a device name denotes, without torch, so that the
planner (`fareway plan`) and the worker name hardware the same way."""

from __future__ import annotations

import re

# Device names as torch reports them -> hardware class; first match wins.
KNOWN_ACCELERATORS: dict[str, str] = {
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


def hardware_class(device_name: str, *, is_rocm: bool) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100'; unknown names become a slug with the vendor prefix."""
    for pattern, cls in KNOWN_ACCELERATORS.items():
        if re.search(pattern, device_name, re.IGNORECASE):
            return cls
    vendor = "amd" if is_rocm else "nvidia"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    slug = re.sub(rf"^({vendor}|amd|nvidia)-", "", slug)
    return f"{vendor}-{slug or 'unknown'}"
