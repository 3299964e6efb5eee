"""Checks of a profile against this machine: device and precision, QLoRA, data, model sources, wandb.

The machine rules (device, precision, QLoRA) are the resolution's (:mod:`llavactl.resolve`): their
problems become failed rows here; what passes is described from the resolved run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from llavactl.config.schema import DataConfig, TrainingConfig
from llavactl.data.template_fit import TEMPLATE_SAMPLE, first_difference, template_fit
from llavactl.data.templates import turn_template
from llavactl.doctor.results import CheckResult, failed, passed, warned
from llavactl.errors import DataError, ModelSourceError
from llavactl.model import projector
from llavactl.model.hub import find_local
from llavactl.model.llms import llm_config
from llavactl.model.sources import load_tokenizer
from llavactl.model.towers import tower_info
from llavactl.resolve.facts import MachineFacts
from llavactl.resolve.run import CPU_BF16_EMULATED, ModelSource, ResolvedRun

if TYPE_CHECKING:
    from llavactl.data.source import DataSource
    from llavactl.model.flops import Bf16Speed

_FIRST_RECORDS = 100


def _rule_rows(resolved: ResolvedRun, check: str) -> list[CheckResult]:
    """The resolution's problems of ``check`` as failed rows (blocking train when they stop a run)."""
    return [failed(check, p.problem.message, p.problem.fix, blocking=True) for p in resolved.problems_for(check)]


def device_choice_check(resolved: ResolvedRun) -> list[CheckResult]:
    requested = resolved.loaded.profile.training.device
    return _rule_rows(resolved, "training.device") or [
        passed("training.device", f"{requested} -> {resolved.device_type}")
    ]


def precision_checks(resolved: ResolvedRun) -> list[CheckResult]:
    """The resolution's precision problems, or what the run computes in; on a CPU, with how fast bf16
    runs this profile's matmuls here (:func:`bf16_measured`)."""
    failures = [
        row for check in ("training.bf16", "training.fp16", "training.tf32") for row in _rule_rows(resolved, check)
    ]
    cpu = resolved.device_type == "cpu"
    facts, precision, check = resolved.facts, resolved.precision, "training.bf16"
    if failures:
        speed = bf16_measured(resolved) if cpu and resolved.problems_for(check) else None
        if speed is None:
            return failures
        # The rule's row, with the figure that shows how slow "emulated" is here.
        measured = f" Measured: bf16 runs at {_times(speed)} fp32's speed in {_matmuls(speed)}."
        return [replace(row, finding=row.finding + measured) if row.check == check else row for row in failures]
    if not cpu:
        return [passed("precision", f"{precision.name} on {resolved.device_type}")]
    speed = bf16_measured(resolved)
    if precision.autocast == "bf16":
        said = f" ({_times(speed)} fp32's speed in {_matmuls(speed)})" if speed else ""
        return [passed(check, f"CPU autocast to bf16 on native {facts.cpu_bf16_isa}{said}")]
    if not facts.cpu_native_bf16:
        said = f" (measured: {_times(speed)} fp32's speed in {_matmuls(speed)})" if speed else ""
        return [passed(check, "fp32", hint=CPU_BF16_EMULATED + said)]
    if speed is None:
        return [passed(check, "fp32", hint=f"this CPU has native bf16 ({facts.cpu_bf16_isa}): `training.bf16=true`")]
    on = f"in {_matmuls(speed)}, on {facts.cpu_bf16_isa}"
    if speed.speedup < 1:
        return [passed(check, "fp32", hint=f"bf16 measured {_times(speed)} fp32's speed {on}: fp32 is faster here")]
    return [passed(check, "fp32", hint=f"bf16 measured {_times(speed)} faster {on}: `training.bf16=true`")]


def bf16_measured(resolved: ResolvedRun) -> Bf16Speed | None:
    """bf16 against fp32 on this CPU in the matmul that dominates the profile's LLM, its MLP's first
    linear layer, on the most tokens a micro-batch holds. Measured on the first call for these
    shapes on this machine (under a second), then read from llavactl's cache. None when the LLM's
    config is not here (nothing is downloaded)."""
    from llavactl.model.flops import bf16_speedup

    profile = resolved.loaded.profile
    try:
        config = llm_config(profile.model.model_name_or_path, download=False)
    except ModelSourceError:
        return None
    intermediate = getattr(config, "intermediate_size", None)
    if not intermediate:
        return None
    data = profile.data
    tokens = data.max_tokens_per_batch or profile.training.per_device_train_batch_size * data.max_seq_len
    return bf16_speedup(tokens, config.hidden_size, intermediate)


