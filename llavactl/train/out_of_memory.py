"""A step that runs out of device memory or RAM becomes one paragraph naming the overrides that use less.

The overrides are the memory knobs dry-run suggests (:func:`llavactl.config.knobs.memory_knobs`),
the first of each kind, so the two commands never advise differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llavactl.config.knobs import memory_knobs
from llavactl.config.schema import Profile
from llavactl.errors import TrainingError


@contextmanager
def out_of_memory_as_error(profile: Profile, *, step: int | None, device_type: str, output_dir: Path) -> Iterator[None]:
    """Turn an allocation failure within optimizer step ``step`` (None: the memory probe) into
    :func:`out_of_memory_error`."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        what = f"the {device_type.upper()} device ran out of memory"
        raise out_of_memory_error(profile, what, step=step, output_dir=output_dir) from exc
    except RuntimeError as exc:
        # CPU allocation failures are plain RuntimeErrors from the allocator.
        if "can't allocate memory" not in str(exc) and "DefaultCPUAllocator" not in str(exc):
            raise
        raise out_of_memory_error(profile, "the machine ran out of RAM", step=step, output_dir=output_dir) from exc


def out_of_memory_error(profile: Profile, what: str, *, step: int | None, output_dir: Path) -> TrainingError:
    """``what`` ran out at ``step`` (None: before step 1, in the memory probe): the micro-batch that
    did not fit, and the knobs that use less."""
    t, data = profile.training, profile.data
    fixes: dict[str, str] = {}  # the first knob of each kind: the later ones of a kind go further the same way
    for knob in memory_knobs(profile):
        fixes.setdefault(knob.why, f"`{knob.text}` ({knob.why})")
    micro = (
        f"micro-batches of up to {data.max_tokens_per_batch:,} tokens"
        if data.max_tokens_per_batch
        else f"micro-batches of {t.per_device_train_batch_size} records of up to {data.max_seq_len} tokens"
    )
    return TrainingError(
        f"Before step 1: {what} with {micro}."
        if step is None
        else f"Step {step}: {what} with {micro}. Checkpoints already in {output_dir} are kept.",
        fix="use less memory per step: " + (", or ".join(fixes.values()) or "a device with more memory"),
    )
