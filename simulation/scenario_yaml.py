"""Scenario files as YAML, with every error naming the file, the field and the line.

PyYAML's composed node tree keeps each node's position, so a pydantic error's ``loc`` (a path of
keys and list indices) can be walked down the tree to the line the user wrote. Errors found
after the fields validated (a fault naming an agent that is not in the fleet) carry a ``loc``
too and are placed the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from edgefed.common.errors import ConfigError

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a scenario: where (a field path, and a line once placed) and why."""

    loc: Loc
    message: str
    line: int | None = None
    path: str = ""
    """The field path as the user wrote it (``fleet[0].device``); from ``loc`` when empty."""

    @property
    def field(self) -> str:
        return self.path or format_loc(self.loc)

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.field or '(top level)'}: {self.message}"


class ScenarioError(ConfigError):
    """A scenario is invalid; the message names each problem's file, line and field."""

    def __init__(self, problems: Sequence[Problem], source: str = "<scenario>") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [p.render(source) for p in self.problems]
        super().__init__(f"invalid scenario {source}:\n  " + "\n  ".join(lines))


def format_loc(loc: Loc) -> str:
    """``("fleet", 0, "device")`` -> ``fleet[0].device``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def place(root: yaml.Node | None, loc: Loc) -> tuple[str, int | None]:
    """The user's field path and line of ``loc`` in the composed document ``root``.

    Walks keys and indices down the tree. A key that is absent (a required field left out) is
    reported on the line of the mapping that lacks it. A middle element that is not in the file
    (pydantic's union tags such as ``kill_agent``) is left out of the path.
    """
    if root is None:
        return format_loc(loc), None
    node: yaml.Node = root
    line = _line(root)
    shown: list[str | int] = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        child = _child(node, part)
        if child is None:
            if last and not _is_tag(node, part):
                shown.append(part)
            continue
        key_node, value_node = child
        shown.append(part)
        line = _line(key_node)
        node = value_node
    return format_loc(tuple(shown)), line


def _is_tag(node: yaml.Node, part: str | int) -> bool:
    """Whether ``part`` is a value of ``node`` (a union tag such as ``kind: cut_link``)."""
    return isinstance(node, yaml.MappingNode) and any(
        isinstance(v, yaml.ScalarNode) and v.value == str(part) for _, v in node.value
    )


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(node that names the child, the child's value node), or None when absent."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key, value
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        item = node.value[part]
        return item, item
    return None


def _duplicate_keys(node: yaml.Node | None, loc: Loc = ()) -> list[Problem]:
    """Keys given twice in one mapping (PyYAML would silently keep the last)."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            if name in seen:
                problems.append(
                    Problem(
                        (*loc, name),
                        "key given twice in one mapping",
                        _line(key),
                        format_loc((*loc, name)),
                    )
                )
            seen.add(name)
            problems.extend(_duplicate_keys(value, (*loc, name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, (*loc, i)))
    return problems


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed YAML file: the data, and the node tree that knows where each value was."""

    source: str
    data: Any
    root: yaml.Node | None

    def problems_from(
        self, error: ValidationError, model: type[BaseModel] | None = None
    ) -> list[Problem]:
        """pydantic's errors as problems placed in the file (``model``: the validated class,
        to list the fields an unknown key could have meant)."""
        out = []
        for err in error.errors(include_url=False):
            loc = tuple(err["loc"])
            path, line = place(self.root, loc)
            out.append(Problem(loc, describe(err, model), line, path))
        return out

    def placed(self, problems: Sequence[Problem]) -> list[Problem]:
        """Problems found after validation, given their lines in the file."""
        out = []
        for p in problems:
            path, line = place(self.root, p.loc)
            out.append(Problem(p.loc, p.message, line, path))
        return out


def describe(err: ErrorDetails, model: type[BaseModel] | None = None) -> str:
    """A readable message for one pydantic error."""
    kind, message, value = err["type"], str(err["msg"]), err.get("input")
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        loc = tuple(err["loc"])
        allowed = fields_at(model, loc[:-1]) if model is not None else []
        if not allowed:
            return "unknown field"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field ({hint}allowed: {', '.join(allowed)})"
    if isinstance(value, str | int | float | bool):
        message += f" (got {value!r})"
    return message


def fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model class found at ``loc`` below ``model`` (empty when the walk
    does not end at a model)."""
    candidates: list[Any] = [model]
    for part in loc:
        found: list[Any] = []
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                if isinstance(part, str) and part in c.model_fields:
                    found.extend(_models_in(c.model_fields[part].annotation))
                elif isinstance(part, str) and _tag(c) == part:
                    found.append(c)  # a discriminated union's tag: the same model
        if not found:
            found = [m for c in candidates for m in _models_in(c)]  # list index or dict key
            if isinstance(part, str):
                found = [m for m in found if _tag(m) in (None, part)]
        candidates = found
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return sorted(models[0].model_fields) if len(models) == 1 else []


def _tag(model: Any) -> str | None:
    field = getattr(model, "model_fields", {}).get("kind")
    args = get_args(field.annotation) if field is not None else ()
    return str(args[0]) if len(args) == 1 else None


def _models_in(annotation: Any) -> list[Any]:
    """Model classes inside an annotation (through Optional, list, dict, Annotated unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[Any] = []
    for arg in get_args(annotation):
        out.extend(_models_in(arg))
    return out


def read_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; a syntax error or a duplicate key raises :class:`ScenarioError` with the
    line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = Problem((), f"cannot read the file: {exc.strerror or exc}")
        raise ScenarioError([problem], source) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        raise ScenarioError(
            [Problem((), f"not valid YAML: {exc.problem or exc}", line)], source
        ) from None
    except yaml.YAMLError as exc:
        raise ScenarioError([Problem((), f"not valid YAML: {exc}")], source) from None
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise ScenarioError(duplicates, source)
    return YamlDocument(source, data, root)
