"""Checks of a profile against this machine: device and precision, QLoRA, data, model sources, wandb."""

from __future__ import annotations

import os
from pathlib import Path

from llavactl.config.schema import DataConfig, ModelConfig, Profile, TrainingConfig
from llavactl.doctor.facts import MachineFacts
from llavactl.doctor.results import CheckResult, failed, passed, warned
from llavactl.errors import DataError

# The CPU guide's overrides that turn every quantized path off.
NO_QUANTIZATION = "model.use_qlora=false model.load_in_4bit=false model.load_in_8bit=false"
_FIRST_RECORDS = 100


def resolve_device(requested: str, facts: MachineFacts) -> str:
    """The device `auto` means on this machine (CUDA, then MPS, then CPU)."""
    if requested != "auto":
        return requested
    return "cuda" if facts.gpus else "mps" if facts.mps else "cpu"


def device_choice_check(training: TrainingConfig, facts: MachineFacts) -> CheckResult:
    device = resolve_device(training.device, facts)
    if device == "cuda" and not facts.gpus:
        return failed(
            "training.device",
            "the profile trains on CUDA but this machine has no usable NVIDIA GPU.",
            "add `training.device=cpu training.bf16=false training.fp16=false training.tf32=false`"
            + ", or use `--profile local_lite`",
        )
    if device == "mps" and not facts.mps:
        return failed(
            "training.device", "the profile trains on MPS, which this machine lacks.", "add `training.device=cpu`"
        )
    return passed("training.device", f"{training.device} -> {device}")


def precision_checks(training: TrainingConfig, facts: MachineFacts) -> list[CheckResult]:
    device = resolve_device(training.device, facts)
    gpu = facts.gpus[0] if facts.gpus and device == "cuda" else None
    results = []
    if training.bf16:
        if gpu is not None and not gpu.bf16:
            results.append(
                failed(
                    "training.bf16",
                    f"{gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}) has no bf16; it needs sm_80 or newer.",
                    "add `training.bf16=false training.fp16=true`",
                )
            )
        elif device == "cpu" and not facts.cpu_native_bf16:
            results.append(
                failed(
                    "training.bf16",
                    "bf16 on this CPU is emulated (no AVX512-BF16 or AMX): slower than fp32.",
                    "add `training.bf16=false`",
                )
            )
        elif device == "cpu":
            results.append(passed("training.bf16", f"CPU autocast to bf16 on native {facts.cpu_bf16_isa}"))
        elif device == "mps":
            results.append(
                failed("training.bf16", "bf16 autocast is not supported on MPS here.", "add `training.bf16=false`")
            )
        else:
            results.append(passed("training.bf16", "bf16 autocast on CUDA"))
    elif device == "cpu" and facts.cpu_native_bf16:
        results.append(
            passed(
                "training.bf16",
                "fp32",
                hint=f"this CPU has native bf16 ({facts.cpu_bf16_isa}): `training.bf16=true` may run faster",
            )
        )
    if training.fp16 and device != "cuda":
        results.append(
            failed(
                "training.fp16", f"fp16 with a gradient scaler needs CUDA, not {device}.", "add `training.fp16=false`"
            )
        )
    if training.tf32:
        if gpu is None:
            results.append(
                failed(
                    "training.tf32",
                    f"TF32 is an NVIDIA GPU feature; the device is {device}.",
                    "add `training.tf32=false`",
                )
            )
        elif not gpu.tf32:
            results.append(
                failed("training.tf32", f"{gpu.name} has no TF32 (needs sm_80 or newer).", "add `training.tf32=false`")
            )
    if not results:
        results.append(passed("precision", "fp32"))
    return results


