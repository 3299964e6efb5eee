"""A validated profile resolved against this machine and process world: the one place for machine rules.

:func:`resolve` turns (profile, machine facts, world facts) into a frozen :class:`ResolvedRun`:
the device ``auto`` means here, the precision (autocast dtype, gradient scaler, TF32), the world
(size, rank, backend, strategy), the free memory of the device and the resolved model sources.
Every rule that depends on the machine is written here once ("fp16 needs CUDA", "QLoRA needs
bitsandbytes on CUDA", FSDP's limits, one process per GPU, ...) and reported the way the schema
reports its rules: the keys, where their values were set, what is wrong and the fix. Doctor turns
the problems into its rows; ``train``, ``dry-run`` and the memory check read the resolved object
and stop on the problems that stop a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llavactl.config.loader import LoadedProfile, ProfileProblem
from llavactl.config.schema import QLORA_OFF, QUANTIZATION_OFF, RuleViolation, TrainingConfig
from llavactl.data.source import DataSource, open_source
from llavactl.resolve.facts import MachineFacts, WorldFacts

if TYPE_CHECKING:
    import torch

DeviceType = Literal["cpu", "cuda", "mps"]
Autocast = Literal["bf16", "fp16"]
GIB = 1024**3
MISSING_BACKEND_FIX = "install an official torch wheel (gloo everywhere, nccl in the CUDA builds)"
# The rule on bf16 without AVX512-BF16 or AMX; doctor also says it where bf16 is not asked for.
CPU_BF16_EMULATED = "bf16 on this CPU is emulated (no AVX512-BF16 or AMX): slower than fp32"


def collective_backend(device: str) -> str:
    """The torch.distributed backend that processes training on ``device`` talk over."""
    return "nccl" if device == "cuda" else "gloo"


def missing_backend(backend: str, device: str) -> str:
    return f"this torch build has no `{backend}` backend, which multi-process training on {device} needs."


SHARED_STORE_FIX = "`export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` before torchrun on every node (docs/distributed.md)"


def restart_can_hang(world: WorldFacts) -> str | None:
    """Why a torchrun restart of ``world`` can hang, or None when it cannot.

    torchrun's agents keep the rendezvous store for every restart, and torch puts no restart's
    prefix on the keys a process group writes there (pytorch/pytorch#135712). With one node
    llavactl scopes them by the restart count (:func:`llavactl.train.distributed.restart_safe_store`);
    with several, each agent counts its restarts for itself, so only a store of each restart's own
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) keeps them apart."""
    if world.nodes > 1 and world.max_restarts > 0 and world.agent_store:
        return (
            f"torchrun may restart this run of {world.nodes} nodes (--max-restarts {world.max_restarts}) and keeps one "
            "store for all restarts: a restarted group can hang in init_process_group, reading the addresses of the "
            "processes it replaces (pytorch/pytorch#135712)."
        )
    return None


# The planner's peak is within 20% of measured peaks (benchmarks/memory_estimate.py): an estimate
# closer than this to the free memory is tight, not a fit.
MEMORY_MARGIN = 0.8
Fit = Literal["fits", "tight", "over"]


def memory_fit(peak_bytes: int, free_bytes: int | None) -> Fit | None:
    """Whether an estimated peak fits the free memory with the estimate's margin (``fits``), only
    without it (``tight``), or not at all (``over``); None with no free memory to compare."""
    if free_bytes is None:
        return None
    if peak_bytes <= free_bytes * MEMORY_MARGIN:
        return "fits"
    return "tight" if peak_bytes <= free_bytes else "over"


def fsdp_limits(stage: str, *, fp16: bool) -> list[RuleViolation]:
    """Why ``training.distributed=fsdp`` cannot train this stage and precision (empty: it can).
    Resolution reports them for a world of several processes; the fleet planner weighs FSDP with them."""
    limits = []
    if stage != "full":
        limits.append(
            RuleViolation(
                ("training.distributed", "stage"),
                f"training.distributed `fsdp` shards stage `full` (the whole LLM); this profile trains stage "
                f"`{stage}`, whose few trainable weights DDP handles better.",
                "add `training.distributed=ddp`, or `stage=full`",
            )
        )
    if fp16:
        limits.append(
            RuleViolation(
                ("training.distributed", "training.fp16"),
                "FSDP runs with bf16 or fp32 here, not fp16 (its gradient scaler).",
                "add `training.fp16=false training.bf16=true`, or `training.distributed=ddp`",
            )
        )
    return limits


def autocast_of(training: TrainingConfig) -> Autocast | None:
    """The dtype a step of ``training`` computes in under autocast (None: fp32). The planner traces
    in it and QLoRA computes in it, as the run does."""
    return "bf16" if training.bf16 else "fp16" if training.fp16 else None


@dataclass(frozen=True)
class Precision:
    """How a step computes: autocast to bf16 or fp16 (or none: fp32), a gradient scaler, TF32 matmuls."""

    autocast: Autocast | None = None
    grad_scaler: bool = False
    tf32: bool = False

    @property
    def name(self) -> str:
        base = f"{self.autocast} autocast" if self.autocast else "fp32"
        return base + (" + gradient scaler" if self.grad_scaler else "") + (" + TF32 matmuls" if self.tf32 else "")

    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[self.autocast]

    def autocast_context(self, device_type: str) -> AbstractContextManager[object]:
        import torch

        dtype = self.autocast_dtype()
        return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)

    def grad_scaler_for(self, device_type: str) -> torch.amp.GradScaler | None:
        import torch

        return torch.amp.GradScaler(device_type) if self.grad_scaler else None

    def apply_tf32(self) -> None:
        """Switch TF32 matmuls on or off for this process (CUDA only; a no-op elsewhere)."""
        import torch

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: size 1, no backend)."""

    size: int = 1
    local_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo" for several processes
    strategy: Literal["ddp", "fsdp"] | None = None  # None for one process

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics, ``run.json`` and checkpoints."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


