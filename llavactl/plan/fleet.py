"""The plan of a run on GPUs that are not here: memory per GPU by strategy, hours, cost, the launch line.

`llavactl dry-run --gpu NAME --gpus N [--nodes M]` plans one fleet, `--compare` several. The model
is the planner's meta build and its traced step (:mod:`llavactl.plan.build`); what this module adds
is the arithmetic of sharing a step over N x M GPUs:

- **Memory per GPU.** ``ddp``: the whole one-process estimate (weights, gradients, AdamW state, the
  traced activations) plus DDP's gradient buckets, a second copy of the gradients
  (``gradient_as_bucket_view`` is off in :mod:`llavactl.train.distributed`). ``fsdp``: weights,
  gradients and optimizer state divided over all GPUs, plus what is gathered at once in the gather
  dtype (bf16 under ``training.bf16``): the root group (tower, projector, embeddings, head), which
  stays gathered through the step, and two decoder layers (the one computing and the one
  prefetched); with accumulation, FSDP2 keeps the unsharded fp32 gradients of the micro-batches
  that skip the reduce-scatter (``set_requires_gradient_sync(False)``). Both add the CUDA context
  and :data:`ALLOCATOR_RESERVE` for the caching allocator; the fit is :func:`memory_fit`'s, with its
  margin.
- **Time.** Compute: the traced FLOPs of the average micro-batch over the GPU's dense peak in the
  run's precision times the planning efficiency (:mod:`llavactl.resolve.gpus`). Communication: ring
  collectives, 2(W-1)/W of the bytes for an all-reduce and (W-1)/W for an all-gather or a
  reduce-scatter, over the node's GPU links and, across nodes, over the network (hierarchically:
  within the node, then between nodes). Overlap rule: DDP's all-reduce hides behind the backward of
  the step's last micro-batch (:data:`BACKWARD_SHARE` of its compute); FSDP's gathers hide behind
  the compute of the micro-batch they serve, its reduce-scatter behind the last backward. What
  does not hide adds to the step.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from llavactl.config.knobs import as_words
from llavactl.errors import ConfigError
from llavactl.plan.build import CUDA_CONTEXT_BYTES, _estimate, _with, average_flops, build_meta, measured_tokens
from llavactl.resolve.facts import GpuFacts, MachineFacts, WorldFacts
from llavactl.resolve.gpus import GpuSpec
from llavactl.resolve.run import Fit, fsdp_limits, memory_fit, resolve

if TYPE_CHECKING:
    from llavactl.config.schema import Profile
    from llavactl.plan.build import RecordLengths, TokenPlan
    from llavactl.plan.memory import MemoryEstimate
    from llavactl.resolve.run import Precision, ResolvedRun

Strategy = Literal["ddp", "fsdp"]
# The caching allocator's fragmentation: blocks it holds but cannot hand out, as a share of the rest.
ALLOCATOR_RESERVE = 0.05
# The backward pass's share of a micro-batch's forward + backward FLOPs (2 of 3 parts).
BACKWARD_SHARE = 2 / 3
# Across nodes, Gbit/s per node: AWS p4d's EFA (4 x 100 Gbit/s for 8 A100s), a modest cloud figure.
DEFAULT_NETWORK_GBPS = 400.0
GRADIENT_BYTES = 4  # gradients and their reduction are fp32 (DDP, and FSDP's reduce_dtype)
_LAYER = re.compile(r"language_model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Fleet:
    """GPUs of one kind, ``gpus_per_node`` on each of ``nodes`` machines."""

    gpu: GpuSpec
    gpus_per_node: int
    nodes: int = 1
    network_gbps: float = DEFAULT_NETWORK_GBPS

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def name(self) -> str:
        """``8x h100-sxm``; ``2x8 h100-sxm`` for 2 nodes of 8."""
        count = f"{self.nodes}x{self.gpus_per_node}" if self.nodes > 1 else f"{self.gpus_per_node}x"
        return f"{count} {self.gpu.key}"


@dataclass(frozen=True)
class Shards:
    """The model's parameters as FSDP groups them: one group per decoder layer, the rest the root."""

    total: int
    trainable: int
    layers: int
    layer_params: int  # the largest decoder layer's

    @property
    def root_params(self) -> int:
        return self.total - self.layers * self.layer_params