def _times(speed: Bf16Speed) -> str:
    return f"{speed.speedup:.2g}x"


def _matmuls(speed: Bf16Speed) -> str:
    return f"this profile's LLM matmuls, {speed.tokens:,} tokens x {speed.width:,} -> {speed.out:,}"


def quantization_check(resolved: ResolvedRun) -> CheckResult:
    model = resolved.loaded.profile.model
    if not (model.use_qlora or model.load_in_4bit or model.load_in_8bit):
        return passed("QLoRA / bitsandbytes", "not used")
    [row, *_] = _rule_rows(resolved, "QLoRA / bitsandbytes") or [
        passed("QLoRA / bitsandbytes", f"bitsandbytes {resolved.facts.packages.get('bitsandbytes')} on CUDA")
    ]
    return row


def data_checks(data: DataConfig, open_data: Callable[[], DataSource]) -> list[CheckResult]:
    """The data rows: ``data`` can be opened (by ``open_data``), holds records, and its first records
    and their images are there."""
    from llavactl.data.images import exists
    from llavactl.data.records import Problem, require_records

    if data.data_path.startswith("builtin:"):
        return [passed("data", f"{data.data_path}: built-in synthetic data, made on first use")]
    try:
        source = open_data()
    except DataError as exc:
        return [failed("data", exc.message, exc.fix or "fix the data file")]
    try:
        path, folder, store = source.path, source.image_folder, source.records
        require_records(store, str(path), empty_fix="point `data.data_path` at a non-empty data set")
    except DataError as exc:
        return [failed("data records", exc.message, exc.fix or "fix the data file")]
    problems, missing, checked, images = [], [], 0, 0
    for parsed in store.parsed(range(min(_FIRST_RECORDS, len(store)))):
        checked += 1
        if isinstance(parsed, Problem):
            problems.append(f"record {parsed.index}: {parsed.code}")
            continue
        for image in parsed.images:
            images += 1
            image_path = folder / image
            if not exists(image_path):
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
        passed("data records", f"{len(store)} records in {path.name}; the first {checked} parse, their images exist")
    ]


def template_check(resolved: ResolvedRun) -> CheckResult | None:
    """The profile's template against its tokenizer: every control token one token of it, and the
    tokenizer's own chat template (if any) rendering the first record as the profile's does. None
    when the tokenizer is not here (the model source rows say so)."""
    profile = resolved.loaded.profile
    template, name = profile.data.conversation_template, profile.model.tokenizer_name_or_path
    name = name or profile.model.model_name_or_path
    check = "data.conversation_template"
    if not (name.startswith("builtin:") or find_local(name)):
        return None  # never a download here: the model source rows say train will fetch it
    try:
        tokenizer = load_tokenizer(name)
    except ModelSourceError:
        return None
    fit = template_fit(tokenizer, template)
    if not fit.fits:
        return failed(check, fit.finding(name), fit.fix(), blocking=True)
    if not profile.data.data_path.startswith("builtin:"):
        try:
            records = resolved.data().records
            differs = first_difference(tokenizer, template, records.parsed(range(min(TEMPLATE_SAMPLE, len(records)))))
        except DataError:
            differs = None  # the data rows name what is wrong with the data
        if differs is not None:
            return warned(check, differs.finding, differs.fix)
    turn = turn_template(template)
    tokens = ", ".join(turn.control_tokens) if turn is not None else ""
    said = f"{template}: {tokens} are tokens of the tokenizer" if tokens else f"{template} fits the tokenizer"
    return passed(check, said)


def _source_check(source: ModelSource, *, offline: bool, needs_weights: bool, torch_safe: bool) -> CheckResult:
    from llavactl.model.hub import cache_dir, is_hub_id
    from llavactl.model.weight_files import find_weights

    key, spec = source.key, source.spec
    if source.kind == "builtin":
        return passed(key, f"{spec}: built into llavactl")
    if source.folder is None:
        if not is_hub_id(spec):
            return failed(key, f"`{spec}` is neither a folder nor a hub id.", f"add `{key}=/path/to/model/folder`")
        where = f"not in the Hugging Face cache ({cache_dir()})"
        how = f"`hf download {spec}` (on a machine with internet, then copy the cache), or `{key}=/path/to/folder`"
        if offline:
            return failed(key, f"`{spec}` is {where}, and this run is offline.", how)
        return warned(key, f"`{spec}` is {where}; `llavactl train` will download it.", how)
    if not needs_weights:
        return passed(key, f"{spec}: {source.folder}")
    weights = find_weights(Path(source.folder))
    if not weights:
        return failed(
            key,
            f"{source.folder} holds no weight files.",
            f"`hf download {spec}`, or point `{key}` at a complete folder",
        )
    if all(w.suffix == ".safetensors" for w in weights):
        return passed(key, f"{spec}: safetensors ({len(weights)} file{'s' if len(weights) > 1 else ''})")
    if torch_safe:
        return warned(
            key,
            f"{spec}: pickle `.bin` weights only; loaded with torch.load(weights_only=True).",
            "prefer a safetensors copy (e.g. `model.vision_tower=jeromeku/clip-vit-large-patch14-336_safe`)",
        )
    return failed(
        key,
        f"{spec}: pickle `.bin` weights only, and torch < 2.6 cannot load them safely (`ValueError: torch.load`).",
        "upgrade torch (`pip install -r requirements_cpu.txt`), or use a safetensors copy of the model",
    )


