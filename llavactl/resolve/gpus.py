"""The GPUs a run can be planned for without one at hand: memory, dense peak rates, links, efficiency.

`llavactl dry-run --gpu NAME` looks a name up here leniently (``a100-80gb``, ``A100 80GB``,
``h100``); ``--gpu-spec`` describes a GPU the table lacks. Every rate is the datasheet's *dense*
figure (NVIDIA prints the tensor rates with 2:4 sparsity, twice the dense ones, and marks them with
an asterisk: those are halved here). Links are per direction: datasheets give NVLink and PCIe as
the sum of both directions, and a ring collective sends one way on each link at a time.

The planning efficiency (the share of the peak a step's counted FLOPs run at) is not measured
here, where there is no GPU: it is the published model-FLOPs utilisation of comparable runs, per
GPU generation (:data:`EFFICIENCY`). It is deliberately not fitted to LLaVA's own training times,
which docs/dry-run.md keeps as the planner's independent check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llavactl.errors import ConfigError

if TYPE_CHECKING:
    from llavactl.resolve.run import Precision

GIB = 1024**3
TERA = 1e12
Generation = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell", "custom"]

# (efficiency, source). Model FLOPs utilisation excludes recomputation while the planner's FLOPs
# include it, so under gradient checkpointing the planned time errs long, by up to a third.
EFFICIENCY: dict[Generation, tuple[float, str]] = {
    "ampere": (
        0.56,
        "torchtitan docs/performance.md: Llama 3 8B, FSDP2 on 64 A100-80GB, 56.3% MFU (selective activation "
        "checkpointing, local batch 1)",
    ),
    "hopper": (
        0.33,
        "torchtitan docs/performance.md: Llama 3.1 8B, FSDP on 8 H100, 5,762 tokens/s/GPU without torch.compile, "
        "33% MFU",
    ),
    "blackwell": (
        0.33,
        "no published run of this kind at hand: Hopper's figure (torchtitan, Llama 3.1 8B on 8 H100, 33% MFU)",
    ),
    "ada": (
        0.30,
        "no published run of this kind at hand: Megatron-LM's single-GPU figure (Shoeybi et al. 2019, "
        "arXiv:1909.08053: 39 TFLOP/s on a V100, 30% of peak), the lowest cited here",
    ),
    "turing": (
        0.30,
        "no published run of this kind at hand: Megatron-LM's single-GPU figure (Shoeybi et al. 2019, "
        "arXiv:1909.08053: 39 TFLOP/s on a V100, 30% of peak), the lowest cited here",
    ),
    "volta": (
        0.30,
        "Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053): a single V100 sustains 39 TFLOP/s, 30% of peak",
    ),
}


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: memory, dense peak FLOP/s per precision, the link to its node's other GPUs."""

    key: str  # the table's name, e.g. "a100-80gb"
    name: str  # as the vendor spells it
    memory_bytes: int
    bf16: float | None  # dense FLOP/s; None: no bf16 tensor cores
    fp16: float
    tf32: float | None  # None: no TF32
    fp32: float  # without tensor cores
    link_bytes_per_s: float  # to another GPU of the node, one direction
    link: str  # what that link is
    capability: tuple[int, int]  # CUDA compute capability (what doctor's bf16/TF32 rules read)
    generation: Generation
    aliases: tuple[str, ...] = ()
    efficiency_override: float | None = None  # a --gpu-spec's own figure

    @property
    def efficiency(self) -> float:
        if self.efficiency_override is not None:
            return self.efficiency_override
        return EFFICIENCY[self.generation][0] if self.generation != "custom" else EFFICIENCY["volta"][0]

    @property
    def efficiency_source(self) -> str:
        if self.efficiency_override is not None:
            return "given with --gpu-spec"
        generation = "volta" if self.generation == "custom" else self.generation
        return EFFICIENCY[generation][1]

    def peak(self, precision: Precision) -> tuple[float, str]:
        """Dense peak FLOP/s of the matmuls of a step in ``precision``, and which rate it is. A
        precision the GPU lacks (bf16 on a T4) falls back to fp32, as the planner's note says."""
        if precision.autocast == "bf16" and self.bf16 is not None:
            return self.bf16, "bf16"
        if precision.autocast == "fp16":
            return self.fp16, "fp16"
        if precision.tf32 and self.tf32 is not None:
            return self.tf32, "tf32"
        return self.fp32, "fp32"


