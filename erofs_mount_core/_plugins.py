"""The plugin host: finds source plugins, isolates broken ones, routes schemes.

Each entry point of the ``erofs_mount`` group is loaded and registered on its
own, so a plugin that fails to import or does not fit the hook specs is
reported (``erofs-mount plugins``, a warning) and the others keep working.
Each scheme belongs to exactly one plugin; two plugins claiming one scheme
make that scheme unusable until one is removed, because a record names its
scheme and reattach must reach the same plugin that wrote it.

``EROFS_MOUNT_LOAD_PLUGINS=a,b`` loads only the named entry points
(an empty value loads none), as llm and datasette do.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import pluggy

from . import hookspecs
from ._errors import PluginError, SourceError, UnknownSchemeError, UsageError
from ._filters import CacheSettings
from ._source import InnerSource, Source

ENTRY_POINT_GROUP = hookspecs.PROJECT
LOAD_ENV = "EROFS_MOUNT_LOAD_PLUGINS"
MAX_NESTING = 4  # gz:web:... is two; deeper is a loop by mistake


@attrs.frozen
class PluginInfo:
    """What ``erofs-mount plugins`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    schemes: dict[str, str] = attrs.field(factory=dict)
    error: str | None = None
    options: dict[str, list[str]] = attrs.field(factory=dict)
    """``{scheme: its -o option names}`` for the schemes whose plugin declares them"""
    wrapping: list[str] = attrs.field(factory=list)
    """the schemes whose location may name another source (``gz:web:...``)"""

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "failed"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "schemes": self.schemes,
            "status": self.status,
            "error": self.error,
            "options": self.options,
            "wrapping": self.wrapping,
        }


class PluginHost:
    """A pluggy manager plus the scheme table built from its plugins."""

    def __init__(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._infos: list[PluginInfo] = []
        self._owners: dict[str, list[str]] = {}
        installed = list(entry_points if entry_points is not None else _entry_points())
        for ep in _selected(installed):
            self._load(ep)
        for name in _named_but_missing(installed):
            self._failed(name, None, None, PluginError(
                f"{LOAD_ENV} names it, but no installed plugin has that name (installed: "
                f"{', '.join(sorted({ep.name for ep in installed})) or 'none'})"))

    # -- loading ---------------------------------------------------------

    def register(self, plugin: object, name: str, *, distribution: str | None = None,
                 version: str | None = None) -> PluginInfo:
        """Register one plugin object; a failure is recorded, never raised."""
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # pluggy's ValueError / PluginValidationError
            return self._failed(name, distribution, version, exc)
        try:
            unknown = _unknown_hooks(self._pm, plugin)
            if unknown:
                raise PluginError(f"implements hooks that do not exist: {', '.join(unknown)}")
            schemes = self._call_one(name, "erofs_mount_schemes")
            # a plugin of commands alone (a snapshotter, say) provides no source type
            schemes = {} if schemes is None and self._implements(name, "erofs_mount_register_commands") \
                else _check_schemes(schemes)
            options = {scheme: _check_options(scheme, self._call_one(name, "erofs_mount_source_options",
                                                                      scheme=scheme))
                       for scheme in schemes}
            wrapping = sorted(self._call_one(name, "erofs_mount_wrapping_schemes") or ())
            if not set(wrapping) <= set(schemes):
                raise PluginError(f"erofs_mount_wrapping_schemes names schemes it does not provide: "
                                  f"{', '.join(sorted(set(wrapping) - set(schemes)))}")
        except Exception as exc:
            self._pm.unregister(name=name)
            return self._failed(name, distribution, version, exc)
        info = PluginInfo(name, distribution, version, schemes,
                          options={s: o for s, o in options.items() if o is not None}, wrapping=wrapping)
        self._infos.append(info)
        for scheme in schemes:
            self._owners.setdefault(scheme, []).append(name)
        return info

    def _load(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        if self._pm.has_plugin(ep.name):
            self._failed(ep.name, dist, version, PluginError(f"another plugin is already named {ep.name!r}"))
            return
        try:
            plugin = ep.load()
        except Exception as exc:
            self._failed(ep.name, dist, version, exc)
            return
        self.register(plugin, ep.name, distribution=dist, version=version)

    def _failed(self, name: str, dist: str | None, version: str | None, exc: BaseException) -> PluginInfo:
        info = PluginInfo(name, dist, version, error=f"{type(exc).__name__}: {exc}")
        self._infos.append(info)
        return info

    # -- queries ---------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        return list(self._infos)

    def conflicts(self) -> dict[str, list[str]]:
        """Schemes claimed by more than one plugin: ``{scheme: [plugin names]}``."""
        return {s: names for s, names in self._owners.items() if len(names) > 1}

    def schemes(self) -> list[str]:
        return sorted(self._owners)

    def owner(self, scheme: str) -> PluginInfo:
        names = self._owners.get(scheme)
        if not names:
            raise UnknownSchemeError(scheme, self.schemes())
        if len(names) > 1:
            raise PluginError(
                f"source type {scheme!r} is provided by several plugins ({', '.join(names)}); "
                "uninstall all but one"
            )
        return next(i for i in self._infos if i.name == names[0])

    def documentation(self, scheme: str) -> str:
        """The owning plugin's docstring: its location syntax and options."""
        import inspect

        info = self.owner(scheme)
        doc = inspect.getdoc(self._pm.get_plugin(info.name))
        if not doc:
            return f"{scheme}: {info.schemes[scheme]} (the plugin has no further documentation)"
        return doc.replace("``", "")  # reStructuredText's inline literals, as a terminal shows them

    def register_commands(self, group: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Each loaded plugin's commands added to ``group``, their callbacks wrapped by ``wrap`` (one-line
        errors). A plugin that fails, or replaces a command already there, is warned about, and the rest go on."""
        import warnings

        for info in self._infos:
            if info.error is not None:
                continue
            before = dict(group.commands)
            try:
                self._call_one(info.name, "erofs_mount_register_commands", cli=group)
            except Exception as exc:  # noqa: BLE001 - one plugin's failure must not take the others' away
                group.commands = before
                warnings.warn(f"plugin {info.name!r} failed to add its commands: {type(exc).__name__}: {exc}",
                              stacklevel=2)
                continue
            for name, command in list(group.commands.items()):
                if name in before and before[name] is not command:
                    group.commands[name] = before[name]
                    warnings.warn(f"plugin {info.name!r} tried to replace the command {name!r}: kept the first",
                                  stacklevel=2)
                elif name not in before:
                    _wrap_callbacks(command, wrap)

    def warm_up(self) -> None:
        """Each loaded plugin's ``erofs_mount_warm_up``; a failure skips that plugin's, silently (see the hook)."""
        for info in self._infos:
            if info.error is None and self._implements(info.name, "erofs_mount_warm_up"):
                with contextlib.suppress(Exception):
                    self._call_one(info.name, "erofs_mount_warm_up")

    # -- the source hooks, routed to the scheme's owner --------------------

    def open_source(self, scheme: str, location: str, options: Mapping[str, str], *, _depth: int = 0) -> Source:
        """The plugin's source for ``scheme:location``. When the plugin declares its options
        (``erofs_mount_source_options``), the host refuses any other name, and checks the shared cache
        options (``CacheSettings``) it declares, before the plugin is called. For a wrapping scheme whose
        location names another source, that source is opened first, with the options the wrapper does not
        declare, and handed over as ``inner``."""
        info = self.owner(scheme)
        declared = info.options.get(scheme)
        inner_spec = self._inner_spec(info, scheme, location, _depth)
        own = options if inner_spec is None or declared is None else {k: v for k, v in options.items()
                                                                        if k in declared}
        if declared is not None:
            check_options(scheme, own, declared)
        inner = None
        if inner_spec is not None:
            opened = self.open_source(*inner_spec, {k: v for k, v in options.items() if k not in own},
                                      _depth=_depth + 1)
            inner = self._handed_over(inner_spec[0], opened)
        return self._source_from("erofs_mount_open_source",
                                 scheme=scheme, location=location, options=dict(own), inner=inner)

    def deserialize_source(self, scheme: str, state: Mapping[str, Any], *, _depth: int = 0) -> Source:
        """The source a record's state gives back; a wrapping source's inner one (its state's ``"inner"``)
        rebuilt first and handed over as at open."""
        inner = None
        nested = state.get("inner") if scheme in self.owner(scheme).wrapping else None
        if nested is not None:
            if not (isinstance(nested, Mapping) and isinstance(nested.get("scheme"), str)
                    and isinstance(nested.get("state"), Mapping)):
                raise SourceError(f"{scheme}: the record's inner source is incomplete")
            if _depth >= MAX_NESTING:
                raise SourceError(f"{scheme}: the record nests sources more than {MAX_NESTING} deep")
            opened = self.deserialize_source(nested["scheme"], nested["state"], _depth=_depth + 1)
            inner = self._handed_over(nested["scheme"], opened)
        return self._source_from("erofs_mount_deserialize_source", scheme=scheme, state=state, inner=inner)

    def _inner_spec(self, info: PluginInfo, scheme: str, location: str, depth: int) -> tuple[str, str] | None:
        """(scheme, location) of the source a wrapping scheme's location names, if it names one."""
        if scheme not in info.wrapping:
            return None
        inner, sep, rest = location.partition(":")
        if not sep or inner not in self._owners:
            return None
        if depth >= MAX_NESTING:
            raise UsageError(f"{scheme}: {location!r} nests sources more than {MAX_NESTING} deep")
        return inner, rest

    def _handed_over(self, scheme: str, source: Source) -> InnerSource:
        try:
            return InnerSource(scheme, source, self.source_state(scheme, source))
        except BaseException:
            source.close()
            raise

    def source_state(self, scheme: str, source: Source) -> dict[str, Any]:
        """What the record keeps of ``source``: its own ``state()``, or the deprecated serialize hook's answer."""
        name = self.owner(scheme).name
        state = source.state()
        if state is None:
            state = self._call_one(name, "erofs_mount_serialize_source", scheme=scheme, source=source)
        if not isinstance(state, Mapping):
            raise PluginError(f"plugin {name!r} gave no recovery state for its {scheme!r} source "
                              f"(got {type(state).__name__}): implement Source.state()")
        return dict(state)

    def _source_from(self, hook: str, **kwargs: Any) -> Source:
        name = self.owner(kwargs["scheme"]).name
        source = self._call_one(name, hook, **kwargs)
        if not isinstance(source, Source):
            raise PluginError(
                f"plugin {name!r} returned {type(source).__name__} from {hook}, not a Source"
            )
        return source

    def _implements(self, name: str, hook: str) -> bool:
        plugin = self._pm.get_plugin(name)
        return any(impl.plugin is plugin for impl in getattr(self._pm.hook, hook).get_hookimpls())

    def _call_one(self, name: str, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` on the plugin called ``name`` only."""
        plugin = self._pm.get_plugin(name)
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        caller: Callable[..., Any] = self._pm.subset_hook_caller(hook, remove_plugins=others)
        result = caller(**kwargs)
        if isinstance(result, list):  # a collecting hook: one plugin, one result
            return result[0] if result else None
        return result


def _wrap_callbacks(command: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    stack = [command]
    while stack:
        command = stack.pop()
        if command.callback is not None:
            command.callback = wrap(command.callback)
        stack.extend(getattr(command, "commands", {}).values())


def check_options(scheme: str, options: Mapping[str, str], declared: Iterable[str]) -> None:
    """UsageError (one line) for an option name a ``scheme`` source does not declare, or a bad value of the
    shared cache options it declares: what the host checks before it calls a plugin, and what a plugin's
    function for callers without the host calls itself."""
    declared = set(declared)
    unknown = sorted(set(options) - declared)
    if unknown:
        known = f" (known: {', '.join(sorted(declared))})" if declared else " (it takes none)"
        raise UsageError(f"{scheme}: unknown option(s) {', '.join(unknown)}{known}")
    if declared & set(CacheSettings.OPTIONS):
        CacheSettings.parse(options, scheme)  # one clear line for a bad value, whichever plugin


def installed() -> list[tuple[str, str]]:
    """(plugin name, "distribution version") of each installed plugin, by name, none of them imported."""
    return [(ep.name, f"{ep.dist.name} {ep.dist.version}" if ep.dist else "(no distribution)")
            for ep in sorted(_entry_points(), key=lambda e: e.name)]


def plugin_packages() -> list[str]:
    """The top-level packages of the plugins a command would load, none of them imported."""
    return sorted({ep.module.partition(".")[0] for ep in _selected(_entry_points())})


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """The group's entry points from installed distributions, never from the working directory.

    ``python -c`` and ``python -m`` put the working directory on sys.path; a
    ``*.dist-info`` lying there must not name code for root to run.
    """
    cwd = os.path.realpath(os.getcwd())
    path = [p for p in sys.path if p and os.path.realpath(p) != cwd]
    found: list[importlib.metadata.EntryPoint] = []
    seen: set[str] = set()
    for dist in importlib.metadata.distributions(path=path):
        name = _normalized_name(dist)
        if name in seen:  # the first on the path wins, as for imports
            continue
        seen.add(name)
        found += dist.entry_points.select(group=ENTRY_POINT_GROUP)
    return found


def _normalized_name(dist: importlib.metadata.Distribution) -> str:
    """The distribution's name as the index compares names. importlib.metadata reads it from the
    ``*.dist-info`` directory's name (its own ``entry_points()`` dedups by it); parsing every
    METADATA instead took a second per command in an emulated VM, with a hundred installed."""
    name = getattr(dist, "_normalized_name", None)
    if not isinstance(name, str) or not name:
        name = dist.metadata["Name"] or ""
    return re.sub(r"[-_.]+", "_", name).lower()


def _selected(eps: Iterable[importlib.metadata.EntryPoint]) -> list[importlib.metadata.EntryPoint]:
    allow = os.environ.get(LOAD_ENV)
    eps = sorted(eps, key=lambda ep: ep.name)
    if allow is None:
        return eps
    wanted = {n.strip() for n in allow.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in wanted]


def _named_but_missing(eps: Iterable[importlib.metadata.EntryPoint]) -> list[str]:
    """The names ``EROFS_MOUNT_LOAD_PLUGINS`` gives that no installed plugin has (a typo says so)."""
    allow = os.environ.get(LOAD_ENV)
    if allow is None:
        return []
    names = {ep.name for ep in eps}
    return sorted({n.strip() for n in allow.split(",") if n.strip()} - names)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    return [
        hc.name
        for hc in pm.get_hookcallers(plugin) or []
        if not hc.has_spec()
        and not all(i.optionalhook for i in hc.get_hookimpls() if i.plugin is plugin)
    ]


def _check_schemes(schemes: object) -> dict[str, str]:
    if not isinstance(schemes, Mapping) or not schemes:
        raise PluginError("erofs_mount_schemes must return a non-empty {scheme: description} mapping")
    out = {}
    for scheme, description in schemes.items():
        if not (isinstance(scheme, str) and scheme and scheme[0].isalpha()
                and all(c.isalnum() or c in "+-." for c in scheme)):
            raise PluginError(f"invalid scheme name {scheme!r}")
        out[scheme] = str(description)
    return out


def _check_options(scheme: str, names: object) -> list[str] | None:
    """The option names a plugin declares for ``scheme`` (None if it does not say), none of them
    a mount flag or a name of the core's: those never reach a source."""
    from ._mounts import RESERVED

    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):  # type: ignore[attr-defined]
        raise PluginError(f"erofs_mount_source_options({scheme!r}) must return option names")
    names = sorted(names)  # type: ignore[call-overload]
    clash = [n for n in names if n in RESERVED]
    if clash:
        raise PluginError(f"scheme {scheme!r}: source option(s) {', '.join(clash)} clash with mount(8)'s "
                          "or erofs-mount's own -o names; rename them")
    return names
