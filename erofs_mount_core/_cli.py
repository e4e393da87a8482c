"""The ``erofs-mount`` command line: thin click commands over ``_lifecycle`` and ``_serve``.

Errors end as one ``Error: ...`` line on stderr and the error's exit code;
``--debug`` shows the traceback too. Heavy modules (pyroute2, plugins'
HTTP clients) load inside the commands that need them, so ``--help`` and
``plugins`` stay fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from . import _render as render
from ._errors import ErofsMountError

F = TypeVar("F", bound=Callable[..., Any])


class _Seconds(click.FloatRange):
    """A number of seconds in a range: a FloatRange that also refuses nan and inf (which compare false
    with any bound, and so pass FloatRange)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


def _fail(message: str, code: int) -> NoReturn:
    message = render.shell_quoted(message)
    click.echo(f"Error: {message}" if code else message, err=True)  # code 0: nothing to do, not an error
    sys.exit(code)


#: the version of every --json document's envelope; raised only when a field changes meaning or goes
JSON_SCHEMA_VERSION = 1


def _echo_json(command: str, result: Any) -> None:
    """Every --json output: ``{"schema_version": 1, "command": ..., "result": ...}`` (docs/user-guide.md)."""
    click.echo(json.dumps({"schema_version": JSON_SCHEMA_VERSION, "command": command, "result": result},
                          indent=2, default=str))  # a plugin's pins may hold TOML datetimes


def _exit_for(errors: list[ErofsMountError]) -> None:
    """Exit for an --all command: 0 when none failed, their shared code, or 1 when they differ."""
    codes = {e.exit_code for e in errors}
    if codes:
        sys.exit(codes.pop() if len(codes) == 1 else 1)


def _exit_codes_epilog() -> str:
    from ._errors import EXIT_CODES

    return "\b\nExit codes:\n" + "\n".join(f"  {code:<4}{meaning}" for code, meaning in EXIT_CODES.items())


def _errors_as_lines(fn: F) -> F:
    """Turn every expected failure into one stderr line and its exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ErofsMountError as exc:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``-o`` as mount(8) reads it: comma-separated, a value in double quotes may hold commas."""
    from ._mounts import split_option_list

    options = {}
    for pair in pairs:
        for item in split_option_list(pair):
            if not item:
                continue  # "-o ''", "a,,b": nothing, as mount(8) reads it
            key, sep, value = item.partition("=")
            if not key:
                from ._errors import UsageError

                raise UsageError(f"-o {item!r} has no name (options are NAME or NAME=VALUE)")
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            options[key.strip()] = value if sep else ""
    return options


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The core's version and each installed plugin's distribution and version (no plugin is imported)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from ._plugins import installed

    click.echo(f"erofs-mount {version('erofs-mount')}")
    for name, dist in installed():
        click.echo(f"  plugin {name}: {dist}")
    ctx.exit()


class _WithPluginCommands(click.Group):
    """The core's commands, and the ones plugins add (``erofs_mount_register_commands``), which load only when
    a name is not the core's or every command is listed."""

    _loaded = False

    def _load_plugins(self) -> None:
        if not self._loaded:
            self._loaded = True
            from ._plugins import PluginHost

            PluginHost().register_commands(self, _errors_as_lines)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._loaded:
            self._load_plugins()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)


