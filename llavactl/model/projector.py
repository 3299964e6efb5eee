"""The projector from vision features to LLM embeddings, and loading a stage-1 projector.

Both kinds live in transformers' own `LlavaMultiModalProjector` (linear_1, act, linear_2), so that
a checkpoint loads in plain transformers: `mlp2x_gelu` is LLaVA-1.5's Linear-GELU-Linear;
`linear` (LLaVA-1's single layer) is linear_1 with the `linear` (identity) activation and a
frozen identity linear_2, which computes exactly one linear layer.

A projector saved by LLaVA (`model.mm_projector.0/2.*`, or `model.mm_projector.*` for `linear`),
by llava-hf (`multi_modal_projector.linear_1/2.*`, with or without `model.`) or by llavactl is
loaded by mapping its keys; a key that maps to nothing, a missing key or a wrong shape is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from llavactl.errors import ModelSourceError
from llavactl.model import weight_files

if TYPE_CHECKING:
    from torch import nn

ProjectorType = Literal["mlp2x_gelu", "linear"]
T = TypeVar("T")  # a tensor, or its shape
FIELD = "model.pretrain_mm_mlp_adapter"
ACTIVATION: dict[str, str] = {"mlp2x_gelu": "gelu", "linear": "linear"}
# Files that a run folder may hold its projector in: llavactl's, then LLaVA's stage-1 output.
FOLDER_FILES = ("projector.safetensors", "mm_projector.safetensors", "mm_projector.bin")

_OPTIONAL_PREFIX = r"^(?:base_model\.model\.)?(?:model\.)?"
_PATTERNS = (
    (re.compile(_OPTIONAL_PREFIX + r"mm_projector\.0\.(weight|bias)$"), "linear_1"),
    (re.compile(_OPTIONAL_PREFIX + r"mm_projector\.2\.(weight|bias)$"), "linear_2"),
    (re.compile(_OPTIONAL_PREFIX + r"mm_projector\.(weight|bias)$"), "linear_1"),
    (re.compile(_OPTIONAL_PREFIX + r"multi_modal_projector\.(linear_[12])\.(weight|bias)$"), None),
)


def trainable_keys(kind: ProjectorType) -> tuple[str, ...]:
    """The projector's own parameter names that training changes."""
    layers = ("linear_1",) if kind == "linear" else ("linear_1", "linear_2")
    return tuple(f"{layer}.{p}" for layer in layers for p in ("weight", "bias"))


def make_identity(projector: nn.Module) -> None:
    """Turn a `linear` projector's linear_2 into the frozen identity (see the module docstring)."""
    import torch

    with torch.no_grad():
        projector.linear_2.weight.copy_(torch.eye(projector.linear_2.in_features))
        projector.linear_2.bias.zero_()
    projector.linear_2.requires_grad_(False)


def map_keys(state: dict[str, T], where: str) -> dict[str, T]:
    """``state`` renamed to the projector's own names (`linear_1.weight`, ...), strictly."""
    mapped: dict[str, T] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        target = None
        for pattern, layer in _PATTERNS:
            if match := pattern.match(key):
                target = f"{layer}.{match.group(1)}" if layer else f"{match.group(1)}.{match.group(2)}"
                break
        if target is None:
            unmatched.append(key)
        elif target in mapped:
            raise ModelSourceError(
                f"{FIELD}: `{where}` holds two tensors for the projector's `{target}` (one is `{key}`).",
                fix="keep one projector per file",
            )
        else:
            mapped[target] = tensor
    if unmatched:
        raise ModelSourceError(
            f"{FIELD}: `{where}` has keys that are not projector weights in LLaVA or llava-hf naming: "
            f"{', '.join(sorted(unmatched)[:5])}{' ...' if len(unmatched) > 5 else ''}.",
            fix="point it at the projector file of a stage-1 run (`mm_projector.bin`, `projector.safetensors`)",
        )
    return mapped