def shards_of(named: list[tuple[str, int, bool]]) -> Shards:
    """:class:`Shards` of ``(name, numel, requires_grad)`` parameters."""
    per_layer: dict[int, int] = {}
    for name, numel, _ in named:
        match = _LAYER.search(name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + numel
    largest = max(per_layer.values(), default=0)
    return Shards(sum(n for _, n, _ in named), sum(n for _, n, grad in named if grad), len(per_layer), largest)


@dataclass(frozen=True)
class GpuMemory:
    """Peak bytes on each GPU of a fleet, by kind."""

    context: int  # the CUDA context
    weights: int
    gradients: int
    optimizer: int
    buffers: int  # ddp: gradient buckets; fsdp: gathered groups, unsharded gradients under accumulation
    activations: int
    reserve: int  # the allocator's (ALLOCATOR_RESERVE)

    @property
    def total(self) -> int:
        return (
            self.context
            + self.weights
            + self.gradients
            + self.optimizer
            + self.buffers
            + self.activations
            + self.reserve
        )

    def as_json(self) -> dict[str, int]:
        return {
            "context": self.context,
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "buffers": self.buffers,
            "activations": self.activations,
            "reserve": self.reserve,
            "total": self.total,
        }


def _with_reserve(context: int, weights: int, gradients: int, optimizer: int, buffers: int, act: int) -> GpuMemory:
    reserve = round(ALLOCATOR_RESERVE * (context + weights + gradients + optimizer + buffers + act))
    return GpuMemory(context, weights, gradients, optimizer, buffers, act, reserve)


def ddp_memory(step: MemoryEstimate, world: int) -> GpuMemory:
    """A full replica per GPU; with several GPUs DDP's buckets hold a second copy of the gradients."""
    buckets = step.gradients if world > 1 else 0
    return _with_reserve(CUDA_CONTEXT_BYTES, step.weights, step.gradients, step.optimizer, buckets, step.activations)


def fsdp_memory(step: MemoryEstimate, shards: Shards, world: int, *, gather_bytes: int, accumulation: int) -> GpuMemory:
    """Weights, gradients and optimizer state sharded over ``world`` GPUs, the root group and two
    decoder layers gathered in ``gather_bytes`` a parameter, and the unsharded fp32 gradients that
    accumulation keeps between reduce-scatters."""
    gathered = (shards.root_params + 2 * shards.layer_params) * gather_bytes
    unsharded = shards.trainable * GRADIENT_BYTES if accumulation > 1 else 0
    return _with_reserve(
        CUDA_CONTEXT_BYTES,
        math.ceil(step.weights / world),
        math.ceil(step.gradients / world),
        math.ceil(step.optimizer / world),
        gathered + unsharded,
        step.activations,
    )


# ---------------------------------------------------------------------------- communication


def ring_bytes(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], size: int, world: int) -> float:
    """Bytes each GPU sends in a ring collective over ``world`` GPUs of a ``size``-byte buffer (the
    whole, unsharded one): 2(W-1)/W for an all-reduce, (W-1)/W for an all-gather or a reduce-scatter."""
    times = 2 if kind == "all_reduce" else 1
    return times * (world - 1) / world * size


def collective_seconds(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], size: int, fleet: Fleet) -> float:
    """Seconds of a collective over the fleet: within each node over its GPU links, then between nodes
    over the network, each GPU carrying 1/N of the buffer there on 1/N of its node's bandwidth."""
    inside = ring_bytes(kind, size, fleet.gpus_per_node) / fleet.gpu.link_bytes_per_s
    across = ring_bytes(kind, size, fleet.nodes) / (fleet.network_gbps * 1e9 / 8) if fleet.nodes > 1 else 0.0
    return inside + across