def model_source_checks(resolved: ResolvedRun, *, offline: bool) -> list[CheckResult]:
    from packaging.version import Version

    facts = resolved.facts
    torch_safe = facts.packages.get("torch") is not None and Version(facts.packages["torch"]).release[:2] >= (2, 6)
    results = [
        _source_check(
            source, offline=offline, needs_weights=source.key != "model.tokenizer_name_or_path", torch_safe=torch_safe
        )
        for source in resolved.sources
    ]
    start = projector_check(resolved)
    model = resolved.loaded.profile.model
    if model.projector_from_scratch and model.pretrain_mm_mlp_adapter:
        key = "model.pretrain_mm_mlp_adapter"
        results.append(
            warned(
                "projector",
                f"model.projector_from_scratch is true, but {key} hands a projector over: the run starts from it.",
                f"drop one of them: `{key}=null` to start from random weights, or "
                "`model.projector_from_scratch=false`",
            )
        )
    return results if start is None else [*results, start]


def projector_check(resolved: ResolvedRun) -> CheckResult | None:
    """Where the projector starts: a handed-over one that fits the tower and the LLM (read from its
    shapes, before any weight loads), or random weights, which stages after the first mean only
    when the profile says so."""
    profile = resolved.loaded.profile
    model, key = profile.model, "model.pretrain_mm_mlp_adapter"
    if not model.pretrain_mm_mlp_adapter:
        if profile.stage == "projector" or model.projector_from_scratch:
            return None
        return warned(
            "projector",
            f"stage {profile.stage} starts the projector from random weights (no {key}). LLaVA-1.5 trains "
            "it first (stage 1, the `pretrain` profile: only the projector learns, on captions) so that stage 2 "
            "starts from image features the LLM can read; from random weights the LLM learns to ignore the image.",
            f"train stage 1 first (`llavactl train --profile pretrain`, the same tower and LLM) and add "
            f"`{key}=checkpoints/pretrain`, or `model.projector_from_scratch=true` if this is meant",
        )
    path = Path(model.pretrain_mm_mlp_adapter).expanduser()
    if not path.exists():
        return failed(
            key,
            f"{path} does not exist; stage 2 starts from the stage-1 projector.",
            f"run the `pretrain` profile first, or add `{key}=PATH` (or `=null`)",
            blocking=True,
        )
    try:
        saved = projector.saved_projector(path)
    except ModelSourceError as exc:  # every problem of reading it is the projector's
        return failed(key, exc.message.removeprefix(f"{key}: "), exc.fix or "fix the projector path", blocking=True)
    try:
        tower_width = tower_info(model.vision_tower, download=False).config.hidden_size
        llm_width = llm_config(model.model_name_or_path, download=False).hidden_size
    except ModelSourceError:
        return passed(key, f"{saved.file}: {saved.said()} LLM embeddings (checked against the tower and LLM when here)")
    tower = (model.vision_tower, tower_width, model.mm_vision_select_layer)
    try:
        projector.check_fits(saved, model.mm_projector_type, tower, (model.model_name_or_path, llm_width))
    except ModelSourceError as exc:
        return failed(key, exc.message.removeprefix(f"{key}: "), exc.fix or "fix the projector path", blocking=True)
    return passed(key, f"{saved.file}: {saved.said()} LLM embeddings, as the profile needs")


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


def profile_checks(resolved: ResolvedRun, *, offline: bool) -> list[CheckResult]:
    profile = resolved.loaded.profile
    results = device_choice_check(resolved)
    results += precision_checks(resolved)
    results.append(quantization_check(resolved))
    results += data_checks(profile.data, resolved.data)
    results += model_source_checks(resolved, offline=offline)
    template = template_check(resolved)
    if template is not None:
        results.append(template)
    wandb = wandb_check(profile.training, resolved.facts)
    if wandb is not None:
        results.append(wandb)
    return results