@dataclass(frozen=True)
class SavedProjector:
    """What a saved projector is, read from its tensors' shapes: kind and widths."""

    file: Path
    kind: ProjectorType
    in_features: int  # the vision tower's hidden size it was trained on
    out_features: int  # the LLM's hidden size

    def said(self) -> str:
        return f"a `{self.kind}` projector from {self.in_features}-wide vision features to {self.out_features}-wide"


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape: from a safetensors header alone; a pickle file (small) is read."""
    if file.suffix == ".safetensors" and file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise ModelSourceError(
                f"{FIELD}: `{file}` cannot be read as safetensors ({exc}).",
                fix="point it at an intact projector file (copy it again from the stage-1 run)",
            ) from exc
    return {key: tuple(t.shape) for key, t in weight_files.read_state_dict(file).items()}


def saved_projector(path: Path) -> SavedProjector:
    """The projector in ``path`` (a file, or a run's checkpoint folder) described, without loading a model."""
    file = _projector_file(path)
    shapes = map_keys(_shapes(file), str(file))
    kind: ProjectorType = "mlp2x_gelu" if "linear_2.weight" in shapes else "linear"
    missing = sorted(set(trainable_keys(kind)) - set(shapes))
    if missing:
        raise ModelSourceError(
            f"{FIELD}: `{file}` is not a complete projector (missing: {', '.join(missing)}).",
            fix="point it at a complete projector saved by a stage-1 run",
        )
    weights = [
        shapes[f"{layer}.weight"] for layer in (("linear_1", "linear_2") if kind == "mlp2x_gelu" else ("linear_1",))
    ]
    chained = len(weights) == 1 or weights[0][0] == weights[1][1]
    if any(len(w) != 2 for w in weights) or not chained:
        raise ModelSourceError(
            f"{FIELD}: `{file}` holds projector weights of shapes {', '.join(map(str, weights))}, which are not "
            "the matrices of one projector.",
            fix="point it at a projector saved by a stage-1 run",
        )
    return SavedProjector(file, kind, weights[0][1], weights[-1][0])


def check_fits(saved: SavedProjector, kind: ProjectorType, tower: tuple[str, int, int], llm: tuple[str, int]) -> None:
    """Raise when ``saved`` does not fit the profile: its kind, its input width (``tower``: the
    tower's spec, hidden size and read layer) or its output width (``llm``: spec and hidden size)."""
    (tower_spec, tower_width, layer), (llm_spec, llm_width) = tower, llm
    if (saved.kind, saved.in_features, saved.out_features) == (kind, tower_width, llm_width):
        return
    wrong = []
    if saved.kind != kind:
        wrong.append(f"model.mm_projector_type is `{kind}`")
    if saved.in_features != tower_width:
        wrong.append(
            f"model.vision_tower `{tower_spec}` gives {tower_width}-wide features (hidden size, read at layer {layer})"
        )
    if saved.out_features != llm_width:
        wrong.append(f"model.model_name_or_path `{llm_spec}` takes {llm_width}-wide embeddings (hidden size)")
    fix = (
        f"add `model.mm_projector_type={saved.kind}`"
        if wrong == [f"model.mm_projector_type is `{kind}`"]
        else "use the projector of a stage-1 run with this profile's tower and LLM, or set `model.vision_tower` "
        "and `model.model_name_or_path` to the ones it was trained with"
    )
    raise ModelSourceError(
        f"{FIELD}: `{saved.file}` is {saved.said()} LLM embeddings, but {'; '.join(wrong)}.", fix=fix
    )


def _projector_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise ModelSourceError(
        f"{FIELD}: the folder `{path}` holds no projector ({', '.join(FOLDER_FILES)}).",
        fix="point it at a stage-1 run's checkpoint folder or its projector file",
    )


def load_pretrained(projector: nn.Module, path: Path, kind: ProjectorType) -> None:
    """Copy a saved projector into ``projector``: every key mapped, every weight present, shapes equal."""
    import torch

    file = _projector_file(path)
    mapped = map_keys(weight_files.read_state_dict(file), str(file))
    expected = set(trainable_keys(kind))
    other: ProjectorType = "linear" if kind == "mlp2x_gelu" else "mlp2x_gelu"
    if set(mapped) == set(trainable_keys(other)):
        raise ModelSourceError(
            f"{FIELD}: `{file}` is a `{other}` projector, but `model.mm_projector_type` is `{kind}`.",
            fix=f"add `model.mm_projector_type={other}`",
        )
    if set(mapped) != expected:
        missing = sorted(expected - set(mapped))
        extra = sorted(set(mapped) - expected)
        raise ModelSourceError(
            f"{FIELD}: `{file}` does not match a `{kind}` projector (missing: {missing or 'none'}; "
            f"not used: {extra or 'none'}).",
            fix="point it at a complete projector saved by a stage-1 run",
        )
    own = projector.state_dict()
    for key in sorted(expected):
        if tuple(mapped[key].shape) != tuple(own[key].shape):
            raise ModelSourceError(
                f"{FIELD}: `{key}` in `{file}` has shape {tuple(mapped[key].shape)}, the model needs "
                f"{tuple(own[key].shape)}: the projector was trained for another vision tower or LLM.",
                fix="use a projector trained with this profile's `model.vision_tower` and `model.model_name_or_path`",
            )
    with torch.no_grad():
        for key in sorted(expected):
            own[key].copy_(mapped[key])
