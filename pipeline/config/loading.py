"""Loading the config tree: YAML, dotted `--set` overrides, and pydantic's errors as one message per problem.

`load_config` reads a file (or the defaults), lays the overrides over it and validates; a `ConfigError` names
the file, each bad key (with its line in the file), what was expected and what was found, and never echoes a
credential.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, Tag, ValidationError

from pipeline.config.base import ConfigError
from pipeline.config.run import PipelineConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'train.max_steps=20' into (['train', 'max_steps'], 20); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value, found no '='")
    key, raw = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
        raise ConfigError(f"--set {text!r}: expected a dotted key like train.max_steps, found {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(f"--set {text!r}: the value", exc, lines=False)) from None
    return key.split("."), value


def yaml_problem(source: str, exc: yaml.YAMLError, lines: bool = True) -> str:
    """'<source>:<line>:<column>: expected valid YAML, found <problem>' from a YAML parser error
    ('<source> at column <n>: ...' for a one-line text such as a --set value)."""
    mark = getattr(exc, "problem_mark", None)
    where = source
    if mark is not None:
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if lines else f"{source} at column {mark.column + 1}"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return f"{where}: expected valid YAML, found {problem}"


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set `value` at the dotted `path` inside a nested dict/list tree (numeric parts index lists)."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
        else:
            if node.get(part) is None:  # an unset optional section (placement.train): the override starts it
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(path)}: expected a list index below {len(node)}, found {part!r}")
    return int(part)


def _unwrap(annotation: Any) -> Any:
    """An annotation without Annotated[...] and Optional[...] wrappers (a union of several types stays a union)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _walk_loc(loc: tuple) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the config classes.

    Out: the dotted key parts a person would type (union tags such as 'docs' or 'file'
    left out) and the annotation reached at the end (a Section class for a mapping).
    """
    parts: list[str] = []
    current: Any = PipelineConfig
    for part in loc:
        if str(part).startswith(("function-", "tagged-union")):
            continue
        current = _unwrap(current)
        origin = get_origin(current)
        if isinstance(part, int) and origin in (list, tuple):
            current = get_args(current)[0] if get_args(current) else Any
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[str(part)].annotation
        elif origin in (Union, UnionType):
            tagged = {
                tag.tag: get_args(member)[0]
                for member in get_args(current)
                if get_origin(member) is Annotated
                for tag in get_args(member)[1:]
                if isinstance(tag, Tag)
            }
            if part in tagged:  # a discriminated union's tag: not a key the user typed
                current = tagged[part]
                continue
            current = Any
        elif origin is dict:
            current = get_args(current)[1] if get_args(current) else Any
        else:
            current = Any
        parts.append(str(part))
    return parts, _unwrap(current)


def _unknown_key_message(loc: tuple) -> str:
    """'unknown key' with the closest valid key ('did you mean ...?') and the keys allowed there."""
    import difflib

    parts, _ = _walk_loc(loc)
    _, parent = _walk_loc(loc[:-1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return "unknown key"
    allowed = list(parent.model_fields)
    close = difflib.get_close_matches(parts[-1] if parts else str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; expected one of {allowed}"


def _yaml_line(text: str, parts: list[str]) -> int | None:
    """The 1-based line of the dotted key `parts` in the YAML `text`, or None when the file does not set it."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not match:
                return None
            line, node = match[-1][0].start_mark.line + 1, match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def format_validation_error(
    error: ValidationError, source: str, yaml_text: str | None = None, overridden: tuple[tuple[str, ...], ...] = ()
) -> str:
    """One line per problem: '<source>: <dotted key>: <what was expected> (found <value>) (line <n>)'.

    With the file's `yaml_text`, a key the file sets (and no --set override replaced) is
    named with its line.
    """
    lines = []
    for problem in error.errors():
        parts = _walk_loc(tuple(problem["loc"]))[0]
        key = ".".join(parts)
        at_line = ""
        replaced = any(tuple(parts[: len(o)]) == o or tuple(o[: len(parts)]) == tuple(parts) for o in overridden)
        if yaml_text is not None and parts and not replaced:
            line = _yaml_line(yaml_text, parts)
            at_line = f" (line {line})" if line else ""
        found = problem.get("input")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = _unknown_key_message(tuple(problem["loc"]))
        shown = (
            "" if isinstance(found, (dict, list)) and problem["type"] != "extra_forbidden" else f" (found {found!r})"
        )
        if problem["type"] == "extra_forbidden" and isinstance(found, dict):
            shown = f" (found a section with keys {list(found)})"  # keys only: values may be credentials
        if "found" in message:
            shown = ""
        if _walk_loc(tuple(problem["loc"]))[1] is SecretStr or "access_key" in key:
            shown = f" (found a value of type {type(found).__name__}, not shown)"  # never echo a credential
        lines.append(f"{source}: {key or '<top>'}: {message}{shown}{at_line}")
    return "\n".join(lines)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`: nested mappings merge, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None), apply dotted overrides, validate.

    Raises ConfigError naming the file, each bad key, what was expected and what was found.
    """
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    text: str | None = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"{source}: config file not found"
                + (" (expected a YAML file, found a folder)" if file.is_dir() else "")
            )
        try:
            text = file.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError as exc:
            raw = file.read_bytes()
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{source}:{line}: expected UTF-8 YAML text, found byte 0x{raw[exc.start]:02x}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_problem(source, exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top, found {type(loaded).__name__}")
        tree = loaded or {}
    # Overrides apply on top of the defaults, so `data.sources.0.limit=5` works when the
    # file leaves `data` out.
    tree = deep_merge(PipelineConfig().model_dump(mode="python"), tree)
    overridden = []
    for override in overrides:
        key_path, value = parse_override(override)
        apply_override(tree, key_path, value)
        overridden.append(tuple(key_path))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, text, tuple(overridden))) from None
