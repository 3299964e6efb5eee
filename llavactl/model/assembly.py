"""Assembling a LLaVA model (vision tower + projector + LLM) and setting it up for a stage.

The result is transformers' own `LlavaForConditionalGeneration`, so that checkpoints load in
transformers and serving tools. Its skeleton is made on the meta device and the tower and LLM,
each loaded (or, for builtin models, initialised) once, are put into it: no weight is initialised
and then overwritten. Only the projector is initialised here, from the seed.

Stages: `projector` trains the projector; `lora`/`qlora` add peft LoRA adapters to the LLM's
target modules and train them with the projector; `full` trains the LLM and the projector. The
tower trains too when `model.freeze_vision_tower` is false; a frozen tower runs under `no_grad`
and, since gradient checkpointing is switched on for the LLM only, is never recomputed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llavactl.config.schema import uses_lora
from llavactl.errors import ModelSourceError
from llavactl.model import llms, projector, sources, towers
from llavactl.model.weight_files import no_peft_checkpointing_warning

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

    from llavactl.config.schema import ModelConfig, Stage
    from llavactl.data.images import ImageSpec

# Parameter name prefixes in LlavaForConditionalGeneration, by component.
TOWER_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."


@dataclass
class AssembledModel:
    """A LLaVA model ready for one stage, with what training and saving need to know about it."""

    model: LlavaForConditionalGeneration
    # None only for a meta-device or random-weights build whose tokenizer is not at hand.
    tokenizer: PreTrainedTokenizerBase | None
    image_spec: ImageSpec
    image_token_id: int
    stage: Stage
    projector_type: projector.ProjectorType
    # The peft wrapper of `model` for lora/qlora (adapters are injected into `model` itself).
    peft_model: PeftModel | None
    load_seconds: float

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by component: `lora`, `projector`, `llm`, `vision_tower`.

        Only components with trainable parameters appear; names are those of ``model``.
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(component(name), []).append((name, parameter))
        return groups

    def require_tokenizer(self, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
        """The tokenizer, which training needs even where random weights stand in for the model's
        (a random-weights build lacks it when it is not at hand)."""
        if self.tokenizer is not None:
            return self.tokenizer
        source = model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
        raise ModelSourceError(
            f"model.tokenizer_name_or_path: the tokenizer of `{source}` is not at hand, and the steps need it "
            "to encode the data (random weights can stand in for the model's weights, not for its tokenizer)",
            fix=f"download it once (`hf download {source} --include '*.json' --include '*.model' "
            "--include '*.txt'`), or point `model.tokenizer_name_or_path` at a local folder that has it",
        )


def component(name: str) -> str:
    """Which component a parameter of the assembled model belongs to."""
    if ".lora_" in name:
        return "lora"
    if name.startswith(PROJECTOR_PREFIX):
        return "projector"
    if name.startswith(TOWER_PREFIX):
        return "vision_tower"
    return "llm"


def _llava_config(
    model_cfg: ModelConfig,
    tower: towers.TowerInfo,
    configs: tuple[PretrainedConfig, PretrainedConfig],
    image_spec: ImageSpec,
    token_id: int,
) -> LlavaConfig:
    from transformers import LlavaConfig

    vision_config, text_config = configs
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=token_id,
        image_seq_length=image_spec.num_tokens,
        projector_hidden_act=projector.ACTIVATION[model_cfg.mm_projector_type],
        vision_feature_layer=model_cfg.mm_vision_select_layer,
        # CLIP's first token is CLS, which LLaVA drops; SigLIP has none.
        vision_feature_select_strategy="default" if tower.has_cls_token else "full",
    )


def _tower_info(model_cfg: ModelConfig, image_size: int | None, device: str) -> towers.TowerInfo:
    from llavactl.model import builtin

    info = towers.tower_info(model_cfg.vision_tower, download=device != "meta")
    name = builtin.builtin_name(model_cfg.vision_tower)
    if name is not None and image_size is not None:
        return towers.TowerInfo(builtin.tower_config(name, image_size), info.mean, info.std, None)
    return info


def _lora_targets(model_cfg: ModelConfig) -> str:
    # A regex, so that adapters go into the LLM only, never into same-named tower modules.
    names = "|".join(re.escape(m) for m in model_cfg.lora_target_modules)
    return rf"model\.language_model\..*\.({names})"


def add_lora(model: LlavaForConditionalGeneration, model_cfg: ModelConfig) -> PeftModel:
    """Inject peft LoRA adapters into ``model``'s LLM (in place); only they are left trainable. Their dropout
    is `SparseDropout` (same distribution, far fewer random draws on a CPU) and their update is added
    into the base output in place (`fused_lora`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=_lora_targets(model_cfg),
        bias="none",
    )
    try:
        with no_peft_checkpointing_warning():
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ModelSourceError(
            f"model.lora_target_modules: {model_cfg.lora_target_modules} match no module of the LLM ({exc}).",
            fix="name the LLM's linear layers, e.g. `model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]`",
        ) from exc
    from llavactl.model.dropout import use_sparse_dropout
    from llavactl.model.fused_lora import use_fused_lora

    use_sparse_dropout(peft_model)
    use_fused_lora(peft_model)
    return peft_model


