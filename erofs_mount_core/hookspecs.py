"""The plugin contract: every source type is a plugin implementing these hooks.

A plugin is a module (or any object) whose functions carry ``@hookimpl``,
installed as an entry point in the ``erofs_mount`` group::

    [project.entry-points.erofs_mount]
    web = "erofs_mount_web"

The host calls ``erofs_mount_schemes`` on every plugin to learn which source
types it provides, then sends ``open`` and ``deserialize`` calls for a scheme
to the one plugin that claimed it. What reattach needs is the source's own
``Source.state()``, which ``deserialize`` gets back. Hooks are called with
keyword arguments; an implementation may accept a subset of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from ._source import InnerSource, Source

PROJECT = "erofs_mount"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def erofs_mount_schemes() -> Mapping[str, str]:
    """Return the source types this plugin provides: ``{scheme: one-line description}``.

    The scheme is what users write before the colon in ``--source``
    (``local:/srv/app.erofs``) and what recovery records name, so it must
    never change once released.
    """


@hookspec
def erofs_mount_source_options(scheme: str) -> Iterable[str]:
    """Return the names of the ``-o`` options a ``scheme`` source takes (optional hook).

    ``-o`` also carries mount(8)'s flags (``nosuid``, ``noexec``, ``ro``...)
    and the core's own names (``connections``, ``_netdev``...), which reach
    the source never; so the host checks these names when it loads the
    plugin, and a plugin that names one of them fails to load, saying which,
    rather than ship an option no user can give. ``erofs-mount plugins
    SCHEME --json`` lists them.
    """


@hookspec
def erofs_mount_wrapping_schemes() -> Iterable[str]:
    """Return those of this plugin's schemes that read another source's bytes (optional hook), as nbdkit's
    filters sit over its plugins.

    A location of such a scheme may name another source:
    ``gz:web:http://host/app.erofs.gz``. The host opens that inner source first,
    with the ``-o`` options this scheme does not declare, and hands it to
    ``erofs_mount_open_source`` as ``inner`` (an ``InnerSource``); reattach
    rebuilds it from the record and hands it to
    ``erofs_mount_deserialize_source`` the same way. The wrapping source
    keeps ``inner.record()`` in its state under ``"inner"``, and owns the
    inner source from then on: it closes it, also when its own open fails.
    A location that names no installed scheme reaches the plugin as it is,
    with ``inner`` None.
    """


@hookspec
def erofs_mount_warm_up() -> None:
    """Do, once, what makes this plugin's first use in a process slow (optional hook): import the
    libraries it imports lazily, load what every use loads (a CA bundle, say).

    A process that runs many commands as forks of itself (``CommandServer``:
    the containerd snapshotter mounts each layer so) calls it before it
    forks any, so no command pays it. One-off commands never call it. What
    it raises is ignored: the command that needs the thing does it again,
    and says what went wrong.
    """


@hookspec
def erofs_mount_register_commands(cli: click.Group) -> None:
    """Add commands to ``erofs-mount`` (optional hook), as llm's ``register_commands`` does::

        @hookimpl
        def erofs_mount_register_commands(cli):
            cli.add_command(my_group)  # erofs-mount my-group ...

    The host calls it only when a command that is not the core's is asked
    for, or when all are listed (``--help``, the manual page), so a plugin
    with commands costs the core's own commands nothing. A command may not
    replace one of the core's (the host keeps the core's and warns), and an
    ``ErofsMountError`` it raises is one line on stderr with its exit code,
    as the core's own commands do.
    """


@hookspec(firstresult=True)
def erofs_mount_open_source(scheme: str, location: str, options: Mapping[str, str],
                            inner: InnerSource | None) -> Source:
    """Open ``scheme:location`` for serving and return a ``Source``.

    ``options`` holds the ``-o key=value`` pairs of the command line. Raise
    ``SourceError`` (or ``UsageError`` for a malformed location or an
    unknown option) with a message the user can act on.
    """


@hookspec(firstresult=True, warn_on_impl=DeprecationWarning(
    "erofs_mount_serialize_source is deprecated: return the recovery state from Source.state() instead"))
def erofs_mount_serialize_source(scheme: str, source: Source) -> Mapping[str, Any]:
    """Deprecated: implement ``Source.state()``. Asked only when a source's ``state()`` returns None.

    Handing the plugin its own object back meant downcasts and attributes
    stuck on from outside; a source knows its state itself.
    """


@hookspec(firstresult=True)
def erofs_mount_deserialize_source(scheme: str, state: Mapping[str, Any], inner: InnerSource | None) -> Source:
    """Rebuild the source from its ``state()`` mapping, kept in the record, for reattach.

    Raise ``SourceChangedError`` if the bytes are no longer the recorded ones:
    serving other bytes under a mounted filesystem corrupts it.
    """
