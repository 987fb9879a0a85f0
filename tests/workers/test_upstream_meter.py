"""The upstream worker's observed meter and its reading of engine metrics, on a clock the test moves."""

from __future__ import annotations

import pytest

from workers.engine.meter import WorkModel
from workers.models.config import LlamaConfig
from workers.upstream.meter import ObservedMeter
from workers.upstream.service import parse_engine_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_is_split_by_work_and_adds_up_to_wall_time_times_devices() -> None:
    clock = Clock()
    meter = ObservedMeter(2, None, clock)
    clock.now += 1.0                       # idle: nothing in flight
    a = meter.start(prompt_tokens=30)
    clock.now += 1.0                       # a's prefill alone
    b = meter.start(prompt_tokens=10)
    meter.progress(a, 1)
    clock.now += 1.0                       # a decodes (1 token of work), b prefills (10)
    meter.progress(b, 1)
    clock.now += 1.0                       # both decode: an even split
    assert meter.end(a) == pytest.approx(2 * (1 + 1 / 11 + 0.5))
    clock.now += 1.0
    assert meter.end(b) == pytest.approx(2 * (10 / 11 + 0.5 + 1))
    clock.now += 0.5
    total, idle = meter.totals()
    assert total == pytest.approx(2 * 5.5) and idle == pytest.approx(2 * 1.5)


def test_with_the_models_shape_a_long_context_weighs_more() -> None:
    shape = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16)
    clock = Clock()
    meter = ObservedMeter(1, WorkModel.for_config(shape), clock)
    short, long = meter.start(10), meter.start(5000)
    meter.progress(short, 1)
    meter.progress(long, 1)
    clock.now += 1.0
    assert meter.end(long) > meter.end(short) > 0


def test_queue_depth_and_kv_usage_are_read_from_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 3.0
vllm:num_requests_running{model_name="llama"} 7.0
vllm:gpu_cache_usage_perc{model_name="llama"} 0.25
"""
    assert parse_engine_metrics(text) == {"waiting": 3.0, "kv_usage": 0.25}
