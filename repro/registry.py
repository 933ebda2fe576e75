"""One registry per kind of thing (normalizers, datasets, adaptation methods, tasks, corruptions), open to plugins.

Adding an entry is one module and one decorator, as with timm's ``@register_model``. A plugin is a module outside
repro that does the same: it is imported through a Python entry point (one group per registry,
``ENTRY_POINT_GROUPS``; the entry point's name is the name it registers, its value the module), by ``repro
--plugin MODULE``, or by a suite's ``plugins:`` list. Every name a plugin registers remembers its plugin, so that
a run using it carries the plugin's distribution and version in its id and provenance; built-in names carry none.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from repro.errors import UserError, printable

T = TypeVar("T")

#: the entry point group of each registry's kind; backbones are timm models (``timm.models.register_model``)
ENTRY_POINT_GROUPS = {"normalizer": "repro.normalizers", "adaptation method": "repro.methods",
                      "backbone": "repro.backbones", "dataset": "repro.datasets", "task": "repro.tasks"}
#: comma-separated plugin modules (``--plugin``), so that the processes a run starts import them too
PLUGIN_MODULES_ENV = "REPRO_PLUGINS"


@dataclass(frozen=True)
class Plugin:
    """Where a registered name came from: the module that registered it and its distribution's name and version.

    A module outside any installed distribution is its own distribution, versioned by its file's hash."""

    module: str
    distribution: str
    version: str


#: every registry, by the kind of thing it holds
_REGISTRIES: dict[str, Registry[Any]] = {}


class Registry(Generic[T]):
    """Name -> entry mapping with a decorator for registration and a readable error on lookup.

    The first lookup of any registry imports the installed plugins (``load_plugins``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._sources: dict[str, Plugin] = {}
        _REGISTRIES[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            plugin = _importing[-1] if _importing and not _is_repros(entry) else None
            if name in self._entries:
                if plugin:
                    holder = self._sources.get(name)
                    owner = f"plugin {holder.distribution}" if holder else "repro"
                    raise UserError(f"registers {self.kind} {name!r}, which {owner} already has")
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            if plugin:
                self._sources[name] = plugin
            return entry

        return decorator

    def register_named(self, name: str) -> Callable[[T], T]:
        """``register`` for classes that also carry their registered name, as ``cls.name``."""

        def decorator(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.register(name)(cls)

        return decorator

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def source(self, name: str) -> Plugin | None:
        """The plugin that registered ``name``; None for repro's own."""
        load_plugins()
        return self._sources.get(name)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


#: the plugins being imported, innermost last: what a registration made now belongs to
_importing: list[Plugin] = []
#: every plugin module imported, by module name
_imported: dict[str, Plugin] = {}
#: timm model names registered by plugins
_backbones: dict[str, Plugin] = {}
_entry_points_loaded = False


def load_plugins() -> None:
    """Import every installed plugin (entry points of ``ENTRY_POINT_GROUPS``) and the ``REPRO_PLUGINS`` modules,
    once per process. A plugin that fails to import, registers a name that is already taken, or does not register
    its entry point's name is a user error naming it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for kind, group in ENTRY_POINT_GROUPS.items():
        for entry_point in importlib.metadata.entry_points(group=group):
            dist = entry_point.dist
            plugin = import_plugin(entry_point.module, (dist.name, dist.version) if dist else None)
            if plugin_of(kind, entry_point.name) != plugin:
                raise UserError(f"plugin {plugin.distribution}: entry point {entry_point.name!r} in group {group} "
                                f"names module {plugin.module}, which registers no {kind} {entry_point.name!r}")
    for module in filter(None, os.environ.get(PLUGIN_MODULES_ENV, "").split(",")):
        import_plugin(module)


def import_plugin(module: str, distribution: tuple[str, str] | None = None) -> Plugin:
    """Import a plugin module (once) and return it as a ``Plugin``; everything its import registers is its own."""
    if module in _imported:
        return _imported[module]
    name, version = distribution or _distribution_of(module)
    plugin = Plugin(module, name, version)
    label = f"plugin {module}" if name == module else f"plugin {module} (distribution {name})"
    backbones_before = _timm_models()
    _importing.append(plugin)
    try:
        importlib.import_module(module)
    except UserError as err:
        raise UserError(f"{label} {err}") from None
    except Exception as err:
        first_line = printable(str(err).strip().splitlines()[0]) if str(err).strip() else ""
        raise UserError(f"{label} failed to import: {type(err).__name__}: {first_line}") from None
    finally:
        _importing.pop()
    for backbone, entrypoint in _timm_models().items():
        if backbones_before.get(backbone) is entrypoint or _is_repros(entrypoint):
            continue
        if backbone in backbones_before:
            raise UserError(f"{label} registers backbone {backbone!r}, which timm already has")
        _backbones[backbone] = plugin
    _imported[module] = plugin
    return plugin


def use_plugin_modules(modules: list[str]) -> None:
    """Import ``--plugin`` modules now (a bad one fails before anything runs) and name them in ``REPRO_PLUGINS``
    for the processes this one starts (workers, cluster jobs)."""
    for module in modules:
        import_plugin(module)
    if modules:
        named = [m for m in os.environ.get(PLUGIN_MODULES_ENV, "").split(",") if m]
        os.environ[PLUGIN_MODULES_ENV] = ",".join(dict.fromkeys([*named, *modules]))


def plugin_of(kind: str, name: str) -> Plugin | None:
    """The plugin that registered ``name`` as a ``kind`` (``ENTRY_POINT_GROUPS``' keys); None for built-ins and
    timm's own models."""
    load_plugins()
    if kind == "backbone":
        return _backbones.get(name.split(".")[0])
    registry = _REGISTRIES.get(kind)  # None: nothing has imported that registry's package, so nothing is in it
    return registry.source(name) if registry else None


def registry_names(kind: str) -> list[str]:
    """Every name registered as a ``kind``, repro's own and plugins'."""
    return _REGISTRIES[kind].names()


def plugin_backbones() -> list[str]:
    """The timm model names plugins registered."""
    load_plugins()
    return sorted(_backbones)


def _distribution_of(module: str) -> tuple[str, str]:
    """The installed distribution that holds ``module``'s top-level package; else the module itself, versioned by
    its file's hash (a changed file is a new version). A module that cannot be found is a user error."""
    top = module.partition(".")[0]
    for name in importlib.metadata.packages_distributions().get(top, []):
        return name, importlib.metadata.version(name)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise UserError(f"plugin {module} failed to import: {type(err).__name__}: {printable(str(err))}") from None
    if spec is None:
        raise UserError(f"plugin {module} failed to import: no module named {module!r}")
    origin = Path(spec.origin) if spec.origin and Path(spec.origin).is_file() else None
    return module, "file-sha256:" + (hashlib.sha256(origin.read_bytes()).hexdigest()[:16] if origin else "unknown")


def _is_repros(entry: object) -> bool:
    """Whether ``entry`` is defined in repro itself: a plugin's import may import repro's own registering modules
    for the first time, and what they register stays repro's."""
    return getattr(entry, "__module__", "").partition(".")[0] == "repro"


def _timm_models() -> dict[str, Callable[..., Any]]:
    """timm's registered model names and their entrypoints (a plugin backbone is a new name)."""
    from timm.models import list_models, model_entrypoint

    return {name: model_entrypoint(name) for name in list_models()}