def _gpu(
    key: str,
    name: str,
    memory_gib: float,
    bf16: float | None,
    fp16: float,
    tf32: float | None,
    fp32: float,
    link_gb_per_s: float,
    link: str,
    capability: tuple[int, int],
    generation: Generation,
    *aliases: str,
) -> GpuSpec:
    """A table row in the datasheets' units: GiB, dense TFLOP/s, GB/s one way."""
    return GpuSpec(
        key,
        name,
        int(memory_gib * GIB),
        None if bf16 is None else bf16 * TERA,
        fp16 * TERA,
        None if tf32 is None else tf32 * TERA,
        fp32 * TERA,
        link_gb_per_s * 1e9,
        link,
        capability,
        generation,
        aliases,
    )


# Memory as the datasheet names it, taken as GiB (an "80GB" A100 reports 80 GiB to torch). Rates dense.
# One GPU a line, as a table reads.
# fmt: off
GPUS: tuple[GpuSpec, ...] = (
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf,
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
    # SXM, BF16/FP16 312 (624 sparse), TF32 156 (312 sparse), FP32 19.5 TFLOPS; NVLink 600 GB/s.
    _gpu("a100-40gb", "A100 SXM 40GB", 40, 312, 312, 156, 19.5, 300, "NVLink 3 (600 GB/s both ways)", (8, 0), "ampere"),
    _gpu("a100-80gb", "A100 SXM 80GB", 80, 312, 312, 156, 19.5, 300, "NVLink 3 (600 GB/s both ways)", (8, 0), "ampere"),
    # NVIDIA H100 Tensor Core GPU datasheet (https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet):
    # SXM: BF16/FP16 1,979 sparse (989.5 dense), TF32 989 sparse (494.5), FP32 67 TFLOPS, NVLink 900 GB/s;
    # PCIe: BF16/FP16 1,513 sparse (756.5), TF32 756 sparse (378), FP32 51 TFLOPS, PCIe Gen5 128 GB/s
    # (its NVLink bridge joins pairs only, so an 8-GPU ring runs over PCIe).
    _gpu("h100-sxm", "H100 SXM 80GB", 80, 989.5, 989.5, 494.5, 67, 450, "NVLink 4 (900 GB/s both ways)", (9, 0), "hopper", "h100", "h10080gb"),  # noqa: E501
    _gpu("h100-pcie", "H100 PCIe 80GB", 80, 756.5, 756.5, 378, 51, 64, "PCIe Gen5 x16 (128 GB/s both ways)", (9, 0), "hopper"),  # noqa: E501
    # NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/): SXM 141 GB,
    # BF16/FP16 1,979 sparse (989.5 dense), TF32 989 sparse (494.5), FP32 67 TFLOPS, NVLink 900 GB/s.
    _gpu("h200", "H200 SXM 141GB", 141, 989.5, 989.5, 494.5, 67, 450, "NVLink 4 (900 GB/s both ways)", (9, 0), "hopper", "h200sxm"),  # noqa: E501
    # NVIDIA HGX B200 specifications (https://www.nvidia.com/en-us/data-center/hgx/), eight GPUs: FP16/BF16
    # 36 PFLOPS sparse, TF32 18 PFLOPS sparse, FP32 600 TFLOPS, 1.4 TB memory, NVLink 5 1.8 TB/s per GPU;
    # per GPU dense: 2,250 and 1,125 TFLOPS, 75 TFLOPS FP32, 180 GB.
    _gpu("b200", "B200 180GB", 180, 2250, 2250, 1125, 75, 900, "NVLink 5 (1.8 TB/s both ways)", (10, 0), "blackwell"),
    # NVIDIA L40S datasheet (https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413): 48 GB, BF16/FP16
    # 362.05 (733 sparse), TF32 183 (366 sparse), FP32 91.6 TFLOPS; PCIe Gen4 x16 64 GB/s, no NVLink.
    _gpu("l40s", "L40S 48GB", 48, 362.05, 362.05, 183, 91.6, 32, "PCIe Gen4 x16 (64 GB/s both ways)", (8, 9), "ada"),
    # NVIDIA L4 datasheet (https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet): 24 GB,
    # BF16/FP16 242 sparse (121 dense), TF32 120 sparse (60), FP32 30.3 TFLOPS; PCIe Gen4 x16 64 GB/s.
    _gpu("l4", "L4 24GB", 24, 121, 121, 60, 30.3, 32, "PCIe Gen4 x16 (64 GB/s both ways)", (8, 9), "ada"),
    # No NVIDIA datasheet for the A10G (AWS EC2 G5's variant of the A10): the NVIDIA A10 datasheet's figures
    # (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf): 24 GB,
    # BF16/FP16 125 (250 sparse), TF32 62.5 (125 sparse), FP32 31.2 TFLOPS; PCIe Gen4 64 GB/s.
    _gpu("a10g", "A10G 24GB", 24, 125, 125, 62.5, 31.2, 32, "PCIe Gen4 x16 (64 GB/s both ways)", (8, 6), "ampere", "a10"),  # noqa: E501
    # NVIDIA Ada GPU architecture whitepaper v2.1, appendix A
    # (https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf): RTX 4090,
    # BF16/FP16 with FP32 accumulate 165.2 (330.4 sparse), TF32 82.6 (165.2 sparse), FP32 82.6 TFLOPS; 24 GB;
    # no NVLink, PCIe Gen4 x16.
    _gpu("rtx4090", "GeForce RTX 4090 24GB", 24, 165.2, 165.2, 82.6, 82.6, 32, "PCIe Gen4 x16 (64 GB/s both ways)", (8, 9), "ada", "4090"),  # noqa: E501
    # NVIDIA T4 datasheet (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf):
    # 16 GB, mixed-precision FP16/FP32 65 TFLOPS, FP32 8.1 TFLOPS, no bf16 or TF32; PCIe Gen3 x16 32 GB/s.
    _gpu("t4", "T4 16GB", 16, None, 65, None, 8.1, 16, "PCIe Gen3 x16 (32 GB/s both ways)", (7, 5), "turing"),
    # NVIDIA V100 datasheet (https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf):
    # SXM2 32 GB, tensor (FP16) 125 TFLOPS, FP32 15.7 TFLOPS, no bf16 or TF32; NVLink 300 GB/s.
    _gpu("v100", "V100 SXM2 32GB", 32, None, 125, None, 15.7, 150, "NVLink 2 (300 GB/s both ways)", (7, 0), "volta", "v10032gb"),  # noqa: E501
)
# fmt: on