@dataclass(frozen=True)
class ModelSource:
    """Where one of the profile's model sources is: built in, a local folder (or cache entry), or neither."""

    key: str  # the profile key, e.g. "model.vision_tower"
    spec: str
    kind: Literal["builtin", "local", "missing"]
    folder: str | None = None


@dataclass(frozen=True)
class ResolvedProblem:
    """A machine rule that does not hold. ``stops_run``: the run cannot work at all (else it would
    run, but not as the profile means: doctor fails it, ``train --skip-doctor`` goes on)."""

    check: str  # doctor's row, e.g. "training.device"
    problem: ProfileProblem
    stops_run: bool = True


@dataclass(frozen=True)
class ResolvedRun:
    """A profile on this machine, in this process world: what every command reads instead of re-deciding."""

    loaded: LoadedProfile
    facts: MachineFacts
    device_type: DeviceType
    precision: Precision
    world: World
    free_memory_bytes: int | None  # of the device the run uses; None when this machine lacks it
    memory_where: str  # what the free memory is, e.g. "available RAM"
    world_facts: WorldFacts = field(default_factory=WorldFacts)
    sources: tuple[ModelSource, ...] = ()
    problems: tuple[ResolvedProblem, ...] = ()
    # The profile's data, opened on first use by :meth:`data` and kept: what one command reads.
    _data: list[DataSource] = field(default_factory=list, compare=False, repr=False)

    def data(self) -> DataSource:
        """The profile's data (``data.data_path``), opened once for everything the command does with
        it: doctor's data rows, the planner's token counts, the run's dataset and fingerprint.
        Raises :class:`~llavactl.errors.DataError` when it cannot be opened (and again when asked again)."""
        if not self._data:
            profile = self.loaded.profile
            self._data.append(open_source(profile.data, profile.seed))
        return self._data[0]

    @property
    def device(self) -> str:
        """The torch device string of this process: ``cuda:<local rank>`` under torchrun on GPUs."""
        if self.device_type == "cuda" and self.world.distributed:
            return f"cuda:{self.world.local_rank}"
        return self.device_type

    @property
    def backend(self) -> str:
        """The backend several processes on this device talk over (``world.backend`` once they do)."""
        return collective_backend(self.device_type)

    @property
    def device_present(self) -> bool:
        """Whether this machine has the device the profile trains on."""
        if self.device_type == "mps":
            return self.facts.mps
        return self.free_memory_bytes is not None

    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    def problems_for(self, check: str) -> list[ResolvedProblem]:
        return [p for p in self.problems if p.check == check]

    def raise_problems(self) -> None:
        """Stop with one ConfigError listing the problems that stop a run."""
        chosen = [p.problem for p in self.problems if p.stops_run]
        self.loaded.raise_problems(chosen, context=f" on this machine ({self.device_type})")


