"""`llavactl dry-run`: the plan without weights, its memory trace, the knobs, the smoke steps."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from helpers import CPU, ONE, run_cli

from llavactl.config.loader import load_profile
from llavactl.model.assembly import build_llava
from llavactl.plan import build as P
from llavactl.plan.memory import component_params
from llavactl.resolve import resolve

GIB = 1024**3
TINY_TOKENS = P.TokenPlan("test", 600, 600, 16, 1, 297.9, 333, 341, 73)


def test_local_lite_plan_has_the_real_models_parameter_counts_without_weights():
    profile = load_profile("local_lite").profile
    counts = {c.name: c for c in component_params(P.build_meta(profile, gradient_checkpointing=True))}
    # CLIP ViT-L/14-336's vision tower, and SmolLM-135M plus one embedding row for `<image>`.
    assert counts["vision_tower"].total == 303_507_456 and counts["vision_tower"].trainable == 0
    assert counts["llm"].total == 134_515_008 + 576 and counts["llm"].trainable == 0
    # LoRA r16 on q,k,v,o of 30 layers: (576+576)*16 for q and o, (576+192)*16 for k and v.
    assert counts["lora"].total == counts["lora"].trainable == 30 * 16 * (2 * 1152 + 2 * 768)
    assert counts["projector"].trainable == 1024 * 576 + 576 + 576 * 576 + 576


def test_meta_counts_equal_the_built_model():
    profile = load_profile("tiny").profile
    meta = component_params(P.build_meta(profile, gradient_checkpointing=False))
    real = component_params(build_llava(profile.model, profile.stage, image_size=None, seed=0))
    assert meta == real


@pytest.mark.slow
def test_tiny_plan_counts_tokens_and_steps_from_its_data():
    loaded = load_profile("tiny")
    profile = loaded.profile
    plan = P.build_plan(resolve(loaded, replace(CPU, ram_available_bytes=20 * GIB), ONE), runtime_bytes=0)
    assert plan.tokens.records == 600 and plan.tokens.records_with_image == 600
    assert plan.tokens.image_tokens_per_image == 16
    assert plan.tokens.longest <= profile.data.max_seq_len and plan.tokens.supervised > 0
    assert (plan.steps_per_epoch, plan.total_steps) == (150, 900)
    assert plan.fits is True and plan.suggestions == []
    m = plan.memory
    assert m.gradients == 4 * sum(c.trainable for c in plan.components)
    assert m.optimizer == 2 * m.gradients
    assert m.activations > 0 and plan.flops_per_step > 0


def _counted_real_step(profile, batch_size: int, tokens: P.TokenPlan) -> int:
    """FLOPs counted on one real step of ``profile``'s models, in the shapes the plan traces."""
    import torch

    from llavactl.model.flops import flop_counter
    from llavactl.train.loss import summed_token_loss

    assembled = build_llava(profile.model, profile.stage, image_size=None, seed=0)
    assembled.model.train()
    n = assembled.image_spec.num_tokens
    ids = torch.randint(0, 200, (batch_size, tokens.longest))
    ids[:, 1 : 1 + n] = assembled.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -tokens.supervised :] = ids[:, -tokens.supervised :]
    mask = torch.ones_like(ids)
    mask[1:, -1] = 0  # a padded record: attention runs under the mask, as the plan assumes for batches
    size = assembled.image_spec.size
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.zeros(batch_size, 3, size, size),
    }
    counter = flop_counter()
    with counter:
        summed_token_loss(assembled.model, batch).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_plans_flops_are_those_a_real_step_counts(batch_size: int):
    # A lone record runs causal attention (about half the query-key pairs); a padded batch runs
    # masked attention over all of them. The plan traces fake tensors and must count the same.
    profile = load_profile("tiny", ["stage=lora", f"training.per_device_train_batch_size={batch_size}"]).profile
    tokens = P.TokenPlan("test", 600, 600, 16, 1, 40.0, 40, 40, 9)
    _, planned = P.estimate(profile, tokens, runtime_bytes=0)
    assert planned == _counted_real_step(profile, batch_size, tokens)


@pytest.mark.slow
def test_activation_peak_grows_with_sequence_and_batch():
    profile = load_profile("tiny").profile
    small, flops_small = P.estimate(profile, TINY_TOKENS, runtime_bytes=0)
    longer = P.TokenPlan("test", 600, 600, 16, 1, 297.9, 333, 380, 73)
    long, flops_long = P.estimate(profile, longer, runtime_bytes=0)
    batch = load_profile("tiny", ["training.per_device_train_batch_size=16"]).profile
    big, _ = P.estimate(batch, TINY_TOKENS, runtime_bytes=0)
    assert small.activations < long.activations < big.activations
    assert flops_small < flops_long


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_traced_peak_of_a_deep_model():
    # local_lite's shapes: 30 LLM layers, where keeping every layer's activations costs the most.
    # Traced as for a GPU, where only live tensors count, checkpointing keeps under half of them.
    tokens = P.TokenPlan("test", None, None, 576, 1, 704, 704, 704, 64)
    on = load_profile("local_lite").profile
    off = load_profile("local_lite", ["training.gradient_checkpointing=false"]).profile
    with_gc, _ = P.estimate(on, tokens, runtime_bytes=0, device="cuda")
    without, _ = P.estimate(off, tokens, runtime_bytes=0, device="cuda")
    assert with_gc.activations < without.activations / 2
    # On a CPU the estimate also counts what the process keeps resident: still lower with it.
    assert P.estimate(on, tokens, runtime_bytes=0)[0].total < P.estimate(off, tokens, runtime_bytes=0)[0].total