@dataclass(frozen=True)
class Communication:
    """What a strategy sends per optimizer step: bytes each GPU sends, and their seconds."""

    per_micro_batch_bytes: float  # FSDP's gathers, every micro-batch
    per_step_bytes: float  # DDP's all-reduce, FSDP's reduce-scatter: once a step
    per_micro_batch_seconds: float
    per_step_seconds: float


def ddp_communication(trainable: int, fleet: Fleet) -> Communication:
    """One all-reduce of the fp32 gradients a step (the other micro-batches run under ``no_sync``)."""
    size = trainable * GRADIENT_BYTES
    return Communication(
        0.0, ring_bytes("all_reduce", size, fleet.world), 0.0, collective_seconds("all_reduce", size, fleet)
    )


def fsdp_communication(shards: Shards, fleet: Fleet, *, gather_bytes: int) -> Communication:
    """Every micro-batch all-gathers every group for the forward and the decoder layers again for the
    backward (the root stays gathered); the fp32 gradients are reduce-scattered once a step."""
    gathered = (shards.total + shards.layers * shards.layer_params) * gather_bytes
    reduced = shards.trainable * GRADIENT_BYTES
    return Communication(
        ring_bytes("all_gather", gathered, fleet.world),
        ring_bytes("reduce_scatter", reduced, fleet.world),
        collective_seconds("all_gather", gathered, fleet),
        collective_seconds("reduce_scatter", reduced, fleet),
    )


def step_seconds(strategy: Strategy, micro_seconds: float, accumulation: int, comm: Communication) -> float:
    """An optimizer step under the overlap rule: what communication cannot hide behind compute adds."""
    last_backward = BACKWARD_SHARE * micro_seconds
    if strategy == "ddp":
        return accumulation * micro_seconds + max(0.0, comm.per_step_seconds - last_backward)
    micro = max(micro_seconds, comm.per_micro_batch_seconds)
    return accumulation * micro + max(0.0, comm.per_step_seconds - last_backward)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Choice:
    """One way to run the profile's global batch on a fleet."""

    strategy: Strategy
    micro_batch: int
    accumulation: int
    checkpointing: bool
    memory: GpuMemory
    fit: Fit
    micro_seconds: float
    communication: Communication
    seconds_per_step: float
    flops_per_step: int  # all GPUs together
    tokens_per_step: float  # computed, pads included, all GPUs together


