"""``mount.erofs-mount``: the mount(8) helper, so fstab lines and ``mount -t erofs-mount`` work.

mount(8) runs ``/sbin/mount.TYPE SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]``
for a filesystem type it does not know (``man 8 mount``, "External helpers").
This turns that into ``erofs-mount mount``: the options are split into the
ones mount(8) keeps for itself (``_netdev``, ``nofail``, ``defaults``...:
ignored here), device settings (``connections=``, ``dead-timeout=``,
``block-size=``, which a command line gives as flags), and the rest: mount
flags and source options, as ``erofs-mount mount -o`` takes them. mount(8)
adds ``rw`` unless told ``ro``; an EROFS mount is read-only either way.

Installed as the console script ``mount.erofs-mount``; the user guide shows
the one symlink that puts it where mount(8) looks.
"""

from __future__ import annotations

import getopt
import sys

import click

from ._mounts import DEVICE_OPTIONS, IGNORED, IGNORED_PREFIXES, split_option_list

NAME = "mount.erofs-mount"
USAGE = f"{NAME} SOURCE DIR [-sfnvr] [-o OPTIONS] [-t erofs-mount]"
HELP = f"""Usage: {USAGE}

The mount(8) helper of erofs-mount: 'mount -t erofs-mount SOURCE DIR' and
fstab lines of type erofs-mount run it, as root. SOURCE is SCHEME:LOCATION,
of a source type 'erofs-mount plugins' lists.

  -o OPTIONS  mount flags (ro, nosuid, nodev, noexec, context=...), the
              device settings connections=N, dead-timeout=SECONDS and
              block-size=BYTES, and the source's own options; mount(8)'s
              and fstab's own names (defaults, _netdev, nofail, x-*...)
              are ignored
  -f          do nothing (mount(8)'s fake mount)
  -s -n -v -r accepted, and change nothing (EROFS mounts are read-only)
  -w, -N      refused: EROFS cannot be written; other namespaces are not
              supported

See 'erofs-mount mount --help' and erofs-mount(8)."""
#: the device settings and the numbers each takes
_SETTING_VALUES = {"connections": range(1, 65), "dead-timeout": range(1, 2**31),
                   "block-size": (512, 1024, 2048, 4096)}


def main(argv: list[str] | None = None) -> None:
    """Run as mount(8) runs it; exit as ``erofs-mount mount`` does (0 also when SPEC is already there)."""
    from ._cli import cli

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        click.echo(HELP)
        sys.exit(0)
    try:
        command = _mount_command(argv)
    except (getopt.GetoptError, click.UsageError) as exc:
        click.echo(f"Error: {exc} (usage: {USAGE}; {NAME} --help)", err=True)
        sys.exit(2)
    if command is None:
        sys.exit(0)
    cli.main(args=command, prog_name=NAME)


def _mount_command(argv: list[str]) -> list[str] | None:
    """The ``erofs-mount`` arguments for mount(8)'s call, or None when there is nothing to do."""
    opts, args = getopt.gnu_getopt(argv, "sfnvrwo:t:N:")
    if len(args) != 2:
        raise click.UsageError("give SOURCE and DIR")
    spec, directory = args
    given = dict(opts)
    if "-N" in given:
        raise click.UsageError("-N (another mount namespace) is not supported")
    if "-w" in given:
        raise click.UsageError("-w: EROFS is a read-only filesystem")
    if given.get("-t", "erofs-mount").partition(".")[0] != "erofs-mount":
        raise click.UsageError(f"-t {given['-t']}: this helper mounts erofs-mount only")
    if "-f" in given or _already_there(spec, directory):
        return None  # -f: mount(8)'s "fake": everything but the mount itself, which is all this does
    options, settings = [], []
    for item in split_option_list(",".join(v for k, v in opts if k == "-o")):
        key, _sep, value = item.partition("=")
        if not item or key in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        if key in DEVICE_OPTIONS:
            allowed = _SETTING_VALUES[key]
            if not value.isdigit() or int(value) not in allowed:
                raise click.UsageError(f"-o {item}: {key} takes " + (
                    f"a whole number from {allowed.start} to {allowed.stop - 1}" if isinstance(allowed, range)
                    else "one of " + ", ".join(map(str, allowed))))
            settings += [DEVICE_OPTIONS[key], value]
        else:
            options.append(item)
    return ["mount", spec, directory, *settings, *(["-o", ",".join(options)] if options else [])]


def _already_there(spec: str, directory: str) -> bool:
    """True when DIR is the mountpoint of an erofs-mount device serving SPEC: ``mount -a`` run
    twice finds its own mount (the kernel's table names the nbd device, not SPEC) and does nothing."""
    import os

    from ._errors import ErofsMountError
    from ._listing import describe

    if os.geteuid() != 0 or not os.path.ismount(directory):
        return False
    try:
        row = describe(directory)
    except ErofsMountError:  # not ours, not an nbd device: let mount say so
        return False
    return row["source"] == spec
