"""GPU-seconds: what each request cost in device time.

Every engine loop iteration is timed. An iteration that ran a step charges its
wall time x the number of devices to the sequences in the step, in proportion
to each one's share of the step's work; an iteration with nothing to run is
idle. So attributed + idle = elapsed wall time x devices, exactly.

Work is estimated in FLOPs (a forward pass is dominated by them):
  linear layers:  2 x (non-embedding linear parameters) per token computed
  output head:    2 x vocab x hidden per token whose logits are computed
  attention:      4 x layers x heads x head_dim per (query, key) pair
                  (QK^T and AV are a multiply-add each per pair, head and dim)
A token at position p attends over p + 1 keys, so a chunk of n tokens starting
at position s has n*s + n*(n+1)/2 pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.scheduler import StepPlan
from workers.engine.sequence import Sequence
from workers.models.config import LlamaConfig


@dataclass(frozen=True)
class WorkModel:
    linear_flops_per_token: float
    head_flops_per_token: float
    attention_flops_per_pair: float

    @classmethod
    def for_config(cls, c: LlamaConfig) -> WorkModel:
        attn_proj = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        return cls(
            linear_flops_per_token=2.0 * c.num_layers * (attn_proj + mlp),
            head_flops_per_token=2.0 * c.vocab_size * c.hidden_size,
            attention_flops_per_pair=4.0 * c.num_layers * c.num_heads * c.head_dim,
        )

    def flops(self, context_start: int, num_tokens: int, computes_logits: bool) -> float:
        pairs = num_tokens * context_start + num_tokens * (num_tokens + 1) / 2
        head = self.head_flops_per_token if computes_logits else 0.0
        return num_tokens * self.linear_flops_per_token + head + pairs * self.attention_flops_per_pair


class Meter:
    def __init__(self, work_model: WorkModel, num_devices: int) -> None:
        self.work_model = work_model
        self.num_devices = num_devices
        self.attributed_gpu_seconds = 0.0
        self.idle_gpu_seconds = 0.0

    @property
    def total_gpu_seconds(self) -> float:
        return self.attributed_gpu_seconds + self.idle_gpu_seconds

    def step_work(self, plan: StepPlan) -> list[tuple[Sequence, float]]:
        """Each scheduled sequence's FLOPs in the step; call before the step advances them."""
        return [(s.seq, self.work_model.flops(s.context_start, s.num_tokens, s.samples)) for s in plan.scheduled]

    def record_step(self, work: list[tuple[Sequence, float]], wall_seconds: float) -> None:
        """Charges a step's device time to its sequences by their share of its FLOPs."""
        gpu_seconds = wall_seconds * self.num_devices
        total = sum(flops for _, flops in work)
        if total == 0:  # a step that computed nothing kept the device idle
            self.idle_gpu_seconds += gpu_seconds
            return
        for seq, flops in work:
            seq.gpu_seconds += gpu_seconds * flops / total
        self.attributed_gpu_seconds += gpu_seconds

    def record_idle(self, wall_seconds: float) -> None:
        self.idle_gpu_seconds += wall_seconds * self.num_devices
