"""bench.cost's workload and configurations, without running them: the workload is the issue's, the
same for every configuration, and each configuration is what its name says, in flags the real
`fareway worker` and `fareway gateway` accept."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from bench.cost import FULL, LEVERS, NAIVE, QUICK, RUN_ORDER, TEAMS, Configuration, configurations, run_order, workload
from cli.worker import add_arguments, config_from_args
from gateway.routing import POLICIES


def worker_config(config: Configuration):  # noqa: ANN201 - WorkerConfig
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(config.worker_args()))


@pytest.mark.parametrize("shape", [FULL, QUICK], ids=["full", "quick"])
def test_the_workload_is_many_teams_many_sessions_at_once_and_fixed_by_its_seed(shape) -> None:  # noqa: ANN001
    sessions = workload(shape, seed=18)

    assert sessions == workload(shape, seed=18) != workload(shape, seed=19)
    assert len(sessions) >= 16 and {s.team for s in sessions} == set(TEAMS)
    assert len({s.session_id for s in sessions}) == len(sessions)
    assert all(4 <= len(s.turns) <= 6 for s in sessions)
    # Each team its own system prompt of a few hundred tokens (about 4 characters a token).
    prompts = {s.team: s.system_prompt for s in sessions}
    assert len(set(prompts.values())) == len(TEAMS)
    assert all(800 <= len(p) <= 2400 for p in prompts.values())
    assert len({t.answer_tokens for s in sessions for t in s.turns}) >= 3  # mixed answer lengths
    # They all run at once: the last one arrives before the first could have finished its turns.
    assert max(s.arrival_s for s in sessions) < 5


def test_each_lever_alone_changes_only_its_own_setting_of_the_naive_configuration() -> None:
    configs = configurations("int8")
    assert set(configs) == {"naive", "all_levers", *LEVERS} == set(RUN_ORDER)
    naive = worker_config(configs["naive"])
    assert (naive.runner.weights, naive.runner.kv_cache_dtype, naive.enable_prefix_caching,
            naive.scheduler.max_num_seqs) == ("fp32", "fp32", False, 1)
    assert (NAIVE.routing, NAIVE.sticky_sessions) == ("round-robin", False)

    naive_fields = dataclasses.asdict(NAIVE)
    changed = {name: {k for k, v in dataclasses.asdict(c).items() if k != "name" and v != naive_fields[k]}
               for name, c in configs.items()}
    assert changed == {
        "naive": set(), "int8_weights": {"weights"}, "quantized_kv": {"kv_cache_dtype"},
        "prefix_caching": {"prefix_caching"}, "continuous_batching": {"max_num_seqs"},
        "prefix_affinity": {"routing", "sticky_sessions"},
        "all_levers": {"weights", "kv_cache_dtype", "prefix_caching", "max_num_seqs", "routing", "sticky_sessions"},
    }
    every = worker_config(configs["all_levers"])
    assert (every.runner.weights, every.runner.kv_cache_dtype, every.enable_prefix_caching,
            every.scheduler.max_num_seqs) == ("int8", "int8", True, 64)
    assert configs["all_levers"].routing in POLICIES and configs["all_levers"].sticky_sessions
    assert worker_config(configurations("fp8_e4m3")["all_levers"]).runner.kv_cache_dtype == "fp8_e4m3"
    # Every worker gets the same KV-cache bytes, whatever its format.
    assert len({worker_config(c).runner.kv_cache_memory_bytes for c in configs.values()}) == 1


def test_rounds_alternate_and_neighbours_that_can_share_workers_do() -> None:
    assert run_order(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    configs = configurations("int8")
    first, second = RUN_ORDER[:2]
    assert configs[first].worker_args() == configs[second].worker_args()  # one start of workers for both
