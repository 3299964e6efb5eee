"""Estimate a training step's peak memory and FLOPs without weights, by tracing it on fake tensors.

Used by the planner alone (:mod:`llavactl.plan.build`).

A model built on the meta device is moved to fake tensors (shapes and dtypes, no storage) and one
forward and backward pass runs on a batch of the real shape. Every tensor the pass allocates is
counted until it is freed, so the activation peak follows what autograd really keeps: image
tokens, LoRA dropout copies, gradient checkpointing, the logits of a 50k vocabulary. The same
pass counts FLOPs. Weights, gradients and optimizer state are exact sums over the parameters.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from llavactl.model.assembly import AssembledModel

GIB = 1024**3
# AdamW keeps two fp32 moments per trainable parameter.
ADAMW_STATE_BYTES = 8
# bitsandbytes NF4 with double quantization: 4 bits a weight plus about 0.127 bits of constants.
NF4_BYTES_PER_PARAM = 4.127 / 8
INT8_BYTES_PER_PARAM = 1.0 + 4 / 64  # a byte a weight, an fp32 scale per row of 64 or more
_COLLECT_EVERY = 64  # tensor allocations between cycle collections while tracing


@dataclass(frozen=True)
class ComponentParams:
    """Parameter counts of one component (vision tower, projector, LLM, LoRA)."""

    name: str
    total: int
    trainable: int
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training step on one device, by kind."""

    runtime: int  # the process itself: Python, torch, the CUDA context
    weights: int
    gradients: int
    optimizer: int
    activations: int  # peak of everything the forward and backward pass allocate, gradients aside

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.gradients + self.optimizer + self.activations

    def as_json(self) -> dict[str, int]:
        return {
            "runtime": self.runtime,
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


@dataclass(frozen=True)
class StepTrace:
    """What one traced training step allocates and computes."""

    peak_bytes: int  # peak of tensors allocated during forward and backward (gradients included)
    flops: int  # forward + backward (+ recomputation under gradient checkpointing)
    attention_flops: int  # of which the attention kernels'


def component_params(assembled: AssembledModel) -> list[ComponentParams]:
    """Total and trainable parameters per component, in the order tower, projector, LLM, LoRA."""
    from llavactl.model.assembly import component

    counts: dict[str, list[int]] = {}
    dtypes: dict[str, set[str]] = {}
    for name, parameter in assembled.model.named_parameters():
        key = component(name)
        total, trainable = counts.setdefault(key, [0, 0])
        counts[key] = [total + parameter.numel(), trainable + (parameter.numel() if parameter.requires_grad else 0)]
        dtypes.setdefault(key, set()).add(str(parameter.dtype).removeprefix("torch."))
    order = ["vision_tower", "projector", "llm", "lora"]
    return [ComponentParams(k, counts[k][0], counts[k][1], tuple(sorted(dtypes[k]))) for k in order if k in counts]


def weight_bytes(assembled: AssembledModel, *, quantized_bits: int | None = None) -> int:
    """Bytes of all weights: trainable ones in fp32, frozen ones in the dtype the model holds them in
    (the step's autocast dtype under bf16/fp16: :func:`llavactl.model.assembly.store_frozen_in`);
    with ``quantized_bits``, the LLM's frozen linear weights at 4 or 8 bits (QLoRA)."""
    from llavactl.model.assembly import component

    total = 0.0
    for name, parameter in assembled.model.named_parameters():
        quantizable = (
            quantized_bits is not None
            and component(name) == "llm"
            and parameter.dim() == 2
            and ".layers." in name
            and not parameter.requires_grad
        )
        if quantizable:
            per = NF4_BYTES_PER_PARAM if quantized_bits == 4 else INT8_BYTES_PER_PARAM
            total += parameter.numel() * per
        else:
            total += parameter.numel() * (4 if parameter.requires_grad else parameter.element_size())
    return int(total)


def trainable_numel(assembled: AssembledModel) -> int:
    return sum(p.numel() for p in assembled.model.parameters() if p.requires_grad)


class _LiveBytes:
    """Counts the bytes of tensor storages that are alive, and their peak, under a dispatch mode."""

    def __init__(self, preexisting: list[torch.Tensor], generation: int) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._generation = generation
        self.live = 0
        self.peak = 0
        self._ops = 0
        self._seen = WeakIdKeyDictionary()
        # Parameters (and their views, such as a tied lm_head's transpose) are counted apart.
        for tensor in preexisting:
            self._seen[tensor.untyped_storage()] = 0

    def mode(self):  # -> TorchDispatchMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                import torch

                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        counter._track(leaf)
                return out

        return _Mode()

    def _track(self, tensor: torch.Tensor) -> None:
        self._ops += 1
        if self._ops % _COLLECT_EVERY == 0:
            # Gradient checkpointing leaves reference cycles that only Python's cycle collector
            # frees, so what counts as freed depends on how far the collector reaches.
            gc.collect(self._generation)
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def trace_step(
    assembled: AssembledModel,
    *,
    batch_size: int,
    seq_len: int,
    images_per_sample: int,
    supervised: int,
    autocast: Literal["bf16", "fp16"] | None = None,
    device: str = "cpu",
) -> StepTrace:
    """Trace one forward + backward pass of a batch of this shape on fake tensors.

    ``assembled`` must have been built on the meta device; its parameters become fake tensors.
    ``seq_len`` counts the image tokens; ``images_per_sample`` may be 0 (text-only). The pass is
    the training step's own (:meth:`llavactl.train.step.TrainingStep.accumulate`), its loss over the
    last ``supervised`` positions of each row: the shapes of the real loss, without a boolean mask
    whose size fake tensors cannot know.
    """
    from unittest import mock

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llavactl.model.flops import attention_share, flop_counter
    from llavactl.resolve.run import Precision
    from llavactl.train.loss import TokenLoss, last_positions_loss
    from llavactl.train.step import TrainingStep

    model = assembled.model
    spec = assembled.image_spec
    image_tokens = spec.num_tokens * images_per_sample
    if image_tokens >= seq_len:
        raise ValueError(f"seq_len {seq_len} leaves no room for {image_tokens} image tokens")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives each module its own tensor, which unties lm_head
        model.train()
        # A CPU process's resident memory keeps what a young-generation collection leaves
        # (measured, benchmarks/memory_estimate.py: local_lite with checkpointing +8% this way,
        # -20% with full collections); a GPU's caching allocator reuses every freed block.
        generation = 1 if device == "cpu" else 2
        counter = _LiveBytes([*model.parameters(), *model.buffers()], generation)
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        ids[:, 1 : 1 + image_tokens] = assembled.image_token_id
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if images_per_sample:
            inputs["pixel_values"] = torch.zeros((batch_size * images_per_sample, 3, spec.size, spec.size))
        # The autocast of the run, on the CPU that traces it; no gradient scaler (it scales values only).
        step = TrainingStep(
            TokenLoss(model, last_positions_loss(supervised)),
            None,
            precision=Precision(autocast=autocast),
            device=torch.device("cpu"),
        )
        # Batches of several records are padded, and their attention runs under a mask over every
        # query-key pair. A lone record's mask is all ones, which transformers drops for the causal
        # kernel (about half the pairs) after reading it; fake tensors cannot be read, so the trace
        # takes the masked path and its attention is counted as the causal kernel's. (Its memory
        # stays the masked path's, GQA keys and values repeated per head: ~4 MiB a SmolLM layer
        # more than the real run keeps, which the CPU allocator's unmodelled overhead outweighs.)
        flops = flop_counter(masked_attention_is_causal=batch_size == 1)
        # LLaVA checks that image tokens and features agree by reading a count back: a value
        # that fake tensors do not have. The batch is built to agree, so the check is skipped.
        no_check = mock.patch("transformers.models.llava.modeling_llava.torch_compilable_check", lambda *a, **k: None)
        # Objects that exist before the step are frozen out of the cycle collector, so that the
        # frequent collections during the trace only walk what the step itself creates.
        gc.collect()
        gc.freeze()
        try:
            with no_check, flops, counter.mode():
                step.accumulate([inputs], denominator=1.0)
        finally:
            gc.unfreeze()
    return StepTrace(
        peak_bytes=counter.peak,
        flops=flops.get_total_flops(),
        attention_flops=attention_share(flops.get_flop_counts()["Global"]),
    )


def estimate_memory(
    assembled: AssembledModel,
    trace: StepTrace,
    *,
    runtime_bytes: int,
    quantized_bits: int | None = None,
) -> MemoryEstimate:
    """The peak of a training step: what is always there plus the traced pass's peak."""
    trainable = trainable_numel(assembled)
    gradients = trainable * 4
    return MemoryEstimate(
        runtime=runtime_bytes,
        weights=weight_bytes(assembled, quantized_bits=quantized_bits),
        gradients=gradients,
        optimizer=trainable * ADAMW_STATE_BYTES,
        activations=max(trace.peak_bytes - gradients, 0),
    )


def runtime_rss_bytes() -> int:
    """Resident memory of a process that has imported what training imports, with no model yet."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    return current_rss_bytes()


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