def _load_parts(
    model_cfg: ModelConfig,
    stage: Stage,
    image_size: int | None,
    seed: int,
    device: str,
    compute_dtype: torch.dtype | None,
) -> tuple[nn.Module, PreTrainedModel]:
    """The tower and the LLM with their weights (QLoRA: the LLM quantized, computing in ``compute_dtype``)."""
    quantization = llms.quantization_config(model_cfg, compute_dtype) if stage == "qlora" else None
    llm = llms.load_llm(model_cfg.model_name_or_path, seed=seed, device=device, quantization=quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    tower = towers.load_tower(model_cfg.vision_tower, image_size=image_size, seed=seed, device=device)
    return tower, llm


def _random_parts(
    model_cfg: ModelConfig, image_size: int | None, seed: int, device: str
) -> tuple[nn.Module, PreTrainedModel]:
    """The tower and the LLM in their real shapes with seeded random weights, from known or cached
    configs, without reading (or downloading) any weights: for a dry run's smoke steps and for
    benchmarks on machines that do not have the models."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    tower_config = _tower_info(model_cfg, image_size, "meta").config
    text_config = llms.llm_config(model_cfg.model_name_or_path, download=False)
    generator = torch.Generator().manual_seed(seed)
    with no_init_weights(), torch.device(device):
        # transformers' per-module init takes seconds at these sizes; one pass of normal_ does not.
        tower = towers.model_class(tower_config)(tower_config)
        llm = AutoModelForCausalLM.from_config(text_config)
    with torch.no_grad():
        for part in (tower, llm):
            for name, parameter in part.named_parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, 0.02, generator=generator)
                else:
                    parameter.fill_(0.0 if name.endswith("bias") else 1.0)
    if llm.config.tie_word_embeddings:
        llm.tie_weights()
    return tower, llm


def _assemble(
    config: LlavaConfig, parts: tuple[nn.Module, PreTrainedModel] | None, model_cfg: ModelConfig, seed: int, device: str
) -> LlavaForConditionalGeneration:
    """The skeleton made on the meta device, with the loaded parts and a fresh projector put in."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    if parts is None:
        return model
    tower, llm = parts
    model.model.vision_tower = tower
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    torch.manual_seed(seed)
    with torch.device(device):
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    if model_cfg.mm_projector_type == "linear":
        projector.make_identity(model.model.multi_modal_projector)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"assembly left tensors on the meta device: {left[:5]}")
    return model


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep every frozen floating-point weight in ``dtype`` (the step's autocast dtype): it never
    changes, so it needs no fp32 copy (LLaVA's own trainer loads the model in bf16). Trainable
    weights stay fp32, the master weights the optimizer updates; quantized (integer) weights and
    buffers are left as they are. So are LayerNorm weights (a few thousand a layer): autocast leaves
    layer_norm to its inputs' dtypes on a CPU, where a bf16 weight under an fp32 input (a residual
    stream that trainable layers keep in fp32) is an error, and an fp32 weight takes either."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            continue
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)


