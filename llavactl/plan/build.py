"""The plan of a training run, made without weights: what trains, how long, how much memory.

`llavactl dry-run` prints it. The model is built on the meta device from known or cached
configs; tokens per sample come from the data when the tokenizer is at hand (else from
``data.max_seq_len``); peak memory and FLOPs come from tracing one step on fake tensors
(:mod:`llavactl.plan.memory`). When the estimate does not fit the free memory, the plan lists
the overrides that would make it fit, cheapest in quality first, each with its estimated peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from llavactl.config.knobs import as_words, memory_knobs
from llavactl.errors import ConfigError, DataError, ModelSourceError
from llavactl.resolve.run import Fit, Precision, autocast_of, memory_fit

if TYPE_CHECKING:
    from llavactl.config.schema import Profile
    from llavactl.data.dataset import MicroBatchWork
    from llavactl.data.source import DataSource
    from llavactl.model.assembly import AssembledModel
    from llavactl.plan.memory import ComponentParams, MemoryEstimate, StepTrace
    from llavactl.resolve.run import ResolvedRun

# Tokens per sample are measured on at most this many records, spread over the file.
TOKEN_SAMPLE = 2000
# The share of the measured fp32 matmul FLOP/s that a training step reaches on local_lite's shapes
# (benchmarks/local_lite_step.py, which runs the training step unit, llavactl.train.step.TrainingStep;
# attention and recomputed FLOPs counted). It depends on the CPU's balance of FMA units to memory:
# 77-83% on a 2-core AVX512 machine whose 2048^3 fp32 matmul ran at ~200 GFLOP/s, 56-61% on one
# with two FMA units a core (~320 GFLOP/s), whose matmuls are faster but the rest of the step is
# not. The planning figure sits between, nearer the slower share.
STEP_EFFICIENCY = 0.6
CUDA_CONTEXT_BYTES = 600 * 1024**2


@dataclass(frozen=True)
class TokenPlan:
    """Tokens per sample, image tokens included, and where the figures come from."""

    source: str
    records: int | None
    records_with_image: int | None  # records with an `image` key (counted in their bytes, not decoded)
    image_tokens_per_image: int
    images_per_sample: int  # the most images one sampled record has (0: text-only data)
    mean: float
    p95: int
    longest: int  # what a batch is padded to at worst, capped at data.max_seq_len
    supervised: int  # supervised tokens of the longest sample (what the LM head runs on)
    # From the tokenized records, for the profile's batching: the average micro-batch, and the
    # share of pad tokens in padded batches of the profile's size (None without token lengths).
    micro_batch: MicroBatchWork | None = None
    pad_fraction: float | None = None


@dataclass(frozen=True)
class Suggestion:
    """Overrides that lower the peak, cumulative with the ones before, and the peak after them."""

    overrides: str
    why: str
    peak_bytes: int


@dataclass
class Plan:
    profile: str
    stage: str
    device: str
    components: list[ComponentParams]
    tokens: TokenPlan
    global_batch: float  # records per optimizer step (on average, under a token budget)
    steps_per_epoch: int | None
    total_steps: int | None
    memory: MemoryEstimate
    memory_other_checkpointing: MemoryEstimate
    free_bytes: int | None
    flops_per_step: int
    matmul_flops_per_s: float | None
    seconds_per_step: float | None
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batch_size: int = 1  # records per padded micro-batch (training.per_device_train_batch_size)
    padding_free: bool = False

    @property
    def fit(self) -> Fit | None:
        """Doctor's verdict on the peak: ``fits`` with the estimate's margin, ``tight`` within the
        free memory only, ``over`` it; None when the free memory is unknown."""
        return memory_fit(self.memory.total, self.free_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.fit is None else self.fit != "over"

    @property
    def out_of_reach(self) -> bool:
        """The run does not fit, and none of the suggested overrides brings it under the free memory."""
        return self.fits is False and first_fitting(self.suggestions, self.free_bytes or 0) is None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory"] = self.memory.as_json()
        data["memory_other_checkpointing"] = self.memory_other_checkpointing.as_json()
        data["fits"], data["fit"] = self.fits, self.fit
        return data


def build_meta(profile: Profile, *, gradient_checkpointing: bool) -> AssembledModel:
    """The profile's model on the meta device: shapes and dtypes, no weights, no download."""
    from llavactl.model.assembly import build_llava

    return build_llava(
        profile.model,
        profile.stage,
        image_size=profile.data.image_size,
        seed=profile.seed,
        gradient_checkpointing=gradient_checkpointing,
        device="meta",
        # Frozen weights in the step's autocast dtype, as the run stores them.
        compute_dtype=Precision(autocast_of(profile.training)).autocast_dtype(),
    )


