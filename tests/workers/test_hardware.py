"""Hardware classes price GPU-seconds, so device names must map to stable classes."""

from __future__ import annotations

import pytest
import torch

from workers.hardware import default_dtype, detect, hardware_class


@pytest.mark.parametrize(("name", "rocm", "expected"), [
    ("NVIDIA H100 80GB HBM3", False, "nvidia-h100"),
    ("NVIDIA H200", False, "nvidia-h200"),
    ("NVIDIA A100-SXM4-80GB", False, "nvidia-a100"),
    ("NVIDIA L4", False, "nvidia-l4"),
    ("NVIDIA L40S", False, "nvidia-l40s"),
    ("Tesla T4", False, "nvidia-t4"),
    ("AMD Instinct MI300X", True, "amd-mi300x"),
    ("AMD Instinct MI250X/MI250", True, "amd-mi250"),
    ("NVIDIA RTX 6000 Ada Generation", False, "nvidia-rtx-6000-ada-generation"),
    ("Radeon PRO W7900", True, "amd-radeon-pro-w7900"),
])
def test_device_names_map_to_hardware_classes(name: str, rocm: bool, expected: str) -> None:
    assert hardware_class(name, is_rocm=rocm) == expected


def test_cpu_is_detected_and_computes_in_fp32() -> None:
    hardware = detect(torch.device("cpu"))
    assert (hardware.hardware_class, hardware.device_type, hardware.device_count) == ("cpu", "cpu", 1)
    assert default_dtype(torch.device("cpu")) is torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
def test_gpu_is_detected_with_its_class() -> None:
    hardware = detect(torch.device("cuda"))
    assert hardware.hardware_class.startswith(("nvidia-", "amd-"))
    assert default_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
