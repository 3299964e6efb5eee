"""Saving and loading what a stage trains, in safetensors.

A folder holds, by stage:
- `projector.safetensors`: the projector (every stage), in llava-hf names, so that it also
  serves as `model.pretrain_mm_mlp_adapter` of a later run;
- `adapter_model.safetensors` + `adapter_config.json` (lora, qlora): the LoRA adapters in peft's
  layout, loadable with `PeftModel.from_pretrained(LlavaForConditionalGeneration..., folder)`;
- `trainable.safetensors`: the other trainable weights (the LLM for `full`, the tower when it is
  unfrozen), in LlavaForConditionalGeneration's names.

Frozen weights are not saved: they come back from the sources and the seed. Loading is strict: a
missing file, a missing or unexpected key, or a wrong shape is an error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from llavactl.errors import ModelSourceError
from llavactl.model.assembly import component

if TYPE_CHECKING:
    import torch

    from llavactl.model.assembly import AssembledModel

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OTHER_FILE = "trainable.safetensors"
# A sharded checkpoint (stage `full` with FSDP): torch.distributed.checkpoint's index of its shards.
SHARDED_INDEX = ".metadata"
SHARDED_WEIGHTS = "weights"  # the part of the sharded state that holds the weights, by LLaVA name
_METADATA = {"format": "pt"}


def file_of(name: str) -> str:
    """The file a trained parameter of the LLaVA model is saved in (LoRA's: peft's adapter file)."""
    part = component(name)
    return PROJECTOR_FILE if part == "projector" else ADAPTER_FILE if part == "lora" else OTHER_FILE


def split_into_files(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> {key: tensor} of a state dict in LlavaForConditionalGeneration's names, LoRA
    weights excepted (peft names those)."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if (file := file_of(name)) != ADAPTER_FILE:
            files.setdefault(file, {})[name] = tensor
    return files


def trainable_state(assembled: AssembledModel) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> {key: tensor} of everything the stage trains; the tensors share storage
    with the model's parameters."""
    files = split_into_files({name: p.data for name, p in assembled.model.named_parameters() if p.requires_grad})
    if assembled.peft_model is not None:
        from peft import get_peft_model_state_dict

        files[ADAPTER_FILE] = get_peft_model_state_dict(assembled.peft_model, save_embedding_layers=False)
    return files


def save_trainable(assembled: AssembledModel, folder: Path) -> list[Path]:
    """Write the trained weights of ``assembled`` into ``folder``; returns the files written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, tensors in trainable_state(assembled).items():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, folder / file, _METADATA)
        written.append(folder / file)
    if assembled.peft_model is not None:
        assembled.peft_model.peft_config["default"].save_pretrained(folder)
        written.append(folder / ADAPTER_CONFIG)
    return written


def _describe(keys: set[str]) -> str:
    shown = sorted(keys)[:5]
    return ", ".join(shown) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def is_sharded(folder: Path) -> bool:
    """Whether checkpoint ``folder`` holds its weights in shards (torch.distributed.checkpoint)."""
    return (Path(folder) / SHARDED_INDEX).is_file()


def load_trainable(assembled: AssembledModel, folder: Path) -> None:
    """Load weights written by `save_trainable` into ``assembled`` (built for the same stage), or a
    sharded checkpoint's (:func:`is_sharded`)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    expected = trainable_state(assembled)
    if is_sharded(folder):
        _load_sharded(folder, {k: v for own in expected.values() for k, v in own.items()})
        return
    extra = [f for f in (PROJECTOR_FILE, ADAPTER_FILE, OTHER_FILE) if f not in expected and (folder / f).is_file()]
    if extra:
        raise ModelSourceError(
            f"`{folder}` holds {', '.join(extra)}, which stage `{assembled.stage}` does not train: it was "
            "saved by another stage or with another `model.freeze_vision_tower`.",
            fix="load a checkpoint saved by a run of the same stage and profile",
        )
    for file, own in expected.items():
        path = folder / file
        if not path.is_file():
            raise ModelSourceError(
                f"`{folder}` has no `{file}`, which stage `{assembled.stage}` needs.",
                fix="load a checkpoint saved by a run of the same stage and profile",
            )
        try:
            loaded = load_file(path)
        except Exception as exc:  # safetensors' SafetensorError: a truncated or altered file
            raise ModelSourceError(
                f"`{path}` cannot be read as safetensors ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}).",
                fix="load another checkpoint of the run (or restore this one from a copy)",
            ) from exc
        _require_match(f"`{path}`", {key: tuple(t.shape) for key, t in loaded.items()}, own)
        with torch.no_grad():
            for key, tensor in loaded.items():
                own[key].copy_(tensor)


def _require_match(where: str, saved: dict[str, tuple[int, ...] | str], own: dict[str, torch.Tensor]) -> None:
    """:class:`ModelSourceError` unless ``saved`` (key -> shape) has exactly the keys and shapes of ``own``."""
    missing, unexpected = set(own) - set(saved), set(saved) - set(own)
    if missing or unexpected:
        raise ModelSourceError(
            f"{where} does not match the model: missing {_describe(missing) or 'nothing'}; "
            f"unexpected {_describe(unexpected) or 'nothing'}.",
            fix="load a checkpoint saved by a run of the same stage and profile",
        )
    for key, shape in saved.items():
        if shape != tuple(own[key].shape):
            raise ModelSourceError(
                f"`{key}` in {where[0].lower()}{where[1:]} has shape {shape}, the model's is {tuple(own[key].shape)}.",
                fix="load a checkpoint saved with the same model sources and LoRA settings",
            )


def _load_sharded(folder: Path, own: dict[str, torch.Tensor]) -> None:
    """Read the weights of a sharded checkpoint straight into ``own`` (the model's parameters), in
    one process, without a second copy of them: the shards every process wrote, whole again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{SHARDED_WEIGHTS}."
    try:
        saved = {
            key[len(prefix) :]: meta
            for key, meta in FileSystemReader(str(folder)).read_metadata().state_dict_metadata.items()
            if key.startswith(prefix)
        }
    except Exception as exc:  # a torn or foreign index (the manifest's checksums pass first)
        raise ModelSourceError(
            f"`{folder / SHARDED_INDEX}` cannot be read as a torch.distributed.checkpoint index "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}).",
            fix="load another checkpoint of the run (or restore this one from a copy)",
        ) from exc
    shapes = {k: tuple(m.size) if isinstance(m, TensorStorageMetadata) else "not a tensor" for k, m in saved.items()}
    _require_match(f"The sharded checkpoint `{folder}`", shapes, own)
    # In place, into the parameters' own storage (torch.distributed.checkpoint copies into the
    # tensors it is given); without a process group it reads every shard itself.
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({SHARDED_WEIGHTS: own}, checkpoint_id=folder, no_dist=True)
