"""Reading weight files safely: safetensors first, pickle `.bin` only through a safe unpickler.

`torch.load(weights_only=True)` refuses arbitrary Python objects, but only from torch 2.6 on is
it safe against crafted files (CVE-2025-32434). On older torch a pickle-only source is refused
with the two ways out, instead of transformers' `ValueError: Due to a serious vulnerability issue
in torch.load ...` that the CPU guide shows.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llavactl.errors import ModelSourceError

if TYPE_CHECKING:
    import torch

SAFE_TORCH_LOAD = (2, 6)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _shards(folder: Path, index_name: str) -> list[Path] | None:
    index = folder / index_name
    if not index.is_file():
        return None
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [folder / name for name in names]


def find_weights(folder: Path) -> list[Path]:
    """The weight files of a model folder: its safetensors if it has any, else its pickle files."""
    safetensors = _shards(folder, "model.safetensors.index.json") or sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return _shards(folder, "pytorch_model.bin.index.json") or sorted(folder.glob("pytorch_model*.bin"))


def is_pickle(path: Path) -> bool:
    return path.suffix in _PICKLE_SUFFIXES


def check_pickle_is_safe(path: Path) -> None:
    """Refuse to unpickle ``path`` where torch.load(weights_only=True) is not safe."""
    if torch_version() >= SAFE_TORCH_LOAD:
        return
    import torch

    raise ModelSourceError(
        f"`{path}` is a pickle (`.bin`) weight file and this torch ({torch.__version__}) cannot load it "
        "safely: `torch.load(weights_only=True)` is safe only from torch 2.6 on (transformers stops "
        "with `ValueError: Due to a serious vulnerability issue in torch.load ...`).",
        fix="upgrade torch (`pip install 'torch>=2.6'`), or use a safetensors copy of the weights, e.g. "
        "`model.vision_tower=jeromeku/clip-vit-large-patch14-336_safe` for the CLIP tower",
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on the CPU."""
    if not path.is_file():
        raise ModelSourceError(f"Weight file `{path}` does not exist.", fix="check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if not is_pickle(path):
        raise ModelSourceError(
            f"`{path}` is not a weight file llavactl reads (safetensors, or pickle .bin/.pt/.pth).",
            fix="convert it to safetensors",
        )
    check_pickle_is_safe(path)
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise ModelSourceError(
            f"`{path}` could not be loaded as plain tensors ({exc}).",
            fix="convert it to safetensors on a machine where you trust the file, or use another copy",
        ) from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelSourceError(
            f"`{path}` does not hold a flat mapping of names to tensors.",
            fix="save the weights with `torch.save(module.state_dict(), path)` or in safetensors",
        )
    return loaded


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, shards merged."""
    files = find_weights(folder)
    if not files:
        raise ModelSourceError(
            f"`{folder}` holds no weights (no `*.safetensors`, no `pytorch_model*.bin`).",
            fix="download the model's weight files into this folder",
        )
    merged: dict[str, torch.Tensor] = {}
    for file in files:
        merged.update(read_state_dict(file))
    return merged


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a folder's safetensors files, read from headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in find_weights(folder):
        if file.suffix != ".safetensors":
            break
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' loading report and progress bar: llavactl checks the loading info
    itself and reports the load as one milestone."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def no_peft_checkpointing_warning() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps or loads a
    model: a FutureWarning meant for peft, not for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
