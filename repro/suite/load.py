"""Reading a suite file: YAML -> validated ``Suite``, with one-line errors that name the file and the field."""

from __future__ import annotations

import hashlib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from repro.errors import UserError, printable
from repro.registry import import_plugin
from repro.suite.schema import Suite

SUITE_SUFFIXES = (".yaml", ".yml")
#: a suite is a page of YAML; anything far larger is a mistake or an attack on the parser
MAX_SUITE_BYTES = 1 << 20


class _SuiteLoader(yaml.SafeLoader):
    """Safe YAML that also refuses aliases (bounded memory: no "billion laughs") and duplicate keys (the last
    one would win silently)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in suite files",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: the constructor reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def suites_dir() -> Path:
    return Path(os.environ.get("REPRO_SUITES_DIR", "suites"))


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A path to a suite file, or a bare suite name looked up in ``suites/``."""
    path = Path(name_or_path)
    if path.suffix in SUITE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{path}: suite file does not exist")
        return path
    for suffix in SUITE_SUFFIXES:
        candidate = suites_dir() / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    known = ", ".join(p.stem for p in list_suite_files()) or "none"
    raise UserError(f"{name_or_path}: no such suite file or suite name in {suites_dir()}/ (known: {known})")


def list_suite_files() -> list[Path]:
    directory = suites_dir()
    return sorted(p for p in directory.glob("*.y*ml") if not p.name.startswith("_")) if directory.is_dir() else []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds: itself, or inside list[...], dict[..., ...], unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]


def _tagged(models: list[type[BaseModel]], tag: Any) -> type[BaseModel] | None:
    """The member of a discriminated union whose literal tag (``kind: absolute``) is ``tag``."""
    for model in models:
        if any(tag in typing.get_args(field.annotation) for field in model.model_fields.values()
               if typing.get_origin(field.annotation) is typing.Literal):
            return model
    return None


def _fields_at(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``location`` inside ``model`` (for 'unknown key' messages)."""
    current, candidates = model, [model]
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        if part in current.model_fields:
            candidates = _models_in(current.model_fields[part].annotation)
            if not candidates:
                return []
            current = candidates[0]
        else:  # a key of a dict of models (a tier's name), or a union's tag
            current = _tagged(candidates, part) or current
    return list(current.model_fields)


def format_validation_error(path: Path, error: ValidationError, model: type[BaseModel] = Suite) -> str:
    first = error.errors()[0]
    location = tuple(first["loc"])
    field = ".".join(str(p) for p in location) or "<top level>"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(model, location))
        return f"{path}: field {field}: unknown key; allowed: {allowed}"
    if first["type"] == "missing":
        return f"{path}: field {field}: required but missing"
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{path}: field {field}: {first['msg']} (got {got})"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_suite(name_or_path: str | Path) -> tuple[Suite, Path]:
    """Parse and validate a suite (schema, then registries: normalizers, backbones, datasets, tasks)."""
    path = resolve_suite_path(name_or_path)
    size = path.stat().st_size
    if size > MAX_SUITE_BYTES:
        raise UserError(f"{path}: {size} bytes; a suite file may have at most {MAX_SUITE_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        raw = yaml.load(text, Loader=_SuiteLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite file must be a YAML mapping of fields")
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(module, str) and module for module in plugins):
        raise UserError(f"{path}: field plugins: must be a list of module names (got {printable(repr(plugins))[:80]})")
    for module in plugins:
        try:
            import_plugin(module)
        except UserError as err:
            raise UserError(f"{path}: field plugins: {err}") from None
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(path, err)) from None
    if suite.name != path.stem:
        raise UserError(f"{path}: field name: {suite.name!r} must equal the file name {path.stem!r}")
    from repro.suite.validate import check_references, check_registries

    check_registries(suite, path)
    check_references(suite, path)
    return suite, path
