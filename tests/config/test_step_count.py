"""How long a run is: one rule on the training settings, read by the recipe, its sampler and dry-run."""

from __future__ import annotations

from llavactl.config.schema import TrainingConfig


def test_steps_per_epoch_round_up_a_last_partial_accumulation() -> None:
    assert TrainingConfig(gradient_accumulation_steps=4).steps_per_epoch(10) == 3
    assert TrainingConfig(gradient_accumulation_steps=1).steps_per_epoch(10) == 10


def test_max_steps_wins_over_epochs_and_needs_no_epoch_length() -> None:
    training = TrainingConfig(max_steps=7, num_train_epochs=3)
    assert training.total_steps(5) == 7
    assert training.total_steps(None) == 7
    assert training.epochs(5) == 2  # the second epoch in part


def test_without_max_steps_the_run_is_its_epochs() -> None:
    training = TrainingConfig(num_train_epochs=3)
    assert training.total_steps(5) == 15
    assert training.total_steps(None) is None
    assert training.epochs(5) == 3