@click.group(cls=_WithPluginCommands, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_exit_codes_epilog())
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version of erofs-mount and of each installed plugin, and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Mount EROFS images through the Linux NBD driver.

    A daemon serves each image to the kernel from a source: a local file, an
    image in an OCI registry (an ordinary image of tar layers, merged, or an
    EROFS layer), a tar archive, or any source a plugin adds. If the daemon
    dies, the kernel holds the reads until 'erofs-mount reattach' hands it a
    new one.
    """


@cli.command()
@click.option("-s", "--source", "spec", metavar="SCHEME:LOCATION",
              help="What to serve, e.g. local:/srv/app.erofs ('erofs-mount plugins' lists the schemes); "
                   "or give it as the first argument.")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY[=VALUE][,...]",
              help="A mount flag (nosuid and nodev are the default; suid, dev, noexec, noatime...) "
                   "or a source option, passed to the source's plugin. Repeatable.")
@click.option("--connections", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Kernel connections (sockets), each served by 8 threads.")
@click.option("--dead-timeout", default=86400, show_default=True, type=click.IntRange(1, 2**31),
              help="Seconds the kernel holds reads while no daemon is attached (the window for reattach).")
@click.option("--block-size", default=512, show_default=True, type=click.Choice(["512", "1024", "2048", "4096"]),
              help="Logical block size of the nbd device.")
@click.option("--stack", is_flag=True, help="Mount over MOUNTPOINT even if something is mounted there "
                                            "(refused otherwise; umount then ends the top mount first).")
@click.option("--json", "as_json", is_flag=True, help="Print the device as 'list --json' shows it.")
@click.argument("arguments", nargs=-1, metavar="[SOURCE] MOUNTPOINT")
@_errors_as_lines
def mount(spec: str | None, option_pairs: tuple[str, ...], connections: int, dead_timeout: int,
          block_size: str, stack: bool, as_json: bool, arguments: tuple[str, ...]) -> None:
    """Attach SOURCE to an nbd device and mount it read-only on MOUNTPOINT.

    Prints the device. The mount is nosuid,nodev unless -o suid or -o dev
    asks otherwise: an image's setuid files and device nodes have no power
    on the host. A recovery record is kept under /run/erofs-mount while the
    device is attached. 'erofs-mount plugins SCHEME' documents a
    source type's -o options; mount(8) and /etc/fstab reach this command
    through the mount.erofs-mount helper (the user guide says how).
    """
    from . import _lifecycle as lifecycle

    if len(arguments) != (1 if spec else 2):
        raise click.UsageError("give SOURCE and MOUNTPOINT (or -s SOURCE and MOUNTPOINT)")
    spec = spec or arguments[0]
    settings = lifecycle.DeviceSettings(connections=connections, dead_timeout=dead_timeout,
                                        block_size=int(block_size))
    device = lifecycle.mount(spec, arguments[-1], _parse_options(option_pairs), settings, stack=stack)
    _echo_device(device, as_json, "mount")


def _echo_device(device: str, as_json: bool, command: str) -> None:
    from ._listing import describe

    if as_json:
        _echo_json(command, describe(device))
    else:
        click.echo(device)


@cli.command()
@click.argument("target")
@click.option("-l", "--lazy", is_flag=True,
              help="Detach the mount now; the device and its daemon end when its last user lets go.")
@_errors_as_lines
def umount(target: str, lazy: bool) -> None:
    """Unmount TARGET (a mountpoint or /dev/nbdN), disconnect the device and end its daemon.

    A mountpoint whose device is mounted elsewhere too (a bind mount) is
    unmounted alone, and the device keeps serving the others: the command
    names them.
    """
    from . import _lifecycle as lifecycle

    for note in lifecycle.umount(target, lazy=lazy).notes:
        click.echo(note, err=True)


@cli.command()
@click.argument("device", required=False)
@click.option("--all", "all_", is_flag=True, help="Every erofs-mount device whose daemon is gone.")
@click.option("--force", is_flag=True,
              help="End a daemon that holds DEVICE but fails its liveness probe (no answer within 5 s, "
                   "or a request in its hands longer than --stuck-after), then reattach.")
@click.option("--stuck-after", type=_Seconds(min=1), default=120, show_default=True, metavar="SECONDS",
              help="With --force: how long a request may stay in a daemon's hands.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_as_lines
def reattach(device: str | None, all_: bool, force: bool, stuck_after: float, as_json: bool) -> None:
    """Serve DEVICE (or MOUNTPOINT) again after its daemon died; blocked reads then complete.

    Rebuilds the source from the device's recovery record and refuses if the
    bytes would differ. A device whose daemon is alive is left alone (that is
    no error: there is nothing to do), unless --force and the daemon fails
    its liveness probe (stopped, hung, stuck on a source that stopped
    answering): it is killed and replaced.
    """
    from . import _lifecycle as lifecycle
    from ._errors import AlreadyServing

    if bool(device) == all_:
        raise click.UsageError("give a DEVICE or --all")
    if force and all_:
        raise click.UsageError("--force is for one DEVICE")
    if not force and click.get_current_context().get_parameter_source("stuck_after") == \
            click.core.ParameterSource.COMMANDLINE:
        from ._errors import UsageError

        raise UsageError("--stuck-after goes with --force (it says when a live daemon counts as stuck)")
    if device:
        try:
            index = lifecycle.reattach(device, force=force, stuck_after=stuck_after)
        except AlreadyServing as exc:
            click.echo(str(exc), err=True)
            from ._devices import device_index

            index = device_index(device)
        _echo_device(f"/dev/nbd{index}", as_json, "reattach")
        return
    outcomes = lifecycle.reattach_all()
    if as_json:
        _echo_json("reattach", [{"device": f"/dev/nbd{o.index}", "reattached": o.error is None and o.due_in is None,
                                 "error": None if o.error is None else str(o.error),
                                 "exit_code": None if o.error is None else o.error.exit_code,
                                 "next_attempt_in": o.due_in} for o in outcomes])
    for outcome in outcomes:
        if outcome.error is not None:
            click.echo(f"Error: /dev/nbd{outcome.index}: {outcome.error}", err=True)
        elif outcome.due_in is not None:
            click.echo(f"/dev/nbd{outcome.index}: its reattach keeps failing; next attempt in "
                       f"{outcome.due_in:.0f} s (or: erofs-mount reattach /dev/nbd{outcome.index})", err=True)
        elif not as_json:
            click.echo(f"/dev/nbd{outcome.index}")
    _exit_for([o.error for o in outcomes if o.error is not None])


@cli.command()
@click.argument("device", required=False)
@click.option("--all", "all_", is_flag=True, help="Every erofs-mount device whose daemon is alive.")
@_errors_as_lines
def restart(device: str | None, all_: bool) -> None:
    """Hand DEVICE to a new daemon running the installed erofs-mount: a hot upgrade.

    The running daemon finishes the requests it has, then gives the new one
    its connections; the kernel never sees them end, so no read fails. Prints
    each device with its daemon's pid before and after.
    """
    from . import _lifecycle as lifecycle

    if bool(device) == all_:
        raise click.UsageError("give a DEVICE or --all")
    outcomes = [lifecycle.restart(device)] if device else lifecycle.restart_all()
    for outcome in outcomes:
        if outcome.error is None:
            click.echo(f"/dev/nbd{outcome.index}: daemon {outcome.old_pid} -> {outcome.new_pid}")
        else:
            click.echo(f"Error: /dev/nbd{outcome.index}: {outcome.error}", err=True)
    _exit_for([o.error for o in outcomes if o.error is not None])


@cli.command()
@click.option("--stuck-after", type=_Seconds(min=0), default=120, show_default=True, metavar="SECONDS",
              help="Every 30 s, end and replace a live daemon that does not answer within 5 s or has had a "
                   "request in its hands longer than this (0: never).")
@_errors_as_lines
def watch(stuck_after: float) -> None:
    """Reattach a device the moment its daemon dies, until stopped.

    Listens to the kernel's nbd events (a connection died) and reattaches
    that device at once; a device whose reattach fails is tried again after
    10 s, 20 s... up to 10 minutes, as 'reattach --all' does. Every 30 s it
    also probes each live daemon and replaces one that hangs. Logs a line per
    event and attempt on stderr (the journal, under systemd).
    """
    import logging

    from . import _logging
    from ._watch import watch as run

    _logging.configure(sys.stderr, "erofs-mount watch: %(message)s", level=logging.INFO)
    run(stuck_after)


@cli.command()
@click.argument("device", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_as_lines
def stats(device: str | None, as_json: bool) -> None:
    """Show what each device's daemon has served: requests, bytes, errors, latency, source counts."""
    from . import _lifecycle as lifecycle

    found = lifecycle.device_stats(device)
    if as_json:
        _echo_json("stats", found)
        return
    if not found:
        click.echo("no erofs-mount devices attached")
        return
    for name, counts in found.items():
        click.echo(f"/dev/{name}: " + ("no daemon answers" if not counts else render.stats_text(counts)))


