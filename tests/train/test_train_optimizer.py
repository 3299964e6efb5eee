"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from llavactl.config.schema import TrainingConfig
from llavactl.train.optimizer import build_optimizer, build_scheduler, lr_factor, parameter_groups, warmup_steps


def _parts() -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    projector = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    norm = torch.nn.LayerNorm(8)
    lora = torch.nn.Linear(8, 2, bias=False)
    return {
        "projector": list(projector.named_parameters()),
        "llm": [("model.norm.weight", norm.weight), ("model.norm.bias", norm.bias)],
        "lora": [("layers.0.q_proj.lora_A.default.weight", lora.weight)],
    }


def test_biases_and_norms_never_decay_and_projector_gets_its_own_lr() -> None:
    training = TrainingConfig(learning_rate=1e-4, mm_projector_lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(_parts(), training)}
    assert sorted(groups) == ["llm/no_decay", "lora/decay", "projector/decay", "projector/no_decay"]
    assert (groups["projector/decay"]["lr"], groups["projector/decay"]["weight_decay"]) == (1e-3, 0.1)
    assert (groups["projector/no_decay"]["lr"], groups["projector/no_decay"]["weight_decay"]) == (1e-3, 0.0)
    assert len(groups["projector/no_decay"]["params"]) == 2  # the two biases
    assert (groups["llm/no_decay"]["lr"], len(groups["llm/no_decay"]["params"])) == (1e-4, 2)
    assert groups["lora/decay"]["weight_decay"] == 0.1


def test_projector_uses_learning_rate_when_mm_projector_lr_is_null() -> None:
    groups = parameter_groups(_parts(), TrainingConfig(learning_rate=3e-4))
    assert {g["lr"] for g in groups} == {3e-4}


def test_optimizer_is_fused_adamw_on_cpu() -> None:
    optimizer = build_optimizer(_parts(), TrainingConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True


def test_a_stage_with_nothing_trainable_is_refused() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer({"projector": []}, TrainingConfig())


def test_warmup_rises_linearly_then_cosine_decays_to_zero() -> None:
    factors = [lr_factor(s, kind="cosine", warmup=4, total=20) for s in range(20)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert lr_factor(20, kind="cosine", warmup=4, total=20) == pytest.approx(0.0)
    assert lr_factor(12, kind="cosine", warmup=4, total=20) == pytest.approx(0.5)


def test_linear_and_constant_schedules() -> None:
    assert lr_factor(12, kind="linear", warmup=4, total=20) == pytest.approx(0.5)
    assert [lr_factor(s, kind="constant", warmup=0, total=20) for s in (0, 10, 19)] == [1.0, 1.0, 1.0]


def test_warmup_length_comes_from_steps_or_ratio() -> None:
    assert warmup_steps(TrainingConfig(warmup_steps=7), 100) == 7
    assert warmup_steps(TrainingConfig(warmup_ratio=0.05), 100) == 5
    assert warmup_steps(TrainingConfig(), 100) == 0


def test_scheduler_sets_each_group_to_its_peak_times_the_factor() -> None:
    training = TrainingConfig(learning_rate=1e-4, mm_projector_lr=1e-3, warmup_steps=1, lr_scheduler_type="linear")
    optimizer = build_optimizer(_parts(), training)
    scheduler = build_scheduler(optimizer, training, total_steps=3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["projector/decay"] == pytest.approx(5e-4)  # warmup step 0: half the peak
    assert lrs["lora/decay"] == pytest.approx(5e-5)
    optimizer.step()
    scheduler.step()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["projector/decay"] == pytest.approx(1e-3)


def test_a_schedule_built_at_a_resumed_step_continues_from_each_groups_initial_lr() -> None:
    """A resume rebuilds the schedule at the saved step from the groups' `initial_lr` (this profile's
    peaks): the same learning rates as the uninterrupted schedule, with no private scheduler state set."""
    training = TrainingConfig(learning_rate=1e-4, mm_projector_lr=1e-3, warmup_steps=2, lr_scheduler_type="cosine")
    through = build_optimizer(_parts(), training)
    uninterrupted = build_scheduler(through, training, total_steps=10)
    for _ in range(4):
        through.step()
        uninterrupted.step()
    resumed = build_optimizer(_parts(), training)
    for group in resumed.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = build_scheduler(resumed, training, total_steps=10, at_step=4)
    assert scheduler.last_epoch == 4
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([g["lr"] for g in through.param_groups])
    assert scheduler.get_last_lr() == pytest.approx(uninterrupted.get_last_lr())
    resumed.step()
    scheduler.step()
    uninterrupted.step()
    assert scheduler.get_last_lr() == pytest.approx(uninterrupted.get_last_lr())


def test_a_schedule_built_at_a_resumed_step_applies_a_new_peak_at_once() -> None:
    training = TrainingConfig(learning_rate=1e-4, lr_scheduler_type="constant")
    optimizer = build_optimizer(_parts(), training)
    for group in optimizer.param_groups:
        group["initial_lr"] = 5e-5  # `--force` with a new training.learning_rate
    scheduler = build_scheduler(optimizer, training, total_steps=10, at_step=3)
    assert scheduler.get_last_lr() == pytest.approx([5e-5] * len(optimizer.param_groups))
    assert all(g["lr"] == pytest.approx(5e-5) for g in optimizer.param_groups)