@dataclass
class FleetPlan:
    profile: str
    fleet: Fleet
    precision: str  # the rate the peak is read at: bf16, fp16, tf32, fp32
    peak_flops: float
    choice: Choice | None  # None: nothing fits
    strategy: Strategy | None
    strategy_kept: bool  # training.distributed set by the profile or an override
    others: dict[str, str]  # strategy -> why it is not the choice
    global_batch: float
    total_steps: int | None
    tokens_source: str
    price_per_gpu_hour: float | None
    overrides: list[str]
    launch: dict[str, str] | None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.choice is not None

    @property
    def run_hours(self) -> float | None:
        if self.choice is None or self.total_steps is None:
            return None
        return self.total_steps * self.choice.seconds_per_step / 3600

    @property
    def gpu_hours(self) -> float | None:
        return None if self.run_hours is None else self.run_hours * self.fleet.world

    @property
    def cost_usd(self) -> float | None:
        if self.gpu_hours is None or self.price_per_gpu_hour is None:
            return None
        return self.gpu_hours * self.price_per_gpu_hour

    @property
    def tokens_per_second_per_gpu(self) -> float | None:
        c = self.choice
        return None if c is None else c.tokens_per_step / c.seconds_per_step / self.fleet.world

    def as_json(self) -> dict[str, Any]:
        c, f = self.choice, self.fleet
        return {
            "profile": self.profile,
            "fleet": {
                "gpu": f.gpu.key,
                "gpus_per_node": f.gpus_per_node,
                "nodes": f.nodes,
                "network_gbps": f.network_gbps,
                "gpu_memory_bytes": f.gpu.memory_bytes,
            },
            "strategy": self.strategy,
            "strategy_kept": self.strategy_kept,
            "fits": self.fits,
            "fit": None if c is None else c.fit,
            "memory_per_gpu": None if c is None else c.memory.as_json(),
            "micro_batch": None if c is None else c.micro_batch,
            "gradient_accumulation_steps": None if c is None else c.accumulation,
            "gradient_checkpointing": None if c is None else c.checkpointing,
            "global_batch": self.global_batch,
            "precision": self.precision,
            "peak_flops_per_gpu": self.peak_flops,
            "efficiency": f.gpu.efficiency,
            "efficiency_source": f.gpu.efficiency_source,
            "flops_per_step": None if c is None else c.flops_per_step,
            "communication_bytes_per_gpu": None
            if c is None
            else {"per_micro_batch": c.communication.per_micro_batch_bytes, "per_step": c.communication.per_step_bytes},
            "seconds_per_step": None if c is None else c.seconds_per_step,
            "total_steps": self.total_steps,
            "run_hours": self.run_hours,
            "gpu_hours": self.gpu_hours,
            "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            "tokens_source": self.tokens_source,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "cost_usd": self.cost_usd,
            "why_not": self.others,
            "overrides": self.overrides,
            "launch": self.launch,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Traced:
    memory: MemoryEstimate  # without a runtime
    micro_flops: int  # of the average micro-batch
    micro_tokens: float


class FleetPlanner:
    """Plans one profile on any number of fleets; each micro-batch shape is traced once for all."""

    def __init__(self, resolved: ResolvedRun) -> None:
        loaded = resolved.loaded
        self.loaded = loaded
        self.profile = loaded.profile
        self.device_overrides = {} if self.profile.training.device == "cuda" else {"training.device": "cuda"}
        profile = _with(self.profile, self.device_overrides) if self.device_overrides else self.profile
        self.base = profile
        assembled = build_meta(profile, gradient_checkpointing=profile.training.gradient_checkpointing)
        self.tokens, self.lengths = measured_tokens(profile, assembled, resolved.data)
        named = [(n, p.numel(), p.requires_grad) for n, p in assembled.model.named_parameters()]
        self.shards = shards_of(named)
        self.kept = loaded.origin("training.distributed").kind != "default"
        self._traced: dict[tuple[int, bool], _Traced] = {}

    def traced(self, micro_batch: int, checkpointing: bool) -> _Traced:
        key = (micro_batch, checkpointing)
        if key not in self._traced:
            profile = self._profile(micro_batch, 1, checkpointing)
            tokens = self._tokens(profile)
            memory, trace, shapes = _estimate(profile, tokens, runtime_bytes=0, device="cuda")
            micro = tokens.micro_batch
            flops = average_flops(trace, shapes, micro)
            self._traced[key] = _Traced(memory, flops, micro.tokens if micro is not None else shapes[0])
        return self._traced[key]

    def _profile(self, micro_batch: int, accumulation: int, checkpointing: bool) -> Profile:
        overrides: dict[str, Any] = {
            "training.gradient_accumulation_steps": accumulation,
            "training.gradient_checkpointing": checkpointing,
        }
        if not self.base.data.max_tokens_per_batch:
            overrides["training.per_device_train_batch_size"] = micro_batch
        changed = {k: v for k, v in overrides.items() if _get(self.base, k) != v}
        return _with(self.base, changed) if changed else self.base

    def _tokens(self, profile: Profile) -> TokenPlan:
        """The token plan, its average micro-batch recut for ``profile``'s batch size."""
        if self.lengths is None:
            return self.tokens
        from llavactl.data.dataset import Batching, micro_batch_work

        lengths: RecordLengths = self.lengths
        micro = micro_batch_work(lengths.lengths, lengths.text_only, Batching.of(profile))
        return replace(self.tokens, micro_batch=micro)

    def per_gpu_batches(self, world: int) -> tuple[list[tuple[int, int]], float, list[str]]:
        """(micro-batch, accumulation) pairs that keep the profile's global batch on ``world`` GPUs,
        largest micro-batch first (none larger than the profile's), the global batch they make, notes."""
        t = self.base.training
        notes: list[str] = []
        if self.base.data.max_tokens_per_batch:
            accumulation = max(1, round(t.gradient_accumulation_steps / world))
            if accumulation * world != t.gradient_accumulation_steps:
                notes.append(
                    f"the token budget's accumulation {t.gradient_accumulation_steps} does not divide over {world} "
                    f"GPUs: {accumulation} per GPU makes the global batch {accumulation * world} micro-batches"
                )
            micro = self.tokens.micro_batch.records if self.tokens.micro_batch else 1.0
            return [(t.per_device_train_batch_size, accumulation)], micro * accumulation * world, notes
        wanted = self.base.global_batch_size
        per_gpu = math.ceil(wanted / world)
        if per_gpu * world != wanted:
            notes.append(
                f"the global batch {wanted} does not divide over {world} GPUs: {per_gpu} per GPU makes it "
                f"{per_gpu * world}"
            )
        sizes = [b for b in range(min(per_gpu, t.per_device_train_batch_size), 0, -1) if per_gpu % b == 0]
        return [(b, per_gpu // b) for b in sizes], float(per_gpu * world), notes

    def plan(self, fleet: Fleet, price_per_gpu_hour: float | None = None) -> FleetPlan:
        precision, notes = self._precision(fleet)
        peak, rate = fleet.gpu.peak(precision)
        if self.profile.training.bf16 and rate != "bf16":
            notes.append(f"{fleet.gpu.name} has no bf16: the time is planned at its {rate} rate")
        pairs, global_batch, batch_notes = self.per_gpu_batches(fleet.world)
        notes += batch_notes
        strategies: list[Strategy] = ["ddp"] if fleet.world == 1 else ["ddp", "fsdp"]
        fixed = self.profile.training.distributed if self.kept and fleet.world > 1 else None
        best: dict[str, Choice | str] = {s: self._best(s, fleet, pairs, peak) for s in strategies}
        candidates = [c for c in best.values() if isinstance(c, Choice)]
        if fixed is not None:
            chosen = best[fixed] if isinstance(best[fixed], Choice) else None
        else:
            chosen = min(candidates, key=lambda c: (c.fit != "fits", c.seconds_per_step), default=None)
        others: dict[str, str] = {}
        for strategy, result in best.items():
            if isinstance(result, Choice) and result is not chosen:
                verb = "would fit" if fixed is not None else "fits, but is slower"
                others[strategy] = (
                    f"{verb}: micro-batch {result.micro_batch} x {result.accumulation}, "
                    f"{_gib(result.memory.total)} per GPU, {result.seconds_per_step:.2f} s per step"
                )
            elif isinstance(result, str):
                others[strategy] = result
        if fleet.world == 1:
            others["fsdp"] = "one GPU: nothing to shard over"
        choice = chosen if isinstance(chosen, Choice) else None
        overrides = self._overrides(choice, fleet)
        plan = FleetPlan(
            profile=self.loaded.name,
            fleet=fleet,
            precision=rate,
            peak_flops=peak,
            choice=choice,
            strategy=choice.strategy if choice else fixed,
            strategy_kept=fixed is not None,
            others=others,
            global_batch=global_batch,
            total_steps=self._total_steps(choice, fleet),
            tokens_source=self.tokens.source,
            price_per_gpu_hour=price_per_gpu_hour,
            overrides=overrides,
            launch=None,
            notes=notes,
        )
        plan.launch = launch_lines(self.loaded.name, overrides, fleet) if choice else None
        return plan

    def _precision(self, fleet: Fleet) -> tuple[Precision, list[str]]:
        """The run's precision on the fleet's GPU, and the GPU rules (resolve's) it breaks."""
        gpu = fleet.gpu
        facts = MachineFacts(
            python=(3, 11, 0),
            packages={},
            torch_cuda_build="planned",
            gpus=[GpuFacts(gpu.name, gpu.memory_bytes, gpu.memory_bytes, gpu.capability)] * fleet.gpus_per_node,
        )
        world = WorldFacts(fleet.world, fleet.gpus_per_node, frozenset({"nccl", "gloo"}))
        loaded = replace(self.loaded, profile=self.base)
        resolved = resolve(loaded, facts, world)
        gpu_rules = ("training.bf16", "training.fp16", "training.tf32")
        notes = [f"{p.problem.message} Fix: {p.problem.fix}" for p in resolved.problems if p.check in gpu_rules]
        return resolved.precision, notes

    def _best(self, strategy: Strategy, fleet: Fleet, pairs: list[tuple[int, int]], peak: float) -> Choice | str:
        """The fastest way ``strategy`` fits: for checkpointing off, then on, the largest micro-batch
        that fits with the estimate's margin (else the largest that fits without it); or why none does."""
        if strategy == "fsdp":
            limits = fsdp_limits(self.profile.stage, fp16=self.profile.training.fp16)
            if limits:
                return f"not for this profile: {limits[0].message}"
        found: list[Choice] = []
        smallest: GpuMemory | None = None
        for checkpointing in (False, True):
            tight: Choice | None = None
            for b, a in pairs:
                c = self._choice(strategy, fleet, b, a, checkpointing, peak)
                smallest = c.memory if smallest is None or c.memory.total < smallest.total else smallest
                if c.fit == "fits":
                    found.append(c)
                    break
                tight = tight or (c if c.fit == "tight" else None)
            else:
                found.extend([tight] if tight else [])
            if any(c.fit == "fits" for c in found):
                break  # checkpointing only when needed
        if found:
            return min(found, key=lambda c: (c.fit != "fits", c.seconds_per_step))
        assert smallest is not None
        b, a = pairs[-1]
        return (
            f"does not fit: even micro-batch {b} x {a} with gradient checkpointing needs {_gib(smallest.total)} "
            f"per GPU ({_memory_words(smallest)}) of {_gib(fleet.gpu.memory_bytes)}"
        )

    def _choice(self, strategy: Strategy, fleet: Fleet, b: int, a: int, checkpointing: bool, peak: float) -> Choice:
        traced = self.traced(b, checkpointing)
        gather = 2 if self.profile.training.bf16 else 4
        if strategy == "ddp":
            memory = ddp_memory(traced.memory, fleet.world)
            comm = ddp_communication(self.shards.trainable, fleet) if fleet.world > 1 else _NO_COMMUNICATION
        else:
            memory = fsdp_memory(traced.memory, self.shards, fleet.world, gather_bytes=gather, accumulation=a)
            comm = fsdp_communication(self.shards, fleet, gather_bytes=gather)
        micro_seconds = traced.micro_flops / (peak * fleet.gpu.efficiency)
        fit = memory_fit(memory.total, fleet.gpu.memory_bytes) or "over"
        return Choice(
            strategy,
            b,
            a,
            checkpointing,
            memory,
            fit,
            micro_seconds,
            comm,
            step_seconds(strategy, micro_seconds, a, comm),
            traced.micro_flops * a * fleet.world,
            traced.micro_tokens * a * fleet.world,
        )

    def _total_steps(self, choice: Choice | None, fleet: Fleet) -> int | None:
        t = self.base.training
        if choice is None:
            return t.total_steps(None)
        profile = self._profile(choice.micro_batch, choice.accumulation, choice.checkpointing)
        records = self.tokens.records
        if not records:
            return profile.training.total_steps(None)
        micro = self.tokens.micro_batch
        per_batch = micro.records if micro is not None and self.base.data.max_tokens_per_batch else choice.micro_batch
        batches = math.ceil(records / (per_batch * fleet.world))
        return profile.training.total_steps(profile.training.steps_per_epoch(batches))

    def _overrides(self, choice: Choice | None, fleet: Fleet) -> list[str]:
        """The command line's overrides: the dry-run's own, then what the plan changes in the profile."""
        words = list(self.loaded.overrides)
        if choice is None:
            return words
        changes: dict[str, Any] = dict(self.device_overrides)
        if not self.base.data.max_tokens_per_batch:
            changes["training.per_device_train_batch_size"] = choice.micro_batch
        changes["training.gradient_accumulation_steps"] = choice.accumulation
        changes["training.gradient_checkpointing"] = choice.checkpointing
        changed = {k: v for k, v in changes.items() if _get(self.profile, k) != v}
        if fleet.world > 1:  # said even when it is the default: the line shows how the GPUs share the work
            changed["training.distributed"] = choice.strategy
        return words + (as_words(changed).split() if changed else [])


_NO_COMMUNICATION = Communication(0.0, 0.0, 0.0, 0.0)


def _get(profile: Profile, dotted: str) -> Any:
    node: Any = profile
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _gib(value: float) -> str:
    return f"{value / 1024**3:.1f} GiB"


def _memory_words(m: GpuMemory) -> str:
    return (
        f"weights {_gib(m.weights)}, gradients {_gib(m.gradients)}, optimizer {_gib(m.optimizer)}, "
        f"buffers {_gib(m.buffers)}, activations {_gib(m.activations)}"
    )


# ---------------------------------------------------------------------------- launch lines


def launch_lines(profile: str, overrides: list[str], fleet: Fleet) -> dict[str, str]:
    """The command that runs the plan on the fleet: `llavactl train --nproc-per-node N` on one node;
    on several, torchrun on each node (the same line everywhere, a c10d rendezvous) and a SLURM script."""
    words = " ".join(_quoted(w) for w in overrides)
    tail = f" {words}" if words else ""
    n = fleet.gpus_per_node
    if fleet.nodes == 1:
        nproc = f" --nproc-per-node {n}" if n > 1 else ""
        return {"command": f"llavactl train --profile {profile}{nproc}{tail}"}
    torchrun = (
        f"torchrun --nnodes {fleet.nodes} --nproc-per-node {n} --rdzv-backend c10d "
        f"--rdzv-endpoint HEAD_NODE:29500 --rdzv-id JOB_ID -m llavactl train --profile {profile}{tail}"
    )
    slurm = "\n".join(
        [
            "#!/bin/bash",
            "#SBATCH --job-name=llavactl",
            f"#SBATCH --nodes={fleet.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={n}",
            "#SBATCH --signal=TERM@300",
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {n} --shutdown-timeout 240 \\',
            '  --rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "$SLURM_JOB_ID" \\',
            f"  -m llavactl train --profile {profile}{tail} --resume auto",
        ]
    )
    return {"torchrun": torchrun, "slurm": slurm}


def _quoted(word: str) -> str:
    return shlex.quote(word)


# ---------------------------------------------------------------------------- fleets and comparing


def parse_counts(text: str, option: str) -> list[int]:
    """``8`` or ``1,2,4,8`` as whole numbers of at least 1."""
    try:
        counts = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"{option} {text!r} is not a count or a list of counts.", fix=f"e.g. `{option} 1,2,4,8`")
    return counts


def parse_prices(text: str | None, find: Callable[[str], GpuSpec]) -> Callable[[GpuSpec], float | None]:
    """``--price-per-gpu-hour``: one USD figure for every GPU, or ``gpu=price,...`` per GPU."""
    if text is None:
        return lambda gpu: None
    try:
        return lambda gpu, value=float(text): value  # type: ignore[misc]
    except ValueError:
        pass
    prices: dict[str, float] = {}
    for word in text.split(","):
        name, _, value = word.partition("=")
        try:
            prices[find(name.strip()).key] = float(value)
        except ValueError as exc:
            raise ConfigError(
                f"--price-per-gpu-hour {text!r}: `{word}` is not `gpu=USD`.",
                fix="give one price for all GPUs (`--price-per-gpu-hour 2.0`) or `a100-80gb=1.8,h100=3.2`",
            ) from exc
    return lambda gpu: prices.get(gpu.key)


@dataclass
class Comparison:
    plans: list[FleetPlan]  # by cost (by GPU-hours where a price is missing), fitting first
    cheapest: int | None  # index of the cheapest that fits
    cheapest_in_time: int | None  # with max_hours: the cheapest that finishes within it
    max_hours: float | None
    by: str  # what the order is: "cost" or "GPU-hours"

    def as_json(self) -> dict[str, Any]:
        return {
            "profile": self.plans[0].profile if self.plans else None,
            "fleets": [p.as_json() for p in self.plans],
            "sorted_by": self.by,
            "cheapest": self.cheapest,
            "max_hours": self.max_hours,
            "cheapest_in_time": self.cheapest_in_time,
        }


def compare(plans: list[FleetPlan], max_hours: float | None = None) -> Comparison:
    """``plans`` in order of cost (GPU-hours for those without a price), fitting ones first, the
    cheapest that fits marked, and with ``max_hours`` the cheapest that finishes in time."""
    priced = all(p.cost_usd is not None for p in plans if p.fits and p.gpu_hours is not None)

    def key(p: FleetPlan) -> tuple[bool, float, float]:
        figure = p.cost_usd if priced else p.gpu_hours
        return (figure is None, figure if figure is not None else math.inf, p.run_hours or math.inf)

    ordered = sorted(plans, key=key)
    fitting = [i for i, p in enumerate(ordered) if p.fits and p.gpu_hours is not None]
    in_time = [i for i in fitting if max_hours is not None and (ordered[i].run_hours or math.inf) <= max_hours]
    return Comparison(
        ordered,
        fitting[0] if fitting else None,
        in_time[0] if in_time else None,
        max_hours,
        "cost" if priced and any(p.cost_usd is not None for p in plans) else "GPU-hours",
    )


def fleets_of(
    gpu: str | None,
    gpus: str | None,
    nodes: str | None,
    gpu_spec: str | None,
    network_gbps: float | None,
    *,
    comparing: bool,
) -> list[Fleet]:
    """The fleets that dry-run's options name: each GPU (``--gpu``, comma-separated, or the one of
    ``--gpu-spec``; a default set under ``--compare``) with each count of ``--gpus`` and ``--nodes``."""
    from llavactl.resolve.gpus import custom_gpu, find_gpu

    if gpu is not None and gpu_spec is not None:
        raise ConfigError(f"--gpu {gpu} and --gpu-spec {gpu_spec} both name the GPU.", fix="keep one of them")
    if gpu_spec is not None:
        kinds = [custom_gpu(gpu_spec)]
    elif gpu is not None:
        kinds = [find_gpu(name) for name in gpu.split(",") if name.strip()]
    else:
        kinds = [find_gpu(name) for name in DEFAULT_GPUS]
    counts = parse_counts(gpus, "--gpus") if gpus else list(DEFAULT_COUNTS if comparing else (1,))
    node_counts = parse_counts(nodes, "--nodes") if nodes else [1]
    if not comparing and len(kinds) * len(counts) * len(node_counts) > 1:
        raise ConfigError(
            f"--gpu {gpu} --gpus {gpus} --nodes {nodes} names several fleets; one plan is for one fleet.",
            fix="add `--compare` to plan and compare them all",
        )
    network = DEFAULT_NETWORK_GBPS if network_gbps is None else network_gbps
    return [Fleet(k, n, m, network) for k in kinds for m in node_counts for n in counts]


DEFAULT_GPUS = ("a100-40gb", "a100-80gb", "h100-sxm", "h200", "b200", "l40s", "l4", "a10g")
DEFAULT_COUNTS = (1, 8)


def plan_fleets(
    resolved: ResolvedRun,
    fleets: list[Fleet],
    *,
    price: Callable[[GpuSpec], float | None],
    max_hours: float | None = None,
) -> Comparison:
    """The plan of the resolved run on each of ``fleets``, compared (one fleet: a comparison of one)."""
    planner = FleetPlanner(resolved)
    return compare([planner.plan(f, price(f.gpu)) for f in fleets], max_hours)