@cli.command()
@_errors_as_lines
def metrics() -> None:
    """Print every device's counts in the Prometheus text format.

    For node_exporter's textfile collector (write it to a .prom file every
    few seconds) or any HTTP endpoint that serves this output.
    """
    from . import _lifecycle as lifecycle
    from ._metrics import prometheus

    click.echo(prometheus(lifecycle.device_stats(command="metrics")), nl=False)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-w", "--wide", is_flag=True, help="Also the mount flags, the daemon's pid and the record.")
@_errors_as_lines
def list_(as_json: bool, wide: bool) -> None:
    """Show attached nbd devices: state, size, since when served, source, daemon.

    \b
    States:
      serving   a daemon serves it
      dead      its daemon is gone; reads wait until 'erofs-mount reattach'
      refused   its last reattach failed, or its daemon found bytes that are
                not the pinned ones and fails every read (the line below says why)
      expired   past its dead-connection timeout the kernel fails its reads;
                'erofs-mount reattach' restores it
      detached  the device was disconnected; only its record is left
      other     not attached by erofs-mount
    """
    from . import _lifecycle as lifecycle
    from . import _listing as listing

    lifecycle.require_root("list")  # the records are root's alone: a user would see rows of errors
    rows = listing.list_devices()
    if as_json:
        _echo_json("list", rows)
        return
    if not rows:
        click.echo("no nbd devices attached")
        return
    table = [("DEVICE", "STATE", "SIZE", "SINCE", "CONN", "TIMEOUT", "SERVED", "MOUNTPOINT", "SOURCE")]
    for row in rows:
        source = row["source"] or "-"
        if row["serving"] and row["serving"] not in source:
            source += f" = {row['serving']}"
        size, maybe = render.size_text, render.maybe
        table.append((row["device"] or "-", row["state"], maybe(row["size"], size),
                      (row["since"] or "-").replace("+00:00", "Z"), maybe(row["connections"], str),
                      maybe(row["dead_timeout"], lambda t: f"{t}s"), maybe(row["read_bytes"], size),
                      ",".join(row["mountpoints"]) or "-", source))
        if wide:
            table[-1] = (*table[-1][:-1], row["mount_options"] or "-", str(row["daemon_pid"] or "-"),
                         row["record"] or "-", source)
    if wide:
        table[0] = (*table[0][:-1], "FLAGS", "PID", "RECORD", "SOURCE")
    click.echo("\n".join(render.table_lines(table)))
    for row in rows:
        name = row["device"] or row["record"]
        if row["state"] != listing.SERVING and row["why"]:
            fix = f" (run: {row['reattach_command']})" if row["reattach_command"] else ""
            click.echo(f"{name}: {row['state']}: {row['why']}{fix}")
        if row["last_error"]:
            click.echo(f"{name}: last error: {row['last_error']}")


