"""Load a profile: find the YAML, follow ``extends``, apply ``key=value`` overrides, validate.

Every value keeps its origin (schema default, file and line, or override) so that an error, and
``llavactl profiles show --provenance``, can say where it came from. Problems are collected and
raised together as one :class:`~llavactl.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from llavactl.config.lookup import find_profile
from llavactl.config.schema import Profile, RuleViolation
from llavactl.errors import EXCERPT_CHARS, ConfigError, excerpt, excerpt_text

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# A profile is a few KB of about a hundred values. These bounds answer a hostile or mistaken file
# (a data file passed as a profile, a "billion laughs" of nested aliases that expands 465 bytes to
# 10^9 values) with a message, before anything walks the expanded values.
MAX_PROFILE_BYTES = 1 << 20
MAX_VALUES = 100_000

# Names that other trainers (HF Trainer flags, axolotl, torchtune, LLaMA-Factory) use for our keys.
_ALIASES = {
    "batch_size": "training.per_device_train_batch_size",
    "micro_batch_size": "training.per_device_train_batch_size",
    "lr": "training.learning_rate",
    "epochs": "training.num_train_epochs",
    "num_epochs": "training.num_train_epochs",
    "grad_accum": "training.gradient_accumulation_steps",
    "gradient_accumulation": "training.gradient_accumulation_steps",
    "max_length": "data.max_seq_len",
    "model_max_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "version": "data.conversation_template",
    "template": "data.conversation_template",
    "image_aspect": "data.image_aspect_ratio",
    "lora_rank": "model.lora_r",
    "mm_projector_type": "model.mm_projector_type",
    "bits": "model.load_in_4bit",
}


@dataclass(frozen=True)
class Origin:
    """Where a value came from."""

    kind: str  # "default" | "file" | "override"
    file: Path | None = None
    line: int | None = None
    text: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return f"{_display_path(self.file)}:{self.line}"
        if self.kind == "override":
            return f"override `{self.text}`"
        return "schema default"


DEFAULT = Origin("default")


@dataclass
class LoadedProfile:
    """A validated profile with the mapping it was built from and the origin of every value."""

    profile: Profile
    source: Path
    raw: dict[str, Any]
    provenance: dict[str, Origin] = field(default_factory=dict)
    chain: list[Path] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def origin(self, dotted: str) -> Origin:
        """The origin of a dotted key (or of its nearest parent that was set), else the default."""
        return _lookup_origin(self.provenance, dotted)

    @property
    def name(self) -> str:
        return self.source.stem

    def problem(self, violation: RuleViolation) -> ProfileProblem:
        """``violation`` as a problem that says where each of its keys was set (file:line or override)."""
        origins = [self.origin(p) for p in violation.paths]
        set_here = [f"{p} ({o})" for p, o in zip(violation.paths, origins, strict=True) if o.kind != "default"]
        where = "; ".join(set_here) if set_here else None
        message = violation.message + (f" Set at: {where}." if where else "")
        return ProfileProblem(" + ".join(violation.paths), None, message, violation.fix)

    def raise_problems(self, problems: Sequence[ProfileProblem], context: str = "") -> None:
        """Raise one ConfigError listing ``problems`` (nothing when there are none)."""
        if problems:
            _raise(self.source, list(problems), context)


@dataclass(frozen=True)
class ProfileProblem:
    """One problem of a profile: the key(s), where the value came from, what is wrong, the fix."""

    path: str
    origin: Origin | None
    message: str
    fix: str

    def render(self) -> str:
        where = f" ({self.origin})" if self.origin is not None else ""
        return f"  - {excerpt_text(self.path)}{where}: {self.message}\n    Fix: {self.fix}"


def load_profile(name_or_path: str, overrides: Sequence[str] = ()) -> LoadedProfile:
    """Resolve, merge and validate a profile; raise ConfigError listing every problem."""
    source = find_profile(name_or_path)
    raw, provenance, chain = _load_with_extends(source, ())
    problems: list[ProfileProblem] = []
    for word in overrides:
        problems.extend(_apply_override(raw, provenance, word))
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, provenance))
        _raise(source, problems)
    loaded = LoadedProfile(profile, source, raw, provenance, chain, list(overrides))
    problems += [loaded.problem(violation) for violation in profile.rule_violations()]
    if problems:
        _raise(source, problems)
    return loaded


def resolved_with_origins(loaded: LoadedProfile) -> Iterator[tuple[str, Any, Origin]]:
    """Every leaf of the validated profile as (dotted key, value, origin), in schema order."""
    yield from _leaves(loaded.profile.model_dump(mode="json"), "", loaded.provenance)


# --- YAML with line numbers -----------------------------------------------------------------


def _load_with_extends(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, Origin], list[Path]]:
    if path in seen:
        cycle = " -> ".join(_display_path(p) for p in (*seen, path))
        raise ConfigError(
            f"Profile `extends` forms a cycle: {cycle}.",
            fix=f"remove the `extends:` line that points back, in {_display_path(seen[-1])}",
        )
    data, lines = _read_yaml(path)
    parent = data.pop("extends", None)
    lines.pop("extends", None)
    provenance = {key: Origin("file", path, line) for key, line in lines.items()}
    if parent is None:
        return data, provenance, [path]
    if not isinstance(parent, str):
        raise ConfigError(
            f"{_display_path(path)}: `extends` must be a profile name or path, not {excerpt(parent)}.",
            fix="write e.g. `extends: local_lite`",
        )
    base_path = find_profile(parent, relative_to=path.parent)
    base, base_prov, chain = _load_with_extends(base_path, (*seen, path))
    _deep_merge(base, data, base_prov, provenance, "")
    return base, base_prov, [*chain, path]


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping in a YAML file and the line of every (dotted) key in it."""
    shown = _display_path(path)
    text = _read_text(path)
    data, node = _load_yaml(text, shown)
    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{shown}: a profile must be a mapping of keys to values, not a {type(data).__name__}.",
            fix="start the file with keys such as `model:`, `data:` and `training:`",
        )
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines, path)
    return data, lines


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a ConfigError naming the file and the first bad byte."""
    shown = _display_path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ConfigError(
                f"{shown} is {size:,} bytes, too large for a profile (at most {MAX_PROFILE_BYTES:,}; a profile "
                "is a few KB of keys).",
                fix="check that --profile names a profile, not a data or weight file",
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{shown} cannot be read ({exc.strerror or exc}).", fix="check the file's permissions"
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{shown}:{line}:{column}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}); a profile "
            "is a UTF-8 YAML file.",
            fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or check that --profile names "
            "a YAML profile, not a binary file",
        ) from None


def _load_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document into its node graph and its value, refusing alias bombs."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _count_values(node, where)
            return loader.construct_document(node), node
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):
            line = text.count("\n", 0, exc.position) + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            at = f":{line}:{column}"
            problem = f"character #x{exc.character:04x} is not allowed in YAML"
        else:
            problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{where}{at}: this is not valid YAML ({excerpt_text(problem)}).",
            fix="correct the file at that line and column (check indentation, colons and quotes)",
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{where}: values are nested too deeply to read (thousands of levels).",
            fix="a profile nests sections two levels deep; check that this is a profile",
        ) from None
    except ValueError as exc:
        # Python refuses to convert integers of over 4,300 digits (a denial-of-service guard).
        raise ConfigError(f"{where}: a value cannot be read ({excerpt_text(str(exc))}).", fix="shorten it") from None


def _count_values(root: yaml.Node, where: str) -> None:
    """Raise when the values, with every alias expanded, would exceed ``MAX_VALUES`` or loop.

    Aliases make the node graph a DAG whose shared nodes Python objects share too, but pydantic,
    ``deepcopy`` of a merge and an error's ``repr`` walk every expanded copy.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(
                f"{where}:{node.start_mark.line + 1}: this value contains itself through an alias.",
                fix="replace the alias (`*name`) inside its own anchor (`&name`) by a value",
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise ConfigError(
                    f"{where}:{node.start_mark.line + 1}: with its aliases (`*name`) expanded, this profile "
                    f"holds over {MAX_VALUES:,} values (a profile holds about a hundred).",
                    fix="write the values out, or use aliases only for small repeated values",
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        dotted = f"{prefix}{key}"
        if key in seen:
            raise ConfigError(
                f"{_display_path(path)}:{key_node.start_mark.line + 1}: `{excerpt_text(dotted)}` is set twice in "
                "the same mapping; YAML would silently keep the last one.",
                fix="delete one of the two lines",
            )
        seen.add(key)
        if isinstance(value_node, yaml.MappingNode):
            # Sections have no origin of their own: each key in them has one.
            _collect_lines(value_node, dotted + ".", lines, path)
        else:
            lines[dotted] = key_node.start_mark.line + 1


def _deep_merge(
    base: dict[str, Any],
    top: dict[str, Any],
    base_prov: dict[str, Origin],
    top_prov: dict[str, Origin],
    prefix: str,
) -> None:
    """Merge ``top`` into ``base``: mappings merge key by key, anything else (lists too) replaces."""
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, base_prov, top_prov, dotted + ".")
        else:
            _drop_below(base_prov, dotted)
            base[key] = copy.deepcopy(value)
            for k, origin in top_prov.items():
                if k == dotted or k.startswith(dotted + "."):
                    base_prov[k] = origin