# ---------------------------------------------------------------------------- resolution


def resolve(loaded: LoadedProfile, facts: MachineFacts | None = None, world: WorldFacts | None = None) -> ResolvedRun:
    """Resolve ``loaded`` against ``facts`` (probed when not given) and ``world`` (torchrun's environment)."""
    from llavactl.resolve.facts import probe, probe_world

    facts = facts or probe()
    world_facts = world or probe_world()
    profile = loaded.profile
    t = profile.training
    problems: list[ResolvedProblem] = []

    def add(check: str, paths: tuple[str, ...], message: str, fix: str, *, stops_run: bool = True) -> None:
        problems.append(ResolvedProblem(check, loaded.problem(RuleViolation(paths, message, fix)), stops_run))

    device = _device(t.device, facts)
    if device == "cuda" and not facts.gpus:
        why = (
            f"torch is a CUDA {facts.torch_cuda_build} build but sees no GPU"
            if facts.torch_cuda_build
            else "torch is a CPU build"
        )
        add(
            "training.device",
            ("training.device",),
            f"the profile trains on CUDA, but this machine has no usable NVIDIA GPU ({why}).",
            "add `training.device=cpu training.bf16=false training.fp16=false training.tf32=false`, "
            "or use `--profile local_lite`",
        )
    if device == "mps" and not facts.mps:
        add(
            "training.device",
            ("training.device",),
            "the profile trains on MPS, which this machine lacks.",
            "add `training.device=cpu`",
        )
    gpu = facts.gpus[min(world_facts.local_rank, len(facts.gpus) - 1)] if device == "cuda" and facts.gpus else None

    # Precision.
    if t.bf16:
        if gpu is not None and not gpu.bf16:
            add(
                "training.bf16",
                ("training.bf16",),
                f"{gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}) has no bf16; it needs sm_80 or newer.",
                "add `training.bf16=false training.fp16=true`",
                stops_run=False,
            )
        elif device == "cpu" and not facts.cpu_native_bf16:
            add(
                "training.bf16",
                ("training.bf16",),
                f"{CPU_BF16_EMULATED}.",
                "add `training.bf16=false`",
                stops_run=False,
            )
        elif device == "mps":
            add(
                "training.bf16",
                ("training.bf16",),
                "bf16 autocast is not supported on MPS here.",
                "add `training.bf16=false`",
            )
    if t.fp16 and device != "cuda":
        add(
            "training.fp16",
            ("training.fp16", "training.device"),
            f"fp16 with a gradient scaler needs CUDA, but the device is `{device}`.",
            "add `training.fp16=false` (fp32), or `training.bf16=true` on a CPU with native bf16",
        )
    if t.tf32 and (gpu is None or not gpu.tf32):
        where = f"{gpu.name} has no TF32 (it needs sm_80 or newer)" if gpu else f"the device is {device}"
        add(
            "training.tf32",
            ("training.tf32",),
            f"TF32 is an NVIDIA Ampere (or newer) feature; {where}.",
            "add `training.tf32=false`",
            stops_run=False,
        )

    # QLoRA.
    model = profile.model
    if model.use_qlora or model.load_in_4bit or model.load_in_8bit:
        overrides = QLORA_OFF if profile.stage == "qlora" else QUANTIZATION_OFF
        fix = f"add `{overrides}` (the CPU guide's overrides)"
        keys = ("stage", "model.use_qlora") if profile.stage == "qlora" else ("model.use_qlora",)
        if device != "cuda" or not facts.gpus:
            where = "this machine has no GPU" if not facts.gpus else f"the profile trains on {device}"
            add("QLoRA / bitsandbytes", keys, f"4/8-bit loading needs bitsandbytes on CUDA; {where}.", fix)
        elif facts.packages.get("bitsandbytes") is None:
            add(
                "QLoRA / bitsandbytes",
                keys,
                "bitsandbytes is not installed.",
                f"`pip install 'llavactl[qlora]'`, or {fix}",
            )
        elif facts.bitsandbytes_error:
            add(
                "QLoRA / bitsandbytes",
                keys,
                f"bitsandbytes does not load: {facts.bitsandbytes_error}",
                f"reinstall bitsandbytes for CUDA {facts.torch_cuda_build}, or {fix}",
            )

    # The world.
    resolved_world = World(world_facts.size, world_facts.local_size, world_facts.rank, world_facts.local_rank)
    if world_facts.size > 1:
        backend = collective_backend(device)
        resolved_world = World(
            world_facts.size, world_facts.local_size, world_facts.rank, world_facts.local_rank, backend, t.distributed
        )
        if device == "cuda" and world_facts.local_size > len(facts.gpus):
            add(
                "world",
                ("training.device",),
                f"{world_facts.local_size} processes on this node but {len(facts.gpus)} CUDA devices: one process "
                "per GPU.",
                f"start `--nproc-per-node {len(facts.gpus)}`" if facts.gpus else "add `training.device=cpu`",
            )
        if backend not in world_facts.backends:
            add(
                "distributed backend",
                ("training.distributed",),
                missing_backend(backend, device),
                MISSING_BACKEND_FIX,
            )
        if t.distributed == "fsdp":
            for v in fsdp_limits(profile.stage, fp16=t.fp16):
                add("world", v.paths, v.message, v.fix)

    precision = Precision(
        autocast=autocast_of(t),
        grad_scaler=t.fp16,
        tf32=t.tf32 and gpu is not None and gpu.tf32,
    )
    if device == "cpu":
        free, where = facts.ram_available_bytes, "available RAM"
    elif gpu is not None:
        free, where = gpu.free_bytes, f"free memory of {gpu.name}"
    elif device == "mps" and facts.mps:
        free, where = None, "MPS, whose free memory torch does not report"
    else:
        free, where = None, f"no {device} device on this machine"
    return ResolvedRun(
        loaded=loaded,
        facts=facts,
        device_type=device,
        precision=precision,
        world=resolved_world,
        free_memory_bytes=free,
        memory_where=where,
        world_facts=world_facts,
        sources=tuple(_model_sources(loaded)),
        problems=tuple(problems),
    )


def _device(requested: str, facts: MachineFacts) -> DeviceType:
    """The device `auto` means on this machine: CUDA, then MPS, then the CPU."""
    if requested != "auto":
        return requested  # type: ignore[return-value]  # the schema allows only the three
    return "cuda" if facts.gpus else "mps" if facts.mps else "cpu"


def _model_sources(loaded: LoadedProfile) -> Iterator[ModelSource]:
    """Where the tower, the LLM and the tokenizer are, without downloading anything."""
    from llavactl.model.hub import find_local

    model = loaded.profile.model
    specs = [("model.vision_tower", model.vision_tower), ("model.model_name_or_path", model.model_name_or_path)]
    if model.tokenizer_name_or_path:
        specs.append(("model.tokenizer_name_or_path", model.tokenizer_name_or_path))
    for key, spec in specs:
        if spec.startswith("builtin:"):
            yield ModelSource(key, spec, "builtin")
            continue
        folder = find_local(spec)
        yield ModelSource(key, spec, "local" if folder else "missing", str(folder) if folder else None)
