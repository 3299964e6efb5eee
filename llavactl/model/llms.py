"""Causal language models: their config and weights from any source, and the QLoRA load.

QLoRA loads the LLM in 4 or 8 bits through bitsandbytes, which needs CUDA; whether this machine
can is decided with the profile's resolution (:mod:`llavactl.resolve`), before anything loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llavactl.config.schema import QLORA_OFF
from llavactl.errors import ConfigError, ModelSourceError
from llavactl.model import builtin, hub, known_configs, weight_files

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

    from llavactl.config.schema import ModelConfig

FIELD = "model.model_name_or_path"


def llm_config(spec: str, *, download: bool = True) -> PretrainedConfig:
    """The config of the LLM ``spec``, without loading its weights (see towers.tower_info)."""
    from transformers import AutoConfig

    name = builtin.builtin_name(spec)
    if name is not None:
        return builtin.llm_config(name)
    folder = hub.find_local(spec)
    if folder is None:
        known = known_configs.llm_config(spec)
        if known is not None:
            return known
        if not download:
            raise ModelSourceError(
                f"{FIELD}: `{spec}` is not cached and not one of the LLMs llavactl knows.",
                fix=f"download its config once (`hf download {spec} config.json`)",
            )
        folder = hub.locate(spec, FIELD)
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(
            f"{FIELD}: `{folder}` has no readable config.json ({exc}).",
            fix="download the model's config.json into that folder",
        ) from exc


def quantization_config(model_cfg: ModelConfig, compute_dtype: torch.dtype | None) -> BitsAndBytesConfig:
    """bitsandbytes settings for QLoRA, computing in ``compute_dtype``: the step's autocast dtype
    (the resolved precision; None: fp32). Where QLoRA can run (CUDA, bitsandbytes) is the
    resolution's rule (:mod:`llavactl.resolve`), checked before any model is built."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = compute_dtype or torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=model_cfg.load_in_4bit,
        load_in_8bit=model_cfg.load_in_8bit,
        bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_llm(spec: str, *, seed: int, device: str, quantization: BitsAndBytesConfig | None = None) -> PreTrainedModel:
    """The causal LM ``spec`` with its weights (random, seeded, for a builtin LLM), in fp32 unless
    quantized. Weights are read once into a model built without initialisation."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    name = builtin.builtin_name(spec)
    if name is not None:
        if quantization is not None:
            raise ConfigError(
                f"QLoRA quantizes pretrained weights, but `{spec}` is a random builtin model.",
                fix=f"point `{FIELD}` at a pretrained LLM, or add `{QLORA_OFF}`",
            )
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            return LlamaForCausalLM(builtin.llm_config(name))
    folder = hub.locate(spec, FIELD)
    config = llm_config(spec)
    files = weight_files.find_weights(folder)
    if not files:
        raise ModelSourceError(
            f"{FIELD}: `{folder}` holds no weights (no `*.safetensors`, no `pytorch_model*.bin`).",
            fix="download the model's weight files into this folder",
        )
    options = {
        "config": config,
        "dtype": torch.float32 if quantization is None else quantization.bnb_4bit_compute_dtype,
        "quantization_config": quantization,
        "output_loading_info": True,
    }
    with weight_files.quiet_loading():
        if files[0].suffix == ".safetensors":
            model, loading = AutoModelForCausalLM.from_pretrained(folder, device_map=device, **options)
        else:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            state = weight_files.read_folder(folder)
            model, loading = cls.from_pretrained(None, state_dict=state, device_map=device, **options)
    problems = sorted(loading["missing_keys"]) + [str(m) for m in loading["mismatched_keys"]]
    if problems:
        raise ModelSourceError(
            f"{FIELD}: the weights in `{folder}` do not fit its config: "
            f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}.",
            fix="use the model's original weights and config.json together",
        )
    return model
