"""Checks of the machine alone: Python, package versions, torch.load safety, device, RAM, disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from packaging.version import InvalidVersion, Version

from llavactl.doctor.results import CheckResult, failed, passed, skipped, warned
from llavactl.resolve.facts import MachineFacts

GIB = 1024**3

# Supported ranges: the lower bounds of pyproject.toml, the upper bound the next major release.
SUPPORTED = {
    "torch": ("2.6", "3"),
    "transformers": ("5.24", "6"),
    "peft": ("0.13", "1"),
    "safetensors": ("0.4.3", "1"),
    "pillow": ("10.0", "14"),
}


def python_check(facts: MachineFacts) -> CheckResult:
    version = ".".join(map(str, facts.python))
    if facts.python[:2] < (3, 10):
        return failed("python", f"Python {version}; llavactl needs 3.10 or newer.", "install Python 3.10+")
    return passed("python", f"Python {version}")


def package_checks(facts: MachineFacts) -> list[CheckResult]:
    results = []
    for name, (low, high) in SUPPORTED.items():
        installed = facts.packages.get(name)
        check = f"package {name}"
        if installed is None:
            results.append(failed(check, f"{name} is not installed.", "pip install -r requirements_cpu.txt"))
            continue
        try:
            version = Version(installed)
        except InvalidVersion:
            results.append(
                warned(check, f"{name} {installed}: version not understood.", f"pip install '{name}>={low}'")
            )
            continue
        if version < Version(low):
            results.append(failed(check, f"{name} {installed} is older than {low}.", f"pip install -U '{name}>={low}'"))
        elif version >= Version(high):
            results.append(
                warned(check, f"{name} {installed} is newer than tested (< {high}).", f"pip install '{name}<{high}'")
            )
        else:
            results.append(passed(check, f"{name} {installed}"))
    return results


def torch_load_check(facts: MachineFacts) -> CheckResult:
    torch_version = facts.packages.get("torch")
    if torch_version is None:
        return skipped("torch.load safety", "torch is not installed")
    if Version(torch_version).release[:2] >= (2, 6):
        return passed("torch.load safety", f"torch {torch_version} loads pickle `.bin` weights with weights_only=True")
    return failed(
        "torch.load safety",
        f"torch {torch_version} < 2.6: loading any pickle `.bin` weights stops with transformers' "
        "`ValueError: ... torch.load ...` (CVE-2025-32434).",
        "upgrade torch (`pip install -r requirements_cpu.txt` pins 2.13.0), or use safetensors weights, "
        "e.g. `model.vision_tower=jeromeku/clip-vit-large-patch14-336_safe`",
    )


def device_check(facts: MachineFacts) -> CheckResult:
    if facts.gpus:
        rows = "; ".join(
            f"cuda:{i} {g.name}, {g.total_bytes / GIB:.1f} GiB ({g.free_bytes / GIB:.1f} free), "
            f"sm_{g.capability[0]}{g.capability[1]}, bf16 {'yes' if g.bf16 else 'no'}"
            for i, g in enumerate(facts.gpus)
        )
        return passed("device", f"CUDA {facts.torch_cuda_build}: {rows}")
    if facts.mps:
        return passed("device", "Apple MPS")
    bf16 = f", native bf16 ({facts.cpu_bf16_isa})" if facts.cpu_native_bf16 else ", no native bf16"
    return passed(
        "device",
        f"CPU: {facts.cpu_cores} cores, torch uses {facts.torch_threads} threads, kernels {facts.cpu_capability}{bf16}",
    )


def cuda_build_check(facts: MachineFacts) -> CheckResult:
    if facts.torch_cuda_build and not facts.gpus:
        return warned(
            "torch build",
            f"torch is a CUDA {facts.torch_cuda_build} build but this machine has no usable NVIDIA GPU: "
            "several GB of CUDA libraries for nothing.",
            "in a fresh venv: `pip install -r requirements_cpu.txt` (torch==2.13.0, the CPU build)",
        )
    kind = f"CUDA {facts.torch_cuda_build}" if facts.torch_cuda_build else "CPU"
    return passed("torch build", f"{kind} build")


def ram_check(facts: MachineFacts) -> CheckResult:
    finding = f"{facts.ram_available_bytes / GIB:.1f} GiB available of {facts.ram_total_bytes / GIB:.1f} GiB"
    if facts.ram_available_bytes < 4 * GIB:
        return warned(
            "RAM", finding + "; local_lite needs about 4 GiB.", "close other programs, or use `--profile tiny`"
        )
    return passed("RAM", finding)


def disk_check(output_dir: str | None) -> CheckResult:
    target = Path(output_dir or ".").expanduser().absolute()
    try:
        existing = next(p for p in (target, *target.parents) if p.exists())
        free = shutil.disk_usage(existing).free
    except OSError as exc:  # a name too long for the file system, a folder we may not look into
        return failed(
            "disk",
            f"training.output_dir `{target}` cannot be looked at: {exc.strerror or exc}.",
            "set `training.output_dir=PATH` to a folder you can write to",
        )
    if not existing.is_dir():
        return failed(
            "disk",
            f"training.output_dir `{target}` cannot be a folder: `{existing}` is a file.",
            "set `training.output_dir=PATH` to a folder (new, or one of yours)",
        )
    finding = f"{free / GIB:.1f} GiB free under {existing}"
    if free < 5 * GIB:
        return warned("disk", finding + "; checkpoints may not fit.", "free space, or set `training.output_dir=PATH`")
    return passed("disk", finding)


def environment_checks(facts: MachineFacts, output_dir: str | None) -> list[CheckResult]:
    return [
        python_check(facts),
        *package_checks(facts),
        torch_load_check(facts),
        device_check(facts),
        cuda_build_check(facts),
        ram_check(facts),
        disk_check(output_dir),
    ]