@cli.command()
@click.argument("scheme", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_as_lines
def plugins(scheme: str | None, as_json: bool) -> None:
    """List installed plugins, the source types they provide, and plugins that failed to load.

    With SCHEME, show that source type's documentation: its location syntax
    and its -o options.
    """
    from ._plugins import PluginHost

    host = PluginHost()
    if scheme:
        text = host.documentation(scheme)
        if as_json:
            info = host.owner(scheme)
            _echo_json("plugins", {"scheme": scheme, "plugin": info.name, "distribution": info.distribution,
                                   "version": info.version, "summary": info.schemes[scheme],
                                   "options": info.options.get(scheme),
                                   "wraps_sources": scheme in info.wrapping, "documentation": text})
        else:
            click.echo(text)
        return
    infos = host.plugins
    conflicts = host.conflicts()
    if as_json:
        _echo_json("plugins", {"plugins": [i.to_json() for i in infos], "conflicts": conflicts})
        return
    if not infos:
        click.echo("no plugins installed (pip install erofs-mount-local)")
    else:
        table = [("SCHEME", "PLUGIN", "DISTRIBUTION", "STATUS", "WHAT")]
        for info in infos:
            dist = f"{info.distribution} {info.version}" if info.distribution else "-"
            if info.error:
                table.append(("-", info.name, dist, "failed", info.error))
            elif not info.schemes:
                table.append(("-", info.name, dist, "ok", "commands only (erofs-mount --help lists them)"))
            for scheme, description in info.schemes.items():
                table.append((scheme, info.name, dist, "conflict" if scheme in conflicts else "ok", description))
        click.echo("\n".join(render.table_lines(table)))
    for scheme, names in conflicts.items():
        click.echo(f"conflict: scheme {scheme!r} is claimed by {', '.join(names)}; it cannot be used")


@cli.command(name="systemd-units")
@click.option("--into", "directory", default="/etc/systemd/system", show_default=True, type=click.Path(),
              help="Where to write the units.")
@click.option("--command", "command", metavar="PATH", help="The erofs-mount the units run (default: this one).")
@_errors_as_lines
def systemd_units(directory: str, command: str | None) -> None:
    """Write the units that reattach devices, running this erofs-mount by its real path.

    erofs-mount-watch.service reattaches a device the moment its daemon dies;
    erofs-mount-reattach.timer (with its service) runs 'reattach --all' every
    10 s as a fallback. Then: systemctl daemon-reload; systemctl enable --now
    erofs-mount-watch.service erofs-mount-reattach.timer
    """
    from pathlib import Path

    from . import _systemd_units as units

    for path in units.write(Path(directory), command or units.this_command()):
        click.echo(str(path))


@cli.command(name="man")
def man_page() -> None:
    """Print the erofs-mount(8) manual page (roff), made from these commands' help.

    scripts/setup installs it for the virtualenv; elsewhere:
    erofs-mount man > /usr/local/share/man/man8/erofs-mount.8
    """
    from importlib.metadata import version

    from ._manpage import render

    click.echo(render(cli, version=version("erofs-mount")), nl=False)


@cli.group()
def cache() -> None:
    """The cache directory: indexes, merged layouts, span hashes, unpacked streams, the span store.

    It is /var/cache/erofs-mount unless EROFS_MOUNT_CACHE_DIR names another.
    Anything in it may be deleted; what a mount needs again is rebuilt.
    """


@cache.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_as_lines
def cache_list(as_json: bool) -> None:
    """Show the cache's files, least recently used first, and which are in use by a daemon.

    The span store's files show as one row per stream (its sha256 and span size).
    """
    from . import _cache, _span_store

    root = _cache.cache_root()
    store = _span_store.cache_store()
    found = [e for e in _cache.entries() if store not in e.path.parents]
    streams = _span_store.stored()
    if as_json:
        _echo_json("cache list", {"directory": str(root), "entries": [
            {"path": str(e.path), "bytes": e.size, "used": e.used, "in_use": e.in_use} for e in found],
            "span_store": [{"stream": f"sha256:{s.stream}", "span_size": s.span_size, "spans": s.spans,
                            "bytes": s.bytes, "used": s.used} for s in streams]})
        return
    if not found and not streams:
        click.echo(f"{root}: empty")
        return
    import time

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))

    table = [("SIZE", "LAST USED", "IN USE", "FILE")]
    rows = [(e.used, (render.size_text(e.size), when(e.used), "yes" if e.in_use else "-",
                      str(e.path.relative_to(root)))) for e in found]
    rows += [(s.used, (render.size_text(s.bytes), when(s.used), "-",
                       f"{s.name} ({s.spans} spans of {render.size_text(s.span_size)})")) for s in streams]
    table += [row for _used, row in sorted(rows, key=lambda r: r[0])]
    click.echo("\n".join(render.table_lines(table)))
    total = sum(e.size for e in found) + sum(s.bytes for s in streams)
    click.echo(f"{render.size_text(total)} in {len(found) + sum(s.spans for s in streams)} files under {root}")


