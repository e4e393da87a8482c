"""erofs-mount(8), written from the click commands themselves, so it never drifts from ``--help``.

``erofs-mount man`` prints it; ``scripts/setup`` installs it where man(1)
finds it for the virtualenv (``.venv/share/man/man8``). One section per
command and subcommand, its options as ``.TP`` items, the exit codes from
``_errors.EXIT_CODES``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import click

from ._errors import EXIT_CODES


def _escape(text: str) -> str:
    """roff's special characters: a leading dot or quote starts a request; backslash escapes; - is a hyphen."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _item(term: str, text: str) -> str:
    """A tagged paragraph: ``term`` in bold, ``text`` under it."""
    return f".TP\n.B {_escape(term)}\n{_escape(text)}"


def _paragraphs(help_text: str) -> Iterator[str]:
    """Help text as roff paragraphs; click's \\b blocks (kept as typed) as no-fill blocks."""
    for block in help_text.strip().split("\n\n"):
        if block.lstrip().startswith("\b"):
            yield ".PP\n.nf\n" + _escape("\n".join(block.split("\n")[1:])) + "\n.fi"
        else:
            yield ".PP\n" + _escape(" ".join(line.strip() for line in block.splitlines()))


def _command(ctx: click.Context, name: str, command: click.Command) -> Iterator[str]:
    usage = " ".join(command.collect_usage_pieces(ctx))
    yield f".SS {_escape(name)}"
    yield f".B {_escape(name)}\n{_escape(usage)}"
    yield from _paragraphs(command.help or "")
    help_option = command.get_help_option(ctx)
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None or param is help_option:
            continue
        yield f".TP\n.B {_escape(record[0])}\n{_escape(record[1])}"
    if isinstance(command, click.Group):
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from _command(ctx, f"{name} {sub_name}", sub)


def render(group: click.Group, prog: str = "erofs-mount", version: str = "") -> str:
    """The whole page, in man(7) roff."""
    ctx = click.Context(group, info_name=prog)
    date = datetime.date.today().isoformat()
    lines = [f'.TH {prog.upper()} 8 "{date}" "{prog} {version}" "System Administration"',
             ".SH NAME", f"{_escape(prog)} \\- {_escape((group.help or '').splitlines()[0].rstrip('.'))}",
             ".SH SYNOPSIS", f".B {prog}\n[\\-\\-debug] COMMAND [OPTIONS] [ARGUMENTS]",
             ".SH DESCRIPTION", *_paragraphs("\n\n".join((group.help or "").split("\n\n")[1:])),
             ".SH OPTIONS"]
    for param in group.get_params(ctx):  # the group's own: --version, --debug, --help
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is not None:
            lines.append(f".TP\n.B {_escape(record[0])}\n{_escape(record[1])}")
    lines += [".SH COMMANDS"]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            lines += _command(ctx, f"{prog} {name}", command)
    lines += [".SH MOUNT HELPER", _escape(
        "Run as mount.erofs-mount (a console script; link it as /sbin/mount.erofs-mount), erofs-mount is "
        "mount(8)'s helper for the type erofs-mount: mount -t erofs-mount SOURCE DIR -o OPTIONS, and "
        "/etc/fstab lines of that type. Options are mount flags, source options, connections=, "
        "dead-timeout= and block-size=; mount(8)'s own (_netdev, nofail, defaults, x-*) are ignored."),
        _item("-f", "mount(8)'s fake mount: nothing is done"),
        _item("-s, -n, -v, -r", "accepted, and change nothing (an EROFS mount is read-only)"),
        _item("-w, -N", "refused: EROFS cannot be written; another mount namespace is not supported"),
        _item("-h, --help", "the helper's own usage")]
    lines += [".SH JSON OUTPUT", _escape(
        'Every --json prints one document, {"schema_version": 1, "command": NAME, "result": ...}; the version '
        "changes only when a field changes meaning or goes away (the user guide lists each command's result).")]
    lines += [".SH FILES",
              _item("/run/erofs-mount/nbd-*.toml", "the recovery record of each attached device (EROFS_MOUNT_RUN_DIR)"),
              _item("/run/erofs-mount/nbd-*.log", "a daemon's log when it runs outside systemd (1 MiB, then "
                    "started again); under systemd, the journal of its unit"),
              _item("/var/cache/erofs-mount", "indexes, merged layouts, span hashes, unpacked streams, the span store "
                    "(EROFS_MOUNT_CACHE_DIR)")]
    lines += [".SH EXIT STATUS"] + [f".TP\n.B {code}\n{_escape(meaning)}" for code, meaning in EXIT_CODES.items()]
    lines += [".SH ENVIRONMENT", ".TP\n.B EROFS_MOUNT_CACHE_DIR\nthe cache directory (default /var/cache/erofs-mount)",
              ".TP\n.B EROFS_MOUNT_LOAD_PLUGINS\nload only these plugins (comma-separated names)",
              ".TP\n.B EROFS_MOUNT_RUN_DIR\nwhere records live (default /run/erofs-mount)",
              ".TP\n.B EROFS_MOUNT_NBD_INTERFACE\nnetlink or ioctl: the nbd interface to use (default: netlink "
              "when the kernel has it)",
              ".TP\n.B EROFS_MOUNT_SYSTEMD\nno: do not run daemons as systemd services",
              _item("EROFS_MOUNT_OCI_USERNAME, EROFS_MOUNT_OCI_PASSWORD", "the registry's credentials, with "
                    "-o credentials=env (never written to a record: reattach reads them again)"),
              ".SH SHELL COMPLETION", _escape(
                  "bash: eval \"$(_EROFS_MOUNT_COMPLETE=bash_source erofs-mount)\"; zsh: zsh_source; "
                  "fish: fish_source (see the user guide)."),
              ".SH SEE ALSO", "mount(8), umount(8), fstab(5), nbd-client(8), mkfs.erofs(1)"]
    return "\n".join(lines) + "\n"