def _normal(name: str) -> str:
    """A name without case, punctuation, vendor words or form-factor words that do not tell GPUs apart."""
    text = re.sub(r"[^a-z0-9]", "", name.lower())
    for word in ("nvidia", "tesla", "geforce", "sxm5", "sxm4", "sxm2", "sxm"):
        text = text.replace(word, "")
    return text


def known_names() -> str:
    return ", ".join(g.key for g in GPUS)


def find_gpu(name: str) -> GpuSpec:
    """The table's GPU that ``name`` means, matched without case, spaces or punctuation (``A100 80GB``,
    ``a100-80gb``, ``h100``); a name that is a prefix of one GPU alone means it too."""
    wanted = _normal(name)
    for gpu in GPUS:
        if wanted in {_normal(n) for n in (gpu.key, gpu.name, *gpu.aliases)}:
            return gpu
    starting = [g for g in GPUS if wanted and _normal(g.key).startswith(wanted)]
    if len(starting) == 1:
        return starting[0]
    which = f"`{name}` could be {', '.join(g.key for g in starting)}" if starting else f"no GPU is called `{name}`"
    raise ConfigError(
        f"--gpu: {which}. The GPUs the planner knows: {known_names()}.",
        fix="name one of them, or describe the GPU with --gpu-spec (docs/dry-run.md)",
    )


