"""The ``erofs-mount`` command: run as mount(8)'s helper when called by that name, else the click commands.

Also ``python -m erofs_mount_core._main``, as ``watch`` runs ``restart`` with the interpreter it runs on.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from . import _mount_helper

    if os.path.basename(sys.argv[0]) == _mount_helper.NAME:  # a link named as mount(8)'s helper
        _mount_helper.main()
    from ._cli import cli

    cli(prog_name="erofs-mount")


if __name__ == "__main__":
    main()