@pytest.mark.slow
def test_suggestions_are_cumulative_ready_to_paste_overrides_cheapest_first():
    profile = load_profile("tiny", ["data.max_seq_len=512", "training.per_device_train_batch_size=8"]).profile
    tokens = P.TokenPlan("test", 600, 600, 16, 1, 200.0, 200, 294, 40)
    suggestions = P.suggest(profile, tokens, free_bytes=1, runtime_bytes=0)
    overrides = [s.overrides for s in suggestions]
    assert overrides[0] == "training.per_device_train_batch_size=4 training.gradient_accumulation_steps=2"
    assert overrides[1] == "training.per_device_train_batch_size=2 training.gradient_accumulation_steps=4"
    assert "training.gradient_checkpointing=true" in overrides[3]
    assert overrides[-1].endswith("data.max_seq_len=200")
    keys = [{word.split("=")[0] for word in text.split()} for text in overrides]
    assert all(earlier <= later for earlier, later in itertools.pairwise(keys))  # cumulative
    peaks = [s.peak_bytes for s in suggestions]
    assert peaks[-1] < peaks[0]
    # Each line pastes as is.
    pasted = load_profile("tiny", ["data.max_seq_len=512", *overrides[-1].split()]).profile
    assert pasted.training.per_device_train_batch_size == 1 and pasted.data.max_seq_len == 200


def test_qlora_weights_count_at_four_bits():
    profile = load_profile("t4_qlora").profile
    assembled = P.build_meta(profile, gradient_checkpointing=True)
    from llavactl.plan.memory import weight_bytes

    full = weight_bytes(assembled)
    quantized = weight_bytes(assembled, quantized_bits=4)
    assert quantized < full * 0.9


@pytest.mark.slow
def test_cli_dry_run_json_with_smoke_steps_passes_the_reload_check():
    code, out, err = run_cli(["dry-run", "--profile", "tiny", "--steps", "1", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["smoke"]["losses_match"] is True and data["smoke"]["weights_match"] is True
    assert len(data["smoke"]["losses"]) == 2
    assert data["fits"] is True and data["memory"]["total"] > 0


@pytest.mark.slow
def test_cli_dry_run_steps_without_the_tokenizer_say_which_and_the_fix(tmp_path, monkeypatch, capsys):
    # SmolLM's weights are not here, so random ones stand in; its tokenizer cannot, and is not here either.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = ["dry-run", "--profile", "tiny", "--steps", "1", "model.model_name_or_path=HuggingFaceTB/SmolLM-135M"]
    args += ["stage=lora", "model.lora_target_modules=[q_proj]", "data.conversation_template=chatml"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    err = " ".join(err.split())
    assert "the tokenizer of `HuggingFaceTB/SmolLM-135M` is not at hand" in err
    assert "Fix: download it once" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_dry_run_plans_for_the_stated_device_memory_and_names_what_fits():
    args = ["dry-run", "--profile", "tiny", "training.device=cuda", "training.per_device_train_batch_size=1"]
    args += ["training.gradient_checkpointing=true", "--device-memory", "0.2"]
    code, out, err = run_cli(args)
    assert code == 0, err
    out = " ".join(out.split())
    assert "Free memory on the device: 0.20 GiB: does not fit" in out
    # The runtime with a CUDA context already takes more than 0.2 GiB: no knob can help.
    assert "No override brings the estimate under 0.20 GiB" in out
    assert "no cuda device on this machine: time per step not estimated" in out


@pytest.mark.parametrize("name", ["tiny", "local_lite", "t4_qlora", "pretrain", "finetune", "finetune_lora"])
def test_every_bundled_profile_builds_on_meta_without_weights(name):
    profile = load_profile(name).profile
    assert sum(c.total for c in component_params(P.build_meta(profile, gradient_checkpointing=False))) > 0


@pytest.mark.parametrize(
    ("overrides", "autocast"),
    [((), None), (("training.bf16=true",), "bf16"), (("training.device=cuda", "training.fp16=true"), "fp16")],
)
def test_the_plan_traces_the_step_in_the_autocast_the_run_uses(
    shapes, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], autocast: str | None
) -> None:
    from llavactl.plan import memory

    seen, trace = [], memory.trace_step
    monkeypatch.setattr(memory, "trace_step", lambda *a, **k: seen.append(k["autocast"]) or trace(*a, **k))
    prof = load_profile("tiny", [f"data.data_path={shapes}", *overrides]).profile
    meta = P.build_meta(prof, gradient_checkpointing=False)
    P.estimate(prof, P.token_plan(prof, meta), runtime_bytes=0, assembled=meta)
    assert seen == [autocast]


@pytest.mark.slow
def test_the_plans_verdict_is_doctors_fits_rule_with_its_margin(shapes) -> None:
    loaded = load_profile("tiny", [f"data.data_path={shapes}"])
    plan = P.build_plan(resolve(loaded, replace(CPU, ram_available_bytes=20 * GIB), ONE), runtime_bytes=0)
    peak = plan.memory.total
    for free, fit in ((peak * 2, "fits"), (int(peak / 0.9), "tight"), (peak - 1, "over"), (None, None)):
        at = replace(plan, free_bytes=free)
        assert (at.fit, at.as_json()["fit"], at.fits) == (fit, fit, None if fit is None else fit != "over")