def gpu_of_device(device_name: str) -> GpuSpec | None:
    """The table's GPU that torch's device name is (``NVIDIA A100-SXM4-80GB``, ``NVIDIA H100 80GB
    HBM3``, ``Tesla T4``): its name without vendor and form-factor words, exactly one of the table's
    names, else the longest of them it starts with; None for a GPU the table lacks."""
    wanted = _normal(device_name)
    names = [(_normal(n), gpu) for gpu in GPUS for n in (gpu.key, gpu.name, *gpu.aliases)]
    exact = [gpu for n, gpu in names if n == wanted]
    if exact:
        return exact[0]
    starting = sorted(((len(n), gpu) for n, gpu in names if n and wanted.startswith(n)), key=lambda x: -x[0])
    return starting[0][1] if starting else None


class CustomGpu(BaseModel):
    """A GPU the table lacks, as `--gpu-spec` gives it (``key=value,...`` or a YAML file)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="custom", description="What the plan calls it.")
    memory_gib: float = Field(gt=0, description="Memory per GPU, GiB.")
    bf16_tflops: float | None = Field(default=None, gt=0, description="Dense bf16 tensor rate (null: no bf16).")
    fp16_tflops: float | None = Field(default=None, gt=0, description="Dense fp16 tensor rate (default: bf16's).")
    tf32_tflops: float | None = Field(default=None, gt=0, description="Dense TF32 rate (null: no TF32).")
    fp32_tflops: float | None = Field(default=None, gt=0, description="FP32 rate without tensor cores.")
    link_gbps: float = Field(gt=0, description="GB/s to another GPU of the node, one direction.")
    efficiency: float | None = Field(default=None, gt=0, le=1, description="Planning efficiency (default 0.30).")


def custom_gpu(text: str) -> GpuSpec:
    """The GPU of a ``--gpu-spec``: ``memory_gib=192,bf16_tflops=1307,tf32_tflops=653,link_gbps=448``
    or the path of a YAML file with those keys."""
    import yaml

    path = Path(text)
    try:
        if path.suffix in (".yaml", ".yml") or path.is_file():
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            raw = dict(word.split("=", 1) for word in text.split(",") if word.strip())
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(
            f"--gpu-spec {text!r} is neither `key=value,...` nor a readable YAML file ({exc}).",
            fix="e.g. `--gpu-spec memory_gib=192,bf16_tflops=1307,tf32_tflops=653,link_gbps=448`",
        ) from exc
    try:
        spec = CustomGpu.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(the spec)"
        raise ConfigError(
            f"--gpu-spec: `{key}`: {first['msg']} (keys: {', '.join(CustomGpu.model_fields)}).",
            fix="give memory_gib and link_gbps, and the dense rates the GPU has (docs/dry-run.md)",
        ) from exc
    half = spec.fp16_tflops or spec.bf16_tflops
    if half is None and spec.fp32_tflops is None:
        raise ConfigError(
            "--gpu-spec gives no rate: the plan needs at least one of bf16_tflops, fp16_tflops, fp32_tflops.",
            fix="add the datasheet's dense rates, e.g. `bf16_tflops=312,tf32_tflops=156`",
        )
    fp32 = spec.fp32_tflops or (spec.tf32_tflops or half or 0) / 8
    gpu = _gpu(
        spec.name,
        spec.name,
        spec.memory_gib,
        spec.bf16_tflops,
        half or fp32,
        spec.tf32_tflops,
        fp32,
        spec.link_gbps,
        f"{spec.link_gbps:g} GB/s one way (--gpu-spec)",
        (8, 0) if spec.bf16_tflops else (7, 0),
        "custom",
    )
    return replace(gpu, efficiency_override=spec.efficiency)
