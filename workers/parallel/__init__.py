"""Tensor parallelism: one model replica over several devices (ranks).

`sharding` transforms a built model into one rank's slice; `group` is how the
ranks talk (rank 0 drives, the others follow); `launcher` starts them.
"""

