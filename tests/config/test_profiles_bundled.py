"""Every bundled profile validates and holds the values its issue and guide promise."""

from __future__ import annotations

import pytest

from llavactl.config.docgen import main as docgen_main
from llavactl.config.loader import load_profile
from llavactl.config.lookup import available_profiles, bundled_profiles_dir

BUNDLED = sorted(p.stem for p in bundled_profiles_dir().glob("*.yaml"))


def test_the_six_profiles_are_bundled():
    assert BUNDLED == ["finetune", "finetune_lora", "local_lite", "pretrain", "t4_qlora", "tiny"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_validates_with_a_description(name):
    profile = load_profile(name).profile
    assert profile.description
    assert name in available_profiles()


def test_local_lite_is_the_cpu_guides_profile():
    p = load_profile("local_lite").profile
    assert (p.training.bf16, p.training.fp16, p.training.tf32) == (False, False, False)
    assert (p.model.use_qlora, p.model.load_in_4bit, p.model.load_in_8bit) == (False, False, False)
    assert p.training.per_device_train_batch_size == 1
    assert p.training.gradient_accumulation_steps == 8
    assert p.training.learning_rate == 2e-4
    assert p.training.num_train_epochs == 3
    assert p.training.gradient_checkpointing is True
    assert (p.model.lora_r, p.model.lora_alpha, p.model.lora_dropout) == (16, 32, 0.05)
    assert sorted(p.model.lora_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert p.model.freeze_vision_tower is True
    assert p.model.vision_tower == "jeromeku/clip-vit-large-patch14-336_safe"
    assert p.model.model_name_or_path == "HuggingFaceTB/SmolLM-135M"
    assert p.training.report_to == []
    assert p.training.logging_steps == 1
    assert p.training.output_dir == "./checkpoints/local_lite"
    assert p.training.device == "cpu"


def test_t4_qlora_is_4bit_nf4_double_quant_on_all_projections():
    p = load_profile("t4_qlora").profile
    assert p.stage == "qlora" and p.model.use_qlora and p.model.load_in_4bit
    assert p.model.bnb_4bit_quant_type == "nf4" and p.model.bnb_4bit_use_double_quant
    assert (p.model.lora_r, p.model.lora_alpha) == (64, 128)
    assert sorted(p.model.lora_target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert p.global_batch_size == 16 and p.training.per_device_train_batch_size == 1
    assert p.training.fp16 and not p.training.bf16 and p.training.num_train_epochs == 1


def test_pretrain_is_llava_stage_one():
    p = load_profile("pretrain").profile
    assert p.stage == "projector"
    assert p.model.vision_tower == "openai/clip-vit-large-patch14-336"
    assert p.model.model_name_or_path == "lmsys/vicuna-7b-v1.5"
    assert p.data.conversation_template == "plain"
    assert p.training.learning_rate == 1e-3 and p.global_batch_size == 256
    assert p.training.warmup_ratio == 0.03 and p.training.lr_scheduler_type == "cosine"
    assert p.training.num_train_epochs == 1


def test_finetune_and_finetune_lora_are_llava_stage_two():
    full = load_profile("finetune").profile
    assert full.stage == "full" and full.data.conversation_template == "vicuna_v1"
    assert full.training.learning_rate == 2e-5 and full.global_batch_size == 128
    lora = load_profile("finetune_lora").profile
    assert lora.stage == "lora" and (lora.model.lora_r, lora.model.lora_alpha) == (128, 256)
    assert lora.training.learning_rate == 2e-4 and lora.training.mm_projector_lr == 2e-5
    assert lora.global_batch_size == 128


def test_tiny_is_offline_builtin():
    p = load_profile("tiny").profile
    assert p.model.model_name_or_path.startswith("builtin:")
    assert p.model.vision_tower.startswith("builtin:")
    assert p.data.data_path.startswith("builtin:")


def test_docs_profiles_md_is_generated_from_the_current_schema():
    assert docgen_main(["--check"]) == 0, "run `python -m llavactl.config.docgen`"