def build_llava(
    model_cfg: ModelConfig,
    stage: Stage,
    *,
    image_size: int | None,
    seed: int,
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    random_weights: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> AssembledModel:
    """The LLaVA model of ``model_cfg``, set up to train ``stage`` on ``device``.

    ``compute_dtype`` is the step's autocast dtype (the resolved precision, None for fp32): what
    QLoRA's quantized layers compute in, and what every frozen weight is stored in
    (:func:`store_frozen_in`); trainable weights stay fp32.

    ``device="meta"`` builds the model without weights from configs alone (known or cached),
    for planning; the tokenizer is then optional. ``random_weights`` builds it in its real shapes
    with seeded random weights instead of reading them (QLoRA excepted: it quantizes real weights).
    """
    start = time.perf_counter()
    tokenizer_source = model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
    try:
        tokenizer = sources.load_tokenizer(tokenizer_source)
    except ModelSourceError:
        if device != "meta" and not random_weights:
            raise
        tokenizer = None
    tower = _tower_info(model_cfg, image_size, device)
    towers.check_select_layer(model_cfg.mm_vision_select_layer, tower.config.num_hidden_layers, model_cfg.vision_tower)
    image_spec = sources.tower_image_spec(model_cfg.vision_tower, image_size)
    if device == "meta":
        parts = None
    elif random_weights and stage != "qlora":
        parts = _random_parts(model_cfg, image_size, seed, device)
    else:
        parts = _load_parts(model_cfg, stage, image_size, seed, device, compute_dtype)
    # The LLaVA config shares the loaded parts' configs, so that resizing updates both.
    if parts is None:
        vision_config, text_config = tower.config, llms.llm_config(model_cfg.model_name_or_path, download=False)
    else:
        vision_config, text_config = parts[0].config, parts[1].config
    # Without a tokenizer (planning only), `<image>` is taken to be one token appended to the vocabulary.
    vocab = len(tokenizer) if tokenizer is not None else text_config.vocab_size + 1
    token_id = tokenizer.convert_tokens_to_ids(sources.IMAGE_TOKEN) if tokenizer is not None else vocab - 1
    if device == "meta":
        text_config.vocab_size = max(vocab, text_config.vocab_size)
    config = _llava_config(model_cfg, tower, (vision_config, text_config), image_spec, token_id)
    model = _assemble(config, parts, model_cfg, seed, device)
    if vocab > model.get_input_embeddings().num_embeddings:
        # The new rows (`<image>`, maybe `<pad>`) are never inputs: image features replace
        # `<image>` embeddings. A plain seeded init is enough.
        model.resize_token_embeddings(vocab, mean_resizing=False)
    if model_cfg.pretrain_mm_mlp_adapter and device != "meta":
        from pathlib import Path

        projector.load_pretrained(
            model.model.multi_modal_projector,
            Path(model_cfg.pretrain_mm_mlp_adapter).expanduser(),
            model_cfg.mm_projector_type,
        )

    from llavactl.model import attention

    attention.use_for(model.model.language_model.config)
    model.requires_grad_(False)
    peft_model = add_lora(model, model_cfg) if uses_lora(stage) else None
    trainable = set(projector.trainable_keys(model_cfg.mm_projector_type))
    for name, parameter in model.model.multi_modal_projector.named_parameters():
        parameter.requires_grad_(name in trainable)
    if stage == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    native = tower.config.image_size
    if not model_cfg.freeze_vision_tower:
        towers.train_read_layers(model.model.vision_tower, model_cfg.mm_vision_select_layer)
    towers.patch_forward(
        model.model.vision_tower,
        frozen=model_cfg.freeze_vision_tower,
        interpolate=image_spec.size != native,
        select_layer=model_cfg.mm_vision_select_layer,
    )
    if compute_dtype is not None:
        store_frozen_in(model, compute_dtype)
    if gradient_checkpointing:
        model.model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return AssembledModel(
        model=model,
        tokenizer=tokenizer,
        image_spec=image_spec,
        image_token_id=token_id,
        stage=stage,
        projector_type=model_cfg.mm_projector_type,
        peft_model=peft_model,
        load_seconds=time.perf_counter() - start,
    )