def quantization_check(profile: Profile, facts: MachineFacts) -> CheckResult:
    model = profile.model
    if not (model.use_qlora or model.load_in_4bit or model.load_in_8bit):
        return passed("QLoRA / bitsandbytes", "not used")
    overrides = f"stage=lora {NO_QUANTIZATION}" if profile.stage == "qlora" else NO_QUANTIZATION
    fix = f"add `{overrides}` (the CPU guide's overrides)"
    device = resolve_device(profile.training.device, facts)
    if not facts.gpus:
        return failed(
            "QLoRA / bitsandbytes", "4/8-bit loading needs bitsandbytes on CUDA; this machine has no GPU.", fix
        )
    if device != "cuda":
        return failed("QLoRA / bitsandbytes", f"4/8-bit loading needs CUDA; the profile trains on {device}.", fix)
    if facts.packages.get("bitsandbytes") is None:
        return failed(
            "QLoRA / bitsandbytes", "bitsandbytes is not installed.", f"`pip install 'llavactl[qlora]'`, or {fix}"
        )
    if facts.bitsandbytes_error:
        return failed(
            "QLoRA / bitsandbytes",
            f"bitsandbytes does not load: {facts.bitsandbytes_error}",
            f"reinstall bitsandbytes for CUDA {facts.torch_cuda_build}, or {fix}",
        )
    return passed("QLoRA / bitsandbytes", f"bitsandbytes {facts.packages['bitsandbytes']} on CUDA")


def data_checks(data: DataConfig, seed: int) -> list[CheckResult]:
    from llavactl.data.records import Problem, iter_records, read_raw_records
    from llavactl.data.sources import resolve_data_source

    if data.data_path.startswith("builtin:"):
        return [passed("data", f"{data.data_path}: built-in synthetic data, made on first use")]
    try:
        path, folder = resolve_data_source(data.data_path, data.image_folder, seed)
        raws, file_problems = read_raw_records(path)
    except DataError as exc:
        return [failed("data", exc.message, exc.fix or "fix the data file")]
    if file_problems:
        first = file_problems[0]
        return [failed("data records", first.message, f"`llavactl data check` on {path} lists every problem")]
    problems, missing, checked, images = [], [], 0, 0
    for raw, parsed in iter_records(raws[:_FIRST_RECORDS]):
        checked += 1
        if isinstance(parsed, Problem):
            problems.append(f"record {raw.index}: {parsed.code}")
            continue
        for image in parsed.images:
            images += 1
            image_path = folder / image
            if not image_path.is_file():
                missing.append(str(image_path))
    # With `data.on_error: skip` the user has chosen to train past bad records: a few are a
    # warning. When none of the first records is usable, the cause is more likely a wrong path.
    skip = data.on_error == "skip"
    if problems:
        finding = f"{len(problems)} of the first {checked} records are bad ({', '.join(problems[:3])})"
        fix = "`llavactl data check --profile ...` lists every problem"
        if skip and len(problems) < checked:
            return [warned("data records", f"{finding}; data.on_error: skip will skip them", fix)]
        return [failed("data records", finding, fix)]
    if missing:
        finding = f"{len(missing)} images of the first {checked} records are missing, e.g. {missing[0]}"
        fix = "fix `data.image_folder`, or run `llavactl data check` for the full list"
        if skip and len(missing) < images:
            return [warned("data images", f"{finding}; data.on_error: skip will skip their records", fix)]
        return [failed("data images", finding, fix)]
    return [
        passed("data records", f"{len(raws)} records in {path.name}; the first {checked} parse, their images exist")
    ]


