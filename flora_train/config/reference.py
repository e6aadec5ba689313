"""Every recipe key with its type, default and help, read from the schema itself: the dataclasses
give names, types and defaults, and the comments beside or above each field in ``schema.py`` give
the help. The documentation's recipe reference is generated from this, so it cannot drift."""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from flora_train.config import schema


@dataclass(frozen=True)
class RecipeKey:
    key: str  # dotted, e.g. "store.tier"
    type: str
    default: str
    help: str
    section: bool  # a nested section (its keys follow), not a value


def _comments() -> dict[tuple[str, str], str]:
    """``(class, field) -> help`` from the comment on a field's line, or the comment lines just above it."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            parts = []
            k = item.lineno - 2
            while k >= 0 and lines[k].strip().startswith("#"):
                parts.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            line = lines[item.end_lineno - 1]
            if "  # " in line:
                parts.append(line.split("  # ", 1)[1].strip())
            out[(node.name, item.target.id)] = " ".join(p for p in parts if p)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + (" | null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, str) and value == "???":
        return "(required)"
    return repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")


def _section_class(tp: Any) -> type | None:
    candidates = [tp, *typing.get_args(tp)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def recipe_keys(cls: type = schema.Recipe, prefix: str = "") -> list[RecipeKey]:
    """Every key of the recipe, depth first, in the schema's order."""
    helps = _comments()
    hints = typing.get_type_hints(cls, vars(schema))
    out: list[RecipeKey] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        nested = _section_class(tp)
        doc = helps.get((cls.__name__, f.name), "")
        if nested is not None:
            doc = doc or (inspect.getdoc(nested) or "").split("\n\n")[0].replace("\n", " ")
            out.append(RecipeKey(key, "section", "", doc, True))
            out.extend(recipe_keys(nested, key + "."))
        else:
            out.append(RecipeKey(key, _type_name(tp), _default(f), doc, False))
    return out


def recipe_reference_markdown() -> str:
    """The recipe reference page's body: a table per top-level section."""
    blocks: list[str] = []
    for k in recipe_keys():
        if k.section and "." not in k.key:
            blocks.append(f"\n## `{k.key}`\n\n{k.help}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        elif k.section:
            blocks.append(f"| `{k.key}` | section | | {k.help} |")
        else:
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731
            blocks.append(f"| `{k.key}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.help)} |" if k.default
                          else f"| `{k.key}` | {cell(k.type)} | | {cell(k.help)} |")
    return "\n".join(blocks) + "\n"


__all__ = ["RecipeKey", "recipe_keys", "recipe_reference_markdown"]
