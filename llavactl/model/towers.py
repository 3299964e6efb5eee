"""Vision towers (CLIP, SigLIP): their config, preprocessing and weights, from any source.

A tower folder normally has a `config.json` (a full CLIP/SigLIP config or a vision-only one). A
folder with only weights (the `_safe` layout: one safetensors file of full CLIP keys) gets its
config from the tensor shapes, completed from a table of known towers because the number of
attention heads cannot be read from shapes, and CLIP's default preprocessing.

Inside LLaVA a tower runs as :func:`patch_forward` sets it up: under no_grad when frozen, with
interpolated position embeddings at another image size than its own, and stopping after the layer
whose output LLaVA reads (:func:`check_select_layer`, :func:`train_read_layers`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llavactl.errors import ConfigError, ModelSourceError
from llavactl.model import builtin, hub, known_configs, weight_files

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

FIELD = "model.vision_tower"
# Full CLIP/SigLIP files name the tower's tensors `vision_model.*`; transformers 5 saves a vision
# model without that prefix and maps the old names when loading.
_VISION_PREFIX = "vision_model."
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
# Fields that tensor shapes determine; a known tower must agree on all of them.
_SHAPE_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass(frozen=True)
class TowerInfo:
    """What is known about a tower without its weights."""

    config: PretrainedConfig  # CLIPVisionConfig or SiglipVisionConfig, at its native image size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    folder: Path | None  # None for builtin towers and for towers known only from the table

    @property
    def has_cls_token(self) -> bool:
        return self.config.model_type == "clip_vision_model"


def _vision_config(config: PretrainedConfig, folder: Path) -> PretrainedConfig:
    if config.model_type in ("clip", "siglip"):
        return config.vision_config
    if config.model_type in ("clip_vision_model", "siglip_vision_model"):
        return config
    raise ModelSourceError(
        f"{FIELD}: `{folder}` is a `{config.model_type}` model; llavactl's towers are CLIP and SigLIP.",
        fix=f"point `{FIELD}` at a CLIP or SigLIP model, e.g. `openai/clip-vit-large-patch14-336`",
    )


def _normalisation(folder: Path, config: PretrainedConfig) -> tuple[tuple, tuple]:
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        fields = json.loads(processor.read_text())
        if "image_mean" in fields and "image_std" in fields:
            return tuple(fields["image_mean"]), tuple(fields["image_std"])
    if config.model_type.startswith("siglip"):
        return _SIGLIP_MEAN, _SIGLIP_MEAN
    return known_configs.CLIP_MEAN, known_configs.CLIP_STD


def is_vision_key(key: str) -> bool:
    return not key.startswith(_NOT_VISION)


def shapes_to_config(all_shapes: dict[str, tuple[int, ...]], where: str) -> PretrainedConfig:
    """A CLIP vision config from the tensor shapes of full CLIP (or vision-only) weights."""
    from transformers import CLIPVisionConfig

    shapes = {k.removeprefix(_VISION_PREFIX): v for k, v in all_shapes.items() if is_vision_key(k)}
    try:
        hidden, _, patch, _ = shapes["embeddings.patch_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ModelSourceError(
            f"{FIELD}: `{where}` has no config.json and its weights are not CLIP vision weights (missing {exc}).",
            fix="put the tower's config.json next to its weights",
        ) from exc
    layers = 1 + max(int(m.group(1)) for name in shapes if (m := _LAYER.match(name)))
    side = math.isqrt(positions - 1)
    found = {
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
    }
    candidates = [*known_configs.TOWERS.values(), *builtin.TOWERS.values()]
    for fields in candidates:
        if all(fields[key] == found[key] for key in _SHAPE_FIELDS):
            return CLIPVisionConfig(**fields)
    described = ", ".join(f"{key}={value}" for key, value in found.items())
    raise ModelSourceError(
        f"{FIELD}: `{where}` has no config.json and its shapes ({described}) match no known CLIP "
        "tower; the number of attention heads cannot be read from shapes.",
        fix="put the tower's config.json (from the original model repository) next to its weights",
    )


def _folder_info(folder: Path) -> TowerInfo:
    from transformers import AutoConfig

    if (folder / "config.json").is_file():
        try:
            loaded = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelSourceError(
                f"{FIELD}: `{folder / 'config.json'}` could not be read ({exc}).",
                fix="restore the model's original config.json",
            ) from exc
        config = _vision_config(loaded, folder)
    else:
        shapes = weight_files.tensor_shapes(folder)
        if not shapes:
            shapes = {k: tuple(v.shape) for k, v in weight_files.read_folder(folder).items()}
        config = shapes_to_config(shapes, str(folder))
    mean, std = _normalisation(folder, config)
    return TowerInfo(config=config, mean=mean, std=std, folder=folder)


def tower_info(spec: str, *, download: bool = True) -> TowerInfo:
    """Config and preprocessing of the tower ``spec``, without loading its weights.

    A hub tower that is not cached is taken from the known-config table when it is there; with
    ``download`` false (planning only) no file is ever fetched.
    """
    name = builtin.builtin_name(spec)
    if name is not None:
        return TowerInfo(builtin.tower_config(name), known_configs.CLIP_MEAN, known_configs.CLIP_STD, None)
    folder = hub.find_local(spec)
    if folder is not None:
        return _folder_info(folder)
    known = known_configs.tower_config(spec)
    if known is not None:
        return TowerInfo(known, known_configs.CLIP_MEAN, known_configs.CLIP_STD, None)
    if not download:
        raise ModelSourceError(
            f"{FIELD}: `{spec}` is not cached and not one of the towers llavactl knows.",
            fix=f"download it once (`hf download {spec} config.json preprocessor_config.json`)",
        )
    return _folder_info(hub.locate(spec, FIELD))


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    return CLIPVisionModel if config.model_type == "clip_vision_model" else SiglipVisionModel


def _check_complete(info: dict, where: str, *, strict: bool) -> None:
    problems = sorted(info["missing_keys"]) + [str(m) for m in info["mismatched_keys"]]
    if strict:
        problems += sorted(info["unexpected_keys"])
    if problems:
        raise ModelSourceError(
            f"{FIELD}: the weights in `{where}` do not fit the tower's config: "
            f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}.",
            fix="use the tower's original weights and config.json together",
        )


def load_tower(spec: str, *, image_size: int | None, seed: int, device: str) -> PreTrainedModel:
    """The tower ``spec`` with its weights (random, seeded, for a builtin tower), in fp32.

    Weights are read once into a model built without initialisation (transformers' loading), or,
    for a builtin tower, initialised once.
    """
    import torch

    name = builtin.builtin_name(spec)
    if name is not None:
        from transformers import CLIPVisionModel

        torch.manual_seed(seed)
        with torch.device(device):
            return CLIPVisionModel(builtin.tower_config(name, image_size))
    info = tower_info(spec)
    folder = info.folder or hub.locate(spec, FIELD)
    cls = model_class(info.config)
    files = weight_files.find_weights(folder)
    # A full CLIP/SigLIP folder also holds the text model: its keys are expected to be left over.
    from_folder = bool(files) and files[0].suffix == ".safetensors" and (folder / "config.json").is_file()
    with weight_files.quiet_loading():
        if from_folder:
            model, loading = cls.from_pretrained(
                folder, config=info.config, dtype=torch.float32, device_map=device, output_loading_info=True
            )
        else:
            state = {k: v for k, v in weight_files.read_folder(folder).items() if is_vision_key(k)}
            model, loading = cls.from_pretrained(
                None,
                config=info.config,
                state_dict=state,
                dtype=torch.float32,
                device_map=device,
                output_loading_info=True,
            )
    _check_complete(loading, str(folder), strict=not from_folder)
    return model


def resize_position_table(tower: PreTrainedModel, size: int) -> None:
    """Give ``tower`` (a CLIP or SigLIP vision model) position embeddings made for ``size`` px
    images, in place, and set its config's image size to match.

    The new table is the one transformers' `interpolate_pos_encoding` computes on the fly for that
    size, so the tower's outputs do not change; plain transformers then runs it at ``size`` without
    being asked to interpolate (an export trained at a non-native size needs this).
    """
    import torch
    from torch import nn

    embeddings = tower.embeddings
    if embeddings.image_size == size:
        return
    extra = embeddings.num_positions - embeddings.num_patches  # CLIP's class position, none in SigLIP
    patches = (size // embeddings.patch_size) ** 2
    old = embeddings.position_embedding.weight
    with torch.no_grad():
        # Only the shape of the first argument is read: it says how many patches the images give.
        shape_only = old.new_empty(1, patches + extra, old.shape[1])
        table = embeddings.interpolate_pos_encoding(shape_only, size, size)[0]
        resized = nn.Embedding(patches + extra, old.shape[1], device=old.device, dtype=old.dtype)
        resized.weight.copy_(table)
    resized.weight.requires_grad_(old.requires_grad)
    embeddings.position_embedding = resized
    embeddings.image_size = size
    embeddings.num_patches = patches
    embeddings.num_positions = patches + extra
    embeddings.position_ids = torch.arange(patches + extra, device=old.device).expand((1, -1))
    tower.config.image_size = size


# ---------------------------------------------------------------------------- running a tower inside LLaVA

# A tower's own parameter names (CLIP, SigLIP): `encoder.layers.N.` and what comes around them.
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def _encoder_layers(tower: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """The tower's encoder and its layer list (CLIP, SigLIP); None for a tower of another make."""
    from torch import nn

    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    layers = getattr(encoder, "layers", None)
    return (encoder, layers) if isinstance(layers, nn.ModuleList) else None


# How many encoder layers the tower call in progress (in this thread or task) runs; None: all.
_LAYERS_TO_RUN: contextvars.ContextVar[int | None] = contextvars.ContextVar("layers_to_run", default=None)


def _stop_encoder_early(encoder: nn.Module) -> None:
    """Make ``encoder`` run only its first `_LAYERS_TO_RUN` layers when that is set. Its own
    forward is the same loop over all of them (CLIP's and SigLIP's encoders in transformers 5)."""
    from transformers.modeling_outputs import BaseModelOutput

    forward = encoder.forward

    def encoder_forward(inputs_embeds: object, attention_mask: object = None, **kwargs: object) -> object:
        count = _LAYERS_TO_RUN.get()
        if count is None:
            return forward(inputs_embeds, attention_mask, **kwargs)
        hidden = inputs_embeds
        for layer in encoder.layers[:count]:
            hidden = layer(hidden, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden)

    encoder.forward = encoder_forward


def patch_forward(tower: nn.Module, *, frozen: bool, interpolate: bool, select_layer: int) -> None:
    """Make the tower's forward run under no_grad when frozen, interpolate its position embeddings
    when images are not its native size, and stop after the layer whose output LLaVA reads
    (``select_layer``, an index into its hidden states): with LLaVA's -2 the last layer's output is
    never used, and running it cost 2% of a local_lite step. The instances' forwards are replaced
    so that parameter names (and so checkpoints) stay those of transformers.

    The hidden states returned are padded with None for the layers not run, so that negative
    indices still point at the layers they name and asking for a layer not run fails. The output's
    `last_hidden_state` and pooled output are then those of the read layer: LLaVA uses neither."""
    import torch

    forward = tower.forward
    found = _encoder_layers(tower)
    read, skipped = 0, 0
    if found is not None:
        encoder, layers = found
        read = select_layer % (len(layers) + 1)  # hidden state k is layer k-1's output
        skipped = len(layers) - read if read >= 1 else 0  # hidden state 0 needs no layer, but it is
        # recorded at the first layer's input: keep every layer then.
    if not (frozen or interpolate or skipped):
        return
    if skipped:
        _stop_encoder_early(encoder)
        # transformers records hidden states by hooks it installs on the layers at the first call
        # that asks for them: installed now, on every layer.
        with contextlib.suppress(ImportError):
            from transformers.utils.output_capturing import maybe_install_capturing_hooks

            maybe_install_capturing_hooks(tower)

    def tower_forward(*args: object, **kwargs: object) -> object:
        if interpolate:
            kwargs["interpolate_pos_encoding"] = True
        stop = skipped and kwargs.get("return_dict") is not False  # a tuple output could not be padded
        token = _LAYERS_TO_RUN.set(read) if stop else None
        try:
            with torch.no_grad() if frozen else contextlib.nullcontext():
                out = forward(*args, **kwargs)
        finally:
            if token is not None:
                _LAYERS_TO_RUN.reset(token)
        hidden = getattr(out, "hidden_states", None)
        if stop and hidden is not None:
            out.hidden_states = (*hidden, *(None,) * skipped)
        return out

    tower.forward = tower_forward


def check_select_layer(select: int, layers: int, source: str) -> None:
    """``select`` must name one of the tower's hidden states in a way transformers' LLaVA reads."""
    if select != 0 and -(layers + 1) <= select <= layers:
        return
    raise ConfigError(
        f"model.mm_vision_select_layer: {select} names no hidden state of `{source}` that LLaVA can read: "
        f"its {layers} layers give hidden states 1 to {layers}, or -1 to -{layers + 1} counted from the end "
        "(transformers' LLaVA does not read 0).",
        fix=f"`model.mm_vision_select_layer=-2` (the penultimate layer, as in LLaVA-1.5), or another value "
        f"from -{layers + 1} to -1 or from 1 to {layers}",
    )


def train_read_layers(tower: nn.Module, select_layer: int) -> None:
    """Make the tower trainable up to the layer whose output LLaVA reads (``select_layer``, an
    index into its hidden states). The layers after it, the post-layernorm and SigLIP's pooling
    head never get a gradient: DDP stops on trainable parameters that never get one, and a
    resumed FSDP run finds no optimizer state for them."""
    read = select_layer % (tower.config.num_hidden_layers + 1)  # hidden state k is layer k-1's output
    for name, parameter in tower.named_parameters():
        if match := _ENCODER_LAYER.match(name):
            parameter.requires_grad_(int(match.group(1)) < read)
        else:
            parameter.requires_grad_(not name.startswith(("post_layernorm.", "head.")))