def _drop_below(provenance: dict[str, Origin], dotted: str) -> None:
    for key in [k for k in provenance if k == dotted or k.startswith(dotted + ".")]:
        del provenance[key]


# --- overrides ------------------------------------------------------------------------------


def _apply_override(raw: dict[str, Any], provenance: dict[str, Origin], word: str) -> list[ProfileProblem]:
    origin = Origin("override", text=excerpt_text(word))
    key, sep, text = word.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        return [
            ProfileProblem(
                excerpt_text(word),
                origin,
                "an override must look like `section.key=value`.",
                "write e.g. `training.max_steps=10` (no spaces around `=`; quote values with spaces)",
            )
        ]
    shown_key = excerpt_text(key)
    if text == "":
        return [
            ProfileProblem(
                key,
                origin,
                "the override has no value.",
                f"write `{shown_key}=VALUE`, or `{shown_key}=null` to clear it",
            )
        ]
    try:
        value, _ = _load_yaml(text, "value")
    except ConfigError as exc:
        shown = excerpt_text(text)
        return [
            ProfileProblem(
                key,
                origin,
                f"the value `{shown}` is not a YAML scalar or flow list ({exc.message}).",
                f"quote it, e.g. `{shown_key}='{shown}'`, or write a list as `{shown_key}=[a,b]`",
            )
        ]
    parts = key.split(".")
    known = set(schema_keys())
    node = raw
    for i, part in enumerate(parts[:-1]):
        parent = ".".join(parts[: i + 1])
        child = node.get(part)
        # A key left at its default is absent from the mapping but is still a value, not a section.
        if child is None and (parent not in known or parent in _sections()):
            child = node[part] = {}
        if not isinstance(child, dict):
            return [
                ProfileProblem(
                    key,
                    origin,
                    f"`{parent}` is a value, not a section, so `{shown_key}` cannot be set.",
                    f"set `{parent}=...` itself",
                )
            ]
        node = child
    _drop_below(provenance, key)
    if value is None:
        # `key=null` clears: the key falls back to the schema default (or to nothing, if optional).
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    provenance[key] = origin
    return []