@dataclass(frozen=True)
class RecordLengths:
    """The measured records' tokens as the trainer cuts them, and which are text-only: what batching
    them another way (another micro-batch size, on a fleet) needs."""

    lengths: list[int]
    text_only: list[bool]


def token_plan(
    profile: Profile, assembled: AssembledModel, open_data: Callable[[], DataSource] | None = None
) -> TokenPlan:
    """Tokens per sample from the data (a spread sample of records, opened by ``open_data``: the
    resolved run's, else afresh) or from data.max_seq_len."""
    return measured_tokens(profile, assembled, open_data)[0]


def measured_tokens(
    profile: Profile, assembled: AssembledModel, open_data: Callable[[], DataSource] | None = None
) -> tuple[TokenPlan, RecordLengths | None]:
    """:func:`token_plan`, with the lengths it measured (None when it measured none)."""
    import numpy as np

    from llavactl.data.dataset import Batching, micro_batch_work, padding_summary
    from llavactl.data.records import Record, RecordProblem
    from llavactl.data.source import open_source
    from llavactl.data.templates import encoder_for, prepare

    data = profile.data
    per_image = assembled.image_spec.num_tokens
    # Without a tokenizer: every sample as long as allowed, half of its text supervised.
    fallback = TokenPlan(
        f"data.max_seq_len={data.max_seq_len}",
        None,
        None,
        per_image,
        1,
        data.max_seq_len,
        data.max_seq_len,
        data.max_seq_len,
        max(1, (data.max_seq_len - per_image) // 2),
    )
    try:
        opened = open_data() if open_data is not None else open_source(data, profile.seed)
    except DataError as exc:
        return replace(fallback, source=f"{fallback.source} ({exc.message})"), None
    store = opened.records
    count = len(store)
    counts = None
    if assembled.tokenizer is not None:
        from llavactl.data.lengths import cached_counts
        from llavactl.data.tokens import TokenContext

        context = TokenContext(assembled.tokenizer, assembled.image_token_id, assembled.image_spec)
        counts = cached_counts(store, context, data.conversation_template, data.max_seq_len)
    lengths: list[int] = []
    supervised: list[int] = []
    text_only: list[bool] = []
    if counts is not None:
        # `data check` counted every record for this tokenizer, template, image size and max_seq_len.
        built = counts.built()
        images = counts.images[counts.images >= 0]
        with_image = int((images > 0).sum())
        fitting = images[images * per_image < data.max_seq_len]
        most_images = int(fitting.max()) if len(fitting) else 0
        lengths = np.minimum(counts.full[built], data.max_seq_len).tolist()
        supervised = counts.supervised[built].tolist()
        text_only = (counts.images[built] == 0).tolist()
        source = f"all {len(lengths):,} of {count:,} records (token counts kept by `data check`)"
    else:
        # A spread sample of the records, decoded; the file's other records are never built.
        stride = max(1, count // TOKEN_SAMPLE)
        records = [r for r in store.parsed(range(0, count, stride)[:TOKEN_SAMPLE]) if isinstance(r, Record)]
        with_image = int(store.has_image().sum())
        # A record whose image tokens alone fill data.max_seq_len cannot train (`too_long`): it is
        # stopped on or skipped, so it does not size the step.
        most_images = max((len(r.images) for r in records if len(r.images) * per_image < data.max_seq_len), default=0)
        if assembled.tokenizer is not None:
            encoder = encoder_for(assembled.tokenizer, assembled.image_token_id, per_image, data.conversation_template)
            for record in records:
                try:
                    prepared = prepare(record, data.conversation_template, encoder, data.max_seq_len)
                except RecordProblem:
                    continue
                lengths.append(min(prepared.full_length, data.max_seq_len))
                supervised.append(prepared.encoded.num_supervised)
                text_only.append(not record.images)
        source = f"{len(lengths):,} of {count:,} records tokenized"
    if not lengths:
        why = "no tokenizer at hand" if assembled.tokenizer is None else "no record tokenizes"
        plan = replace(
            fallback,
            source=f"{fallback.source} ({why})",
            records=count,
            records_with_image=with_image,
            images_per_sample=max(most_images, 1),
        )
        return plan, None
    ordered = sorted(lengths)
    batching = Batching.of(profile)
    mixed = opened.mixed()
    plan = TokenPlan(
        f"{source}; sources: {mixed}" if mixed else source,
        count,
        with_image,
        per_image,
        most_images,
        round(sum(ordered) / len(ordered), 1),
        ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        ordered[-1],
        max(supervised),
        micro_batch_work(lengths, text_only, batching),
        padding_summary(lengths, text_only, batching)["pad_fraction"],
    )
    return plan, RecordLengths(lengths, text_only)


def estimate(
    profile: Profile,
    tokens: TokenPlan,
    *,
    runtime_bytes: int,
    device: str = "cpu",
    assembled: AssembledModel | None = None,
) -> tuple[MemoryEstimate, int]:
    """Peak memory and FLOPs of the largest micro-batch step of ``profile`` (built afresh on meta
    unless ``assembled``, the profile's :func:`build_meta`, is given)."""
    memory, trace, _ = _estimate(profile, tokens, runtime_bytes=runtime_bytes, device=device, assembled=assembled)
    return memory, trace.flops


def _estimate(
    profile: Profile, tokens: TokenPlan, *, runtime_bytes: int, device: str, assembled: AssembledModel | None = None
) -> tuple[MemoryEstimate, StepTrace, tuple[int, int]]:
    """:func:`estimate`, with the whole trace and the shapes traced: (tokens, attention pairs)."""
    from llavactl.model.flops import attention_pairs
    from llavactl.plan.memory import estimate_memory, trace_step

    training = profile.training
    if assembled is None:
        assembled = build_meta(profile, gradient_checkpointing=training.gradient_checkpointing)
    seq_len = min(
        max(tokens.longest, assembled.image_spec.num_tokens * tokens.images_per_sample + 8), profile.data.max_seq_len
    )
    image_tokens = assembled.image_spec.num_tokens * tokens.images_per_sample
    if image_tokens >= profile.data.max_seq_len:
        raise ConfigError(
            f"data.max_seq_len={profile.data.max_seq_len} leaves no room for text beside the {image_tokens} image "
            f"tokens of {tokens.images_per_sample} image(s) of {assembled.image_spec.size} px",
            fix=f"raise it, e.g. `data.max_seq_len={image_tokens + 256}`, or lower `data.image_size`",
        )
    # The largest micro-batch: the profile's records; under a token budget, rows of the longest
    # records covering the whole budget, with as many images as the fullest micro-batch of image
    # records holds (short image records pack many images into one budget).
    budget = profile.data.max_tokens_per_batch
    rows = math.ceil(budget / seq_len) if budget else training.per_device_train_batch_size
    images_per_row = tokens.images_per_sample
    if budget and tokens.micro_batch is not None and tokens.images_per_sample:
        images_per_row = max(images_per_row, math.ceil(tokens.micro_batch.most_image_records / rows))
        images_per_row = min(images_per_row, (seq_len - 8) // assembled.image_spec.num_tokens)
    trace = trace_step(
        assembled,
        batch_size=rows,
        seq_len=seq_len,
        images_per_sample=images_per_row,
        supervised=min(tokens.supervised, seq_len - 1),
        autocast=autocast_of(training),
        device=device,
    )
    quantized = 4 if profile.model.load_in_4bit else 8 if profile.model.load_in_8bit else None
    memory = estimate_memory(assembled, trace, runtime_bytes=runtime_bytes, quantized_bits=quantized)
    # Several padded rows run masked attention over every pair; a lone row, the causal pairs.
    pairs = rows * attention_pairs(seq_len, seq_len, is_causal=rows == 1)
    return memory, trace, (rows * seq_len, pairs)


def average_flops(trace: StepTrace, traced: tuple[int, int], micro: MicroBatchWork | None) -> int:
    """FLOPs of the average micro-batch of the profile's batching (``micro``; padded rows, or packed
    records), scaled from the traced largest one by its shapes (``traced``: tokens, attention pairs)."""
    if micro is None:
        return trace.flops
    from llavactl.model.flops import scaled_flops

    linear = trace.flops - trace.attention_flops
    return round(scaled_flops(linear, trace.attention_flops, traced, (micro.tokens, micro.pairs)))


def first_fitting(suggestions: list[Suggestion], free_bytes: int) -> Suggestion | None:
    """The cheapest suggested overrides whose estimate fits ``free_bytes`` (None when none does)."""
    return next((s for s in suggestions if memory_fit(s.peak_bytes, free_bytes) != "over"), None)


def suggest(
    profile: Profile, tokens: TokenPlan, *, free_bytes: int, runtime_bytes: int, device: str = "cpu"
) -> list[Suggestion]:
    """Cumulative overrides, cheapest in quality first, until the estimate fits ``free_bytes``.

    A knob that saves less than 2% of the peak is left out: its quality cost would buy nothing.
    """
    applied: dict[str, Any] = {}
    suggestions: list[Suggestion] = []
    current = profile
    peak, _ = estimate(profile, tokens, runtime_bytes=runtime_bytes, device=device)
    last = peak.total
    native = math.isqrt(tokens.image_tokens_per_image) * _patch_size(profile)
    knobs = memory_knobs(
        profile, p95_tokens=tokens.p95, native_image_size=native, images_per_sample=tokens.images_per_sample
    )
    for knob in knobs:
        candidate = _with(current, knob.overrides)
        if "stage" in knob.overrides:
            # LoRA keys left from another stage are refused by the schema; LoRA's defaults apply.
            candidate = _with(candidate, {"model.lora_r": 16, "model.lora_alpha": 32})
        memory, _ = estimate(candidate, _retoken(tokens, candidate), runtime_bytes=runtime_bytes, device=device)
        if memory.total > last * 0.98:
            continue
        current, last = candidate, memory.total
        applied.update(knob.overrides)
        suggestions.append(Suggestion(as_words(applied), knob.why, memory.total))
        if memory_fit(memory.total, free_bytes) != "over":
            break
    return suggestions


def _with(profile: Profile, overrides: dict[str, Any]) -> Profile:
    data = profile.model_dump()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return type(profile).model_validate(data)


def _retoken(tokens: TokenPlan, profile: Profile) -> TokenPlan:
    """Token counts after an override of the image size or of data.max_seq_len."""
    size = profile.data.image_size
    per_image = tokens.image_tokens_per_image
    if size is not None:
        patch = _patch_size(profile)
        per_image = (size // patch) ** 2
    text = tokens.longest - tokens.image_tokens_per_image * tokens.images_per_sample
    longest = min(text + per_image * tokens.images_per_sample, profile.data.max_seq_len)
    return replace(tokens, image_tokens_per_image=per_image, p95=min(tokens.p95, longest), longest=longest)


def _patch_size(profile: Profile) -> int:
    from llavactl.model.sources import tower_image_spec

    return tower_image_spec(profile.model.vision_tower, profile.data.image_size).patch_size


def build_plan(resolved: ResolvedRun, *, runtime_bytes: int, device_memory: int | None = None) -> Plan:
    """The whole plan of the resolved run on its device; ``device_memory`` (bytes) stands for the
    free memory of a device planned for elsewhere (else the resolution's free memory)."""
    profile, device = resolved.loaded.profile, resolved.device_type
    free_bytes = device_memory if device_memory is not None else resolved.free_memory_bytes
    measure_speed = resolved.device_present
    notes: list[str] = []
    try:
        assembled = build_meta(profile, gradient_checkpointing=profile.training.gradient_checkpointing)
    except ModelSourceError as exc:
        raise ModelSourceError(
            f"dry-run needs the model's config: {exc.message}",
            fix=exc.fix,
        ) from exc
    from llavactl.plan.memory import component_params

    components = component_params(assembled)
    tokens = token_plan(profile, assembled, resolved.data)
    t = profile.training
    runtime = runtime_bytes + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)
    memory, trace, traced = _estimate(profile, tokens, runtime_bytes=runtime, device=device, assembled=assembled)
    other = _with(profile, {"training.gradient_checkpointing": not t.gradient_checkpointing})
    memory_other, _ = estimate(other, tokens, runtime_bytes=runtime, device=device)
    steps_per_epoch = None
    micro = tokens.micro_batch
    if tokens.records:
        budget = micro is not None and profile.data.max_tokens_per_batch is not None
        batches = math.ceil(tokens.records / (micro.records if budget else t.per_device_train_batch_size))
        steps_per_epoch = t.steps_per_epoch(batches)
    total_steps = t.total_steps(steps_per_epoch)
    # Memory is planned for the largest micro-batch; time for the average one of the profile's
    # batching (padded rows, or packed records), scaled from the trace by its shapes.
    flops_per_step = average_flops(trace, traced, micro) * t.gradient_accumulation_steps
    matmul = seconds = None
    if measure_speed:
        from llavactl.model.flops import measure_matmul_flops

        # bf16 on a GPU (what training there runs in), fp32 on a CPU.
        matmul = measure_matmul_flops(device, "bfloat16" if device == "cuda" else "float32")
        seconds = flops_per_step / (matmul * STEP_EFFICIENCY)
    else:
        notes.append(f"no {device} device on this machine: time per step not estimated")
    suggestions: list[Suggestion] = []
    if memory_fit(memory.total, free_bytes) == "over":
        suggestions = suggest(profile, tokens, free_bytes=free_bytes, runtime_bytes=runtime, device=device)
    return Plan(
        profile=resolved.loaded.name,
        stage=profile.stage,
        device=device,
        components=components,
        tokens=tokens,
        global_batch=(
            micro.records * t.gradient_accumulation_steps
            if micro is not None and profile.data.max_tokens_per_batch
            else profile.global_batch_size
        ),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        memory=memory,
        memory_other_checkpointing=memory_other,
        free_bytes=free_bytes,
        flops_per_step=flops_per_step,
        matmul_flops_per_s=matmul,
        seconds_per_step=seconds,
        suggestions=suggestions,
        notes=notes,
        batch_size=t.per_device_train_batch_size,
        padding_free=profile.data.padding_free,
    )


def plan_memory(resolved: ResolvedRun) -> tuple[int, str | None]:
    """The estimated peak of the resolved run on its device and, when it exceeds the device's free
    memory, the cheapest overrides whose estimate fits (None when none does). For doctor's memory check."""
    from llavactl.plan.memory import runtime_rss_bytes

    profile, device = resolved.loaded.profile, resolved.device_type
    free_bytes = resolved.free_memory_bytes or 0

    runtime = runtime_rss_bytes() + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)
    assembled = build_meta(profile, gradient_checkpointing=profile.training.gradient_checkpointing)
    tokens = token_plan(profile, assembled, resolved.data)
    memory, _ = estimate(profile, tokens, runtime_bytes=runtime, device=device, assembled=assembled)
    if memory_fit(memory.total, free_bytes) != "over":
        return memory.total, None
    fitting = first_fitting(
        suggest(profile, tokens, free_bytes=free_bytes, runtime_bytes=runtime, device=device), free_bytes
    )
    return memory.total, fitting.overrides if fitting else None
