"""Finding the folder of a model source: a local folder, or a hub id in the Hugging Face cache.

Hub ids are read from the local cache first. A model that is not cached is downloaded only when
`HF_HUB_OFFLINE` is not set; with it set, the error says how to get the files. The environment is
read at call time (not when huggingface_hub is imported), so that a shell or a test can change it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llavactl.errors import ModelSourceError

# `name` or `org/name`; a path such as `./models/x` or `../x` is never taken for a hub id.
_HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}

# What a training run needs from a repository: configs, tokenizer files and weights. Pickle
# weights (`*.bin`) are fetched only for a repository that has no safetensors.
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def cache_dir() -> Path:
    """The hub cache folder, by huggingface_hub's rules (HF_HUB_CACHE, then HF_HOME/hub)."""
    if explicit := os.environ.get("HF_HUB_CACHE"):
        return Path(explicit).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME", default_home)).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def find_local(spec: str) -> Path | None:
    """The folder of ``spec`` without any download: the folder itself or its cached snapshot."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(spec):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def locate(spec: str, what: str) -> Path:
    """The folder holding ``spec``'s files, downloading a hub model when allowed.

    ``what`` names the profile field in errors, e.g. "model.vision_tower".
    """
    found = find_local(spec)
    if found is not None:
        return found
    if not is_hub_id(spec):
        raise ModelSourceError(
            f"{what}: `{spec}` is not a folder, a `builtin:` name or a Hugging Face hub id.",
            fix=f"point `{what}` at an existing folder or a hub id such as `openai/clip-vit-large-patch14-336`",
        )
    if offline():
        raise ModelSourceError(
            f"{what}: `{spec}` is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is "
            "set, so it cannot be downloaded.",
            fix=f"on a machine with internet run `hf download {spec}` and copy the cache folder here, "
            f"point `{what}` at a local folder, or unset HF_HUB_OFFLINE",
        )
    return _download(spec, what)


def _download(repo_id: str, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=[*_FILES, "*.bin"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelSourceError(
            f"{what}: `{repo_id}` could not be downloaded from the Hugging Face hub ({exc}).",
            fix=f"check the id and the network (or `hf auth login` for a gated model), or point `{what}` "
            "at a local folder",
        ) from exc
    return folder