# --- validation errors ----------------------------------------------------------------------


def _validation_problems(exc: ValidationError, provenance: dict[str, Origin]) -> list[ProfileProblem]:
    problems = []
    for error in exc.errors(include_url=False):
        path = _dotted(error["loc"])
        origin = _lookup_origin(provenance, path)
        kind = error["type"]
        if kind == "extra_forbidden":
            suggestion = suggest_key(path)
            shown = excerpt_text(path)
            fix = f"did you mean `{suggestion}`?" if suggestion else f"remove `{shown}` (see docs/profiles.md)"
            problems.append(ProfileProblem(path, origin, "unknown key.", fix))
        elif kind == "missing":
            problems.append(
                ProfileProblem(
                    path, None, "required key is not set.", f"add `{path}: ...` to the profile or `{path}=...`"
                )
            )
        else:
            value = error.get("input")
            shown = f" (got {excerpt(value)})" if not isinstance(value, dict) else ""
            fix = _type_fix(path, error)
            problems.append(ProfileProblem(path, origin, f"{error['msg']}{shown}.", fix))
    return problems


_TYPE_FIXES = {
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "int_parsing": "use a whole number",
    "int_from_float": "use a whole number",
    "int_type": "use a whole number",
    "float_parsing": "use a number, e.g. 2.0e-4",
    "float_type": "use a number, e.g. 2.0e-4",
    "string_type": "use a string (quote it if it looks like a number)",
    "list_type": "use a list, e.g. [q_proj, v_proj]",
    "finite_number": "use a finite number (not .inf or .nan), e.g. 2.0e-4",
    "bool_not_number": "use a number (true and false are not numbers)",
    "zero_steps": "use a positive number of steps, or -1 to run `training.num_train_epochs` epochs",
    "lone_surrogate": "remove the `\\ud800`-`\\udfff` escape, or write the character it was meant to be",
}


