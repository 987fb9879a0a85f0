"""Tensor parallelism: one model replica over several devices (ranks).

`sharding` transforms a built model into one rank's slice; `group` is how the
ranks talk (rank 0 drives, the others follow); `launcher` starts them.
"""

from workers.parallel.group import RankGroup
from workers.parallel.launcher import launch_ranks
from workers.parallel.sharding import num_kv_heads_per_rank, shard_model
from workers.parallel.step import StepInputs

__all__ = ["RankGroup", "StepInputs", "launch_ranks", "num_kv_heads_per_rank", "shard_model"]
