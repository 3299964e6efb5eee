"""Find profile files: ``./profiles/NAME.yaml`` first, then the profiles bundled with llavactl.

A value that looks like a path (it ends in ``.yaml``/``.yml`` or holds a path separator) is used
as a path. ``extends`` names are looked up next to the extending file first.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from llavactl.errors import ConfigError, excerpt

_SUFFIXES = (".yaml", ".yml")
# Linux's PATH_MAX: no profile name or path is longer.
MAX_NAME_CHARS = 4096


def bundled_profiles_dir() -> Path:
    """The profiles shipped with llavactl: inside the wheel, or the repository's ``profiles/``."""
    package = Path(__file__).resolve().parent.parent
    inside_wheel = package / "_profiles"
    return inside_wheel if inside_wheel.is_dir() else package.parent / "profiles"


def profile_dirs(relative_to: Path | None = None) -> list[Path]:
    """Folders searched for a profile name, in order, without duplicates."""
    dirs = [relative_to] if relative_to is not None else []
    dirs += [Path.cwd() / "profiles", bundled_profiles_dir()]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(d.resolve() != u.resolve() for u in unique):
            unique.append(d)
    return unique


def available_profiles() -> dict[str, Path]:
    """Every profile name that ``--profile NAME`` would find, mapped to its file."""
    found: dict[str, Path] = {}
    for d in profile_dirs():
        for path in sorted(d.iterdir()):
            if path.suffix in _SUFFIXES and path.stem not in found:
                found[path.stem] = path
    return found


def find_profile(name_or_path: str, relative_to: Path | None = None) -> Path:
    """The YAML file a ``--profile`` value (or an ``extends`` value) names."""

    if len(name_or_path) > MAX_NAME_CHARS:
        raise ConfigError(
            f"The profile {excerpt(name_or_path)} is {len(name_or_path):,} characters long, longer than any file path.",
            fix="give a profile name (see `llavactl profiles list`) or a YAML path",
        )
    looks_like_path = name_or_path.endswith(_SUFFIXES) or os.sep in name_or_path or "/" in name_or_path
    if looks_like_path:
        candidates = [Path(name_or_path)]
        if relative_to is not None and not Path(name_or_path).is_absolute():
            candidates.insert(0, relative_to / name_or_path)
        for path in candidates:
            if path.is_file():
                return path.resolve()
        there = next((p for p in candidates if p.exists()), None)
        raise ConfigError(
            f"Profile file {excerpt(name_or_path)} "
            + ("does not exist." if there is None else "is not a file (a folder, a pipe or a device)."),
            fix="check the path, or give a profile name (see `llavactl profiles list`)",
        )
    searched = profile_dirs(relative_to)
    for d in searched:
        for suffix in _SUFFIXES:
            path = d / f"{name_or_path}{suffix}"
            if path.is_file():
                return path.resolve()
    names = sorted({p.stem for d in searched for p in d.iterdir() if p.suffix in _SUFFIXES})
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise ConfigError(
        f"No profile named {excerpt(name_or_path)} (looked in {', '.join(str(d) for d in searched)}).",
        fix=f"{hint}known profiles: {', '.join(names) or 'none'}; or pass a YAML path",
    )
