"""The KV cache formats, on made-up K and V: what is read back from slots is what was written there,
to within each format's rounding."""

from __future__ import annotations

import pytest
import torch

from workers.layers.kv_cache import Fp8KVCache, RecordingKVCache, make_kv_cache

BLOCKS, BLOCK_SIZE, HEADS, DIM = 4, 8, 2, 16
CPU = torch.device("cpu")


def keys(n: int, seed: int) -> torch.Tensor:
    """K like a real model's: some channels sit far from zero and vary little around it."""
    x = torch.randn(n, HEADS, DIM, generator=torch.Generator().manual_seed(seed))
    x[:, :, :4] += 50.0
    return x


def round_trip(cache: Fp8KVCache | RecordingKVCache, k: torch.Tensor) -> torch.Tensor:
    slots = torch.arange(len(k)).flip(0)    # written out of order, read back in slot order
    cache.write(slots, k, k)
    got, _ = cache.gather(torch.arange(BLOCKS))
    return got[: len(k)].flip(0)


def test_fp8_keeps_the_small_variations_of_a_channel_far_from_zero() -> None:
    recording = RecordingKVCache(BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=torch.float32, device=CPU)
    calibration = keys(BLOCKS * BLOCK_SIZE, seed=0)
    assert torch.equal(round_trip(recording, calibration), calibration)   # the recording holds exactly

    cache = make_kv_cache("fp8_e4m3", BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=torch.float32, device=CPU)
    assert isinstance(cache, Fp8KVCache)
    cache.calibrate(recording)
    k = keys(BLOCKS * BLOCK_SIZE, seed=1)
    error = (round_trip(cache, k) - k).abs()
    # Stored as distances from the channel means, the offset channels' variations (std 1) survive:
    # fp8 of the values themselves (about 50) would be off by up to 1.8.
    assert error.max() < 0.2
    assert torch.corrcoef(torch.stack([round_trip(cache, k)[:, :, 0].flatten(), k[:, :, 0].flatten()]))[0, 1] > 0.99


def test_fp8_calibrated_from_nothing_says_so() -> None:
    recording = RecordingKVCache(BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=torch.float32, device=CPU)
    cache = make_kv_cache("fp8_e4m3", BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=torch.float32, device=CPU)
    with pytest.raises(ValueError, match="no K or V was recorded"):
        cache.calibrate(recording)


@pytest.mark.parametrize("kv_cache_dtype, tolerance", [("fp32", 0.0), ("bf16", 0.5), ("int8", 0.5)])
def test_other_formats_read_back_what_was_written(kv_cache_dtype: str, tolerance: float) -> None:
    cache = make_kv_cache(kv_cache_dtype, BLOCKS, BLOCK_SIZE, HEADS, DIM, dtype=torch.float32, device=CPU)
    k = keys(BLOCKS * BLOCK_SIZE, seed=2)
    assert (round_trip(cache, k) - k).abs().max() <= tolerance


def test_an_fp8_cache_calibrates_within_a_short_max_model_len(tiny_checkpoint) -> None:  # noqa: ANN001
    """The calibration text is longer than 64 tokens: it is cut where the model's positions end."""
    from workers.config import RunnerConfig
    from workers.model_runner import ModelRunner

    runner = ModelRunner(tiny_checkpoint, RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20, max_model_len=64,
                                                       kv_cache_dtype="fp8_e4m3", weights="fp32"))
    cache = runner.model.model.layers[0].self_attn.kv_cache
    assert runner.max_model_len == 64 and bool((cache.k_scale != 1).all())