@cache.command(name="prune")
@click.option("--max-size", default="0", show_default=True, metavar="SIZE",
              help="Keep at most this much (bytes, or with K, M, G, T); files in use are kept.")
@_errors_as_lines
def cache_prune(max_size: str) -> None:
    """Delete the least recently used cache files not in use until the cache is at most SIZE."""
    from . import _cache

    removed = _cache.prune(render.parse_size(max_size))
    click.echo(f"removed {len(removed)} files, {render.size_text(sum(e.size for e in removed))}")


@cli.command()
@click.option("-s", "--source", "spec", required=True, metavar="SCHEME:LOCATION", help="What to serve.")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY=VALUE[,...]",
              help="A source option, passed to the source's plugin. Repeatable.")
@click.option("--socket", "socket_path", metavar="PATH", help="Listen on a unix socket.")
@click.option("--listen", metavar="HOST:PORT", help="Listen on TCP (port 0: any free port).")
@click.option("--run", "command", metavar="COMMAND",
              help="Serve only while COMMAND runs (through the shell, with $uri naming the export); "
                   "exit with its status. Without --socket or --listen, a private unix socket.")
@click.option("--max-clients", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Clients served at once; more are turned away.")
@click.option("--handshake-timeout", default=30.0, show_default=True, type=_Seconds(0.1, 3600),
              help="Seconds a client has to finish the handshake.")
@click.option("--any-bytes", is_flag=True,
              help="Serve whatever the source holds (by default only an EROFS image, as mount checks).")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
@_errors_as_lines
def serve(spec: str, option_pairs: tuple[str, ...], socket_path: str | None, listen: str | None,
          command: str | None, max_clients: int, handshake_timeout: float, any_bytes: bool, quiet: bool) -> None:
    """Export SOURCE read-only to NBD clients (qemu, nbd-client, libnbd tools).

    Speaks the fixed newstyle handshake and offers one export under any name.
    Runs in the foreground until SIGINT or SIGTERM, or with --run until
    COMMAND exits, e.g. --run 'nbdcopy "$uri" app.erofs'.
    """
    import logging

    from . import _logging, _serve

    _logging.configure(sys.stderr, "erofs-mount serve: %(message)s",
                       level=logging.WARNING if quiet else logging.INFO)
    if command is not None and not command.strip():
        from ._errors import UsageError

        raise UsageError("--run: give a command to run")
    status = _serve.run(spec, _parse_options(option_pairs), socket_path=socket_path, listen=listen,
                        command=command, limits=_serve.ClientLimits(max_clients, handshake_timeout),
                        any_bytes=any_bytes)
    sys.exit(status)
