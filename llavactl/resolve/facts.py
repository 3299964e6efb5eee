"""Facts about this machine and process world that a profile is resolved against.

Packages, devices, CPU features, memory, and the world torchrun describes. Gathering (which
imports torch) is kept apart from judging, so that tests can hand :func:`llavactl.resolve.resolve`
and doctor's checks any machine they like: a T4 without bf16, a CPU with AMX, a CUDA build without
a GPU, eight processes on four GPUs.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "safetensors", "pillow", "bitsandbytes", "wandb")


@dataclass(frozen=True)
class GpuFacts:
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def tf32(self) -> bool:
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class MachineFacts:
    python: tuple[int, int, int]
    packages: dict[str, str | None]
    torch_cuda_build: str | None  # the CUDA version torch was built with, None for a CPU build
    gpus: list[GpuFacts] = field(default_factory=list)
    mps: bool = False
    cpu_cores: int = 1
    torch_threads: int = 1
    cpu_capability: str = "unknown"  # torch's kernel level: DEFAULT, AVX2, AVX512, ...
    cpu_flags: frozenset[str] = frozenset()
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    bitsandbytes_error: str | None = None  # why bitsandbytes does not import, if installed

    @property
    def cpu_native_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    @property
    def cpu_bf16_isa(self) -> str | None:
        if "amx_bf16" in self.cpu_flags:
            return "AMX-BF16"
        return "AVX512-BF16" if "avx512_bf16" in self.cpu_flags else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _meminfo() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _bitsandbytes_error() -> str | None:
    if _version("bitsandbytes") is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # bitsandbytes raises many kinds when it cannot find CUDA
        return f"{type(exc).__name__}: {exc}"
    return None


def probe() -> MachineFacts:
    """Read this machine's facts (imports torch)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(GpuFacts(props.name, total, free, (props.major, props.minor)))
    total, available = _meminfo()
    return MachineFacts(
        python=tuple(sys.version_info[:3]),  # type: ignore[arg-type]
        packages={name: _version(name) for name in PACKAGES},
        torch_cuda_build=torch.version.cuda,
        gpus=gpus,
        mps=bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        cpu_cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        cpu_capability=f"{torch.backends.cpu.get_cpu_capability()} ({platform.machine()})",
        cpu_flags=_cpu_flags(),
        ram_total_bytes=total,
        ram_available_bytes=available,
        bitsandbytes_error=_bitsandbytes_error(),
    )


@dataclass(frozen=True)
class WorldFacts:
    """The world torchrun describes in the environment (one process outside it)."""

    size: int = 1  # processes in all (WORLD_SIZE)
    local_size: int = 1  # processes on this node (LOCAL_WORLD_SIZE)
    backends: frozenset[str] = frozenset({"gloo"})  # torch.distributed backends this torch build has
    rank: int = 0
    local_rank: int = 0
    # torchrun's restarts: its agents (one per node, GROUP_WORLD_SIZE), the restarts allowed
    # (TORCHELASTIC_MAX_RESTARTS), and whether the workers use the agents' rendezvous store
    # (TORCHELASTIC_USE_AGENT_STORE) for every restart.
    nodes: int = 1
    max_restarts: int = 0
    agent_store: bool = False


def probe_world() -> WorldFacts:
    """The world of this process, from torchrun's variables, and the backends torch has (imports torch)."""
    import torch.distributed as dist

    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    backends = frozenset(b for b in ("gloo", "nccl") if dist.is_available() and dist.is_backend_available(b))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    return WorldFacts(
        size,
        local,
        backends,
        rank,
        local_rank,
        nodes=int(env.get("GROUP_WORLD_SIZE", "1")),
        max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )
