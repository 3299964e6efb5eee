"""LoRA's update added to the frozen layer's output in one GEMM, for CPU training.

peft's LoRA linear computes ``result + lora_B(lora_A(dropout(x))) * scaling``: a GEMM writing the
update, a pass multiplying it, a pass adding it, each over a tokens x width tensor (memory-bound
work on a CPU), and the same again in the backward. ``torch.addmm(result, down, B^T,
alpha=scaling)`` is one GEMM that reads ``result`` and writes the sum: in local_lite's shapes
(LoRA on q/k/v/o of 30 layers, 704 tokens) it saves about 0.1 s of a 5 s step
(benchmarks/local_lite_step.py). Only the plain case takes this path: a training-mode layer on
a CPU, one active adapter that is not merged, no variant (DoRA), no LoRA bias, no extra
arguments. Anything else, inference included, runs peft's own forward unchanged.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear


def _fused_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    plain = (
        self.training
        and not args
        and not kwargs
        and not self.disable_adapters
        and not self.merged
        and x.device.type == "cpu"
        and name in self.lora_A
        and name not in self.lora_variant
        and self.lora_B[name].bias is None
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a = self.lora_A[name]
    lora_b, scaling = self.lora_B[name], self.scaling[name]
    down = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    if not (down.dtype == result.dtype == lora_b.weight.dtype or torch.is_autocast_enabled("cpu")):
        return (result + lora_b(down) * scaling).to(result.dtype)  # mixed dtypes that addmm would refuse
    rows = result.reshape(-1, result.shape[-1])
    flat = torch.addmm(rows, down.reshape(-1, down.shape[-1]), lora_b.weight.t(), alpha=scaling)
    return flat.view(result.shape)


def use_fused_update(model: PeftModel) -> int:
    """Give every peft LoRA linear layer of ``model`` the fused training path; the count."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)
