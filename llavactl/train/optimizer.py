"""AdamW over the trainable parameters and its learning-rate schedule.

Parameters are split by part (the projector may have its own learning rate) and by whether weight
decay applies: biases and norm weights, anything with fewer than two dimensions, never decay
(the same rule as LLaVA's and transformers' trainers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from llavactl.config.schema import TrainingConfig

if TYPE_CHECKING:
    import torch

NamedParameters = Iterable[tuple[str, "torch.nn.Parameter"]]


def decays(name: str, parameter: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to this parameter: matrices yes; biases and norms never."""
    return parameter.ndim >= 2 and "norm" not in name.lower() and not name.endswith(".bias")


def parameter_groups(parts: Mapping[str, NamedParameters], training: TrainingConfig) -> list[dict[str, object]]:
    """AdamW parameter groups: one per (part, decay) pair that has parameters.

    ``parts`` maps a part name ("projector", "llm", "lora", "vision_tower") to its trainable
    parameters. The projector gets ``training.mm_projector_lr`` when set.
    """
    groups: list[dict[str, object]] = []
    for part, named in parts.items():
        lr = training.learning_rate
        if part == "projector" and training.mm_projector_lr is not None:
            lr = training.mm_projector_lr
        with_decay: list[torch.nn.Parameter] = []
        without_decay: list[torch.nn.Parameter] = []
        for name, parameter in named:
            (with_decay if decays(name, parameter) else without_decay).append(parameter)
        for params, weight_decay, suffix in (
            (with_decay, training.weight_decay, "decay"),
            (without_decay, 0.0, "no_decay"),
        ):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, "name": f"{part}/{suffix}"})
    return groups


def build_optimizer(parts: Mapping[str, NamedParameters], training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over ``parts``; the fused kernel where the parameters' device has one."""
    import torch
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    groups = parameter_groups(parts, training)
    if not groups:
        raise ValueError("no trainable parameters: the stage froze every part of the model")
    device_type = groups[0]["params"][0].device.type  # type: ignore[index]
    # Fused AdamW is one kernel per step instead of a dozen per tensor; torch lists where it exists.
    fused = device_type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps, from ``warmup_steps`` or ``warmup_ratio``."""
    if training.warmup_steps:
        return min(training.warmup_steps, total_steps)
    return math.ceil(training.warmup_ratio * total_steps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then ``kind``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def build_scheduler(
    optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int, *, at_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then ``training.lr_scheduler_type`` decay over ``total_steps`` optimizer steps, each
    group's learning rate set for step ``at_step`` (a resumed run's: then every group holds its peak
    as ``initial_lr``, the key torch's schedulers read)."""
    import torch

    warmup = warmup_steps(training, total_steps)
    kind = training.lr_scheduler_type

    def factor(step: int) -> float:
        return lr_factor(step, kind=kind, warmup=warmup, total=total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=at_step - 1)