def _source_check(field: str, spec: str, *, offline: bool, needs_weights: bool, torch_safe: bool) -> CheckResult:
    from llavactl.model.hub import cache_dir, find_local, is_hub_id
    from llavactl.model.weight_files import find_weights

    if spec.startswith("builtin:"):
        return passed(field, f"{spec}: built into llavactl")
    folder = find_local(spec)
    if folder is None:
        if not is_hub_id(spec):
            return failed(field, f"`{spec}` is neither a folder nor a hub id.", f"add `{field}=/path/to/model/folder`")
        where = f"not in the Hugging Face cache ({cache_dir()})"
        how = f"`hf download {spec}` (on a machine with internet, then copy the cache), or `{field}=/path/to/folder`"
        if offline:
            return failed(field, f"`{spec}` is {where}, and this run is offline.", how)
        return warned(field, f"`{spec}` is {where}; `llavactl train` will download it.", how)
    if not needs_weights:
        return passed(field, f"{spec}: {folder}")
    weights = find_weights(folder)
    if not weights:
        return failed(
            field, f"{folder} holds no weight files.", f"`hf download {spec}`, or point `{field}` at a complete folder"
        )
    if all(w.suffix == ".safetensors" for w in weights):
        return passed(field, f"{spec}: safetensors ({len(weights)} file{'s' if len(weights) > 1 else ''})")
    if torch_safe:
        return warned(
            field,
            f"{spec}: pickle `.bin` weights only; loaded with torch.load(weights_only=True).",
            "prefer a safetensors copy (e.g. `model.vision_tower=jeromeku/clip-vit-large-patch14-336_safe`)",
        )
    return failed(
        field,
        f"{spec}: pickle `.bin` weights only, and torch < 2.6 cannot load them safely (`ValueError: torch.load`).",
        "upgrade torch (`pip install -r requirements_cpu.txt`), or use a safetensors copy of the model",
    )


def model_source_checks(model: ModelConfig, facts: MachineFacts, *, offline: bool) -> list[CheckResult]:
    from packaging.version import Version

    torch_safe = facts.packages.get("torch") is not None and Version(facts.packages["torch"]).release[:2] >= (2, 6)
    kwargs = {"offline": offline, "torch_safe": torch_safe}
    results = [
        _source_check("model.vision_tower", model.vision_tower, needs_weights=True, **kwargs),
        _source_check("model.model_name_or_path", model.model_name_or_path, needs_weights=True, **kwargs),
    ]
    if model.tokenizer_name_or_path:
        results.append(
            _source_check("model.tokenizer_name_or_path", model.tokenizer_name_or_path, needs_weights=False, **kwargs)
        )
    if model.pretrain_mm_mlp_adapter:
        path = Path(model.pretrain_mm_mlp_adapter).expanduser()
        if path.exists():
            results.append(passed("model.pretrain_mm_mlp_adapter", f"{path}"))
        else:
            results.append(
                failed(
                    "model.pretrain_mm_mlp_adapter",
                    f"{path} does not exist; stage 2 starts from the stage-1 projector.",
                    "run the `pretrain` profile first, or add `model.pretrain_mm_mlp_adapter=PATH` (or `=null`)",
                )
            )
    return results


def wandb_check(training: TrainingConfig, facts: MachineFacts) -> CheckResult | None:
    if "wandb" not in training.report_to:
        return None
    off = "add `training.report_to=none`"
    if facts.packages.get("wandb") is None:
        return warned(
            "wandb", "report_to asks for wandb, which is not installed.", f"`pip install 'llavactl[wandb]'`, or {off}"
        )
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled"):
        return passed("wandb", f"WANDB_MODE={mode}")
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "wandb" in netrc.read_text())
    if not logged_in:
        return warned(
            "wandb", "wandb is installed but not logged in.", f"`wandb login`, `WANDB_MODE=offline`, or {off}"
        )
    return passed("wandb", f"wandb {facts.packages['wandb']}, logged in")


def profile_checks(profile: Profile, facts: MachineFacts, *, offline: bool) -> list[CheckResult]:
    results = [device_choice_check(profile.training, facts)]
    results += precision_checks(profile.training, facts)
    results.append(quantization_check(profile, facts))
    results += data_checks(profile.data, profile.seed)
    results += model_source_checks(profile.model, facts, offline=offline)
    wandb = wandb_check(profile.training, facts)
    if wandb is not None:
        results.append(wandb)
    return results