def _type_fix(path: str, error: dict[str, Any]) -> str:
    ctx = error.get("ctx", {})
    if "expected" in ctx:
        return f"use one of {ctx['expected']}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"use a value {word} {ctx[bound]}"
    if error["type"] == "empty_string":
        info = _field(path)
        required = info is not None and info.is_required()
        return f"give `{path}` a path" + ("" if required else f", or `{path}=null` for its default")
    return _TYPE_FIXES.get(error["type"], f"give `{path}` a value of the type in docs/profiles.md")


def suggest_key(path: str) -> str | None:
    """The known key a mistyped dotted key most likely meant, or None."""
    if len(path) > EXCERPT_CHARS:
        return None  # no key is this long, and difflib's time grows with the product of the lengths
    known = list(schema_keys())
    section, _, leaf = path.rpartition(".")
    alias = _ALIASES.get(leaf)
    if alias:
        return alias
    same_section = [k for k in known if k.rpartition(".")[0] == section]
    leaves = {k.rpartition(".")[2]: k for k in same_section}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    if close:
        return leaves[close[0]]
    # A word of the right key (`batch_size` in `per_device_train_batch_size`).
    containing = sorted((k for k in leaves if leaf in k), key=len)
    if containing:
        return leaves[containing[0]]
    # The right key in the wrong section (`model.learning_rate`).
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf]
    if elsewhere:
        return elsewhere[0]
    all_leaves = {k.rpartition(".")[2]: k for k in known}
    close = difflib.get_close_matches(leaf, list(all_leaves), n=1, cutoff=0.6)
    if close:
        return all_leaves[close[0]]
    return None


def _field(path: str) -> FieldInfo | None:
    """The schema field of a dotted key, or None."""
    model: type[BaseModel] = Profile
    info = None
    for part in path.split("."):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            model = info.annotation
    return info


def _sections(model: type[BaseModel] = Profile, prefix: str = "") -> set[str]:
    """The dotted keys that are sections (mappings of keys), not values."""
    found = set()
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found.add(f"{prefix}{name}")
            found |= _sections(info.annotation, f"{prefix}{name}.")
    return found


def schema_keys(model: type[BaseModel] = Profile, prefix: str = "") -> Iterator[str]:
    """Every dotted key that the schema defines, sections included."""
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        yield dotted
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from schema_keys(annotation, dotted + ".")


def _lookup_origin(provenance: dict[str, Origin], dotted: str) -> Origin:
    """Where the value at ``dotted`` (``training.report_to[0]``) came from: its own key's origin, else
    that of the nearest list or section holding it."""
    key = dotted
    while key:
        if key in provenance:
            return provenance[key]
        key = key[: key.rindex("[")] if key.endswith("]") else key.rpartition(".")[0]
    return DEFAULT


def _leaves(value: Any, prefix: str, provenance: dict[str, Origin]) -> Iterator[tuple[str, Any, Origin]]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _leaves(child, f"{prefix}{key}.", provenance)
        return
    dotted = prefix.rstrip(".")
    yield dotted, value, provenance.get(dotted, DEFAULT)


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _display_path(path: Path | None) -> str:
    if path is None:
        return "?"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _raise(source: Path, problems: list[ProfileProblem], context: str = "") -> None:
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    body = "\n".join(p.render() for p in problems)
    raise ConfigError(f"Profile {_display_path(source)} has {count}{context}:\n{body}")
