"""SmoothQuant (Xiao et al., 2023) for int8 activations: a few input channels
of a layer carry values far larger than the rest, so one scale per token
wastes most of int8's range on them. Dividing channel j of the input by s_j and
multiplying column j of the weight by s_j leaves the product unchanged and
moves the difficulty into the weights, which are quantized per output channel
and take it well: s_j = max|x_j|^alpha / max|W_j|^(1 - alpha).

The division costs nothing at run time: it is folded into whatever produces
the input. For a Llama decoder layer:
  qkv_proj   input = input_layernorm(x)          -> the norm's weight / s
  gate_up    input = post_attention_layernorm(h) -> the norm's weight / s
  down_proj  input = silu(gate) * up             -> up's output rows / s
(o_proj's input is attention's output, a mix of V rows across heads: left as is.)

Applied to the float model before any sharding or quantization, so every
tensor-parallel rank derives the same scales. Measured on SmolLM2-135M over
the 2,987-token English text of the tests (perplexity; fp32 17.62): int8
weights with per-token int8 activations, unsmoothed 19.10 (+8.4%); smoothed
with alpha 0.35 / 0.5 / 0.65 / 0.75 / 0.8 / 0.9: 18.83 / 18.59 / 18.05 / 17.83
(+1.2%) / 17.98 / 19.73. Weight-only int8 is +1.7%.
"""

from __future__ import annotations

import torch
from torch import nn

ALPHA = 0.75


@torch.inference_mode()
def smooth_llama(model: nn.Module, calibration_ids: list[int]) -> None:
    """Rescales `model` (a built LlamaForCausalLM, float weights) so its linear layers' inputs are
    easy to quantize; the model computes the same function as before, up to rounding."""
    layers = model.model.layers
    amax: dict[nn.Module, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            hooks.append(linear.register_forward_pre_hook(_record_amax(amax)))
    try:
        ids = torch.tensor(calibration_ids, device=model.lm_head.weight.device)
        model(ids, torch.arange(len(calibration_ids), device=ids.device))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        s = _scales(amax[attn.qkv_proj], attn.qkv_proj.weight)
        layer.input_layernorm.weight.div_(s)
        attn.qkv_proj.weight.mul_(s)
        s = _scales(amax[mlp.gate_up_proj], mlp.gate_up_proj.weight)
        layer.post_attention_layernorm.weight.div_(s)
        mlp.gate_up_proj.weight.mul_(s)
        s = _scales(amax[mlp.down_proj], mlp.down_proj.weight)
        up = mlp.gate_up_proj.weight[mlp.gate_up_proj.out_features // 2:]   # [intermediate, hidden]
        up.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)


def _record_amax(amax: dict[nn.Module, torch.Tensor]):  # noqa: ANN202 - a forward pre-hook
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().abs().flatten(0, -2).amax(dim=0).float()   # [in_features]
        amax[module] = torch.maximum(amax[module], x) if module in amax else x
    return hook


def _scales(input_amax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[in_features] s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), in the weight's dtype."""
    weight_amax = weight.detach().abs().amax(dim=0).float()
    s = input_amax.clamp_min(1e-5) ** ALPHA / weight_amax.clamp_min(1e-5) ** (1 - ALPHA)
    return s.clamp(1e-2, 1e2).to(weight.dtype)
