"""A plugin of commands alone (no source type) loads, lists, and adds its commands."""

from __future__ import annotations

import click
from click.testing import CliRunner

from erofs_mount_core import hookimpl
from erofs_mount_core._plugins import PluginHost


class CommandsOnly:
    @hookimpl
    def erofs_mount_register_commands(self, cli: click.Group) -> None:
        @cli.command(name="hello-plugin")
        def hello() -> None:
            click.echo("hello from a plugin")


class Nothing:
    """Neither a source type nor a command: not a plugin."""


def test_a_plugin_of_commands_alone_loads_and_one_of_nothing_is_refused() -> None:
    host = PluginHost(entry_points=[])
    info = host.register(CommandsOnly(), "commands")
    assert info.error is None and info.schemes == {}
    refused = host.register(Nothing(), "nothing")
    assert refused.error and "erofs_mount_schemes" in refused.error

    group = click.Group()
    host.register_commands(group, lambda f: f)
    assert CliRunner().invoke(group, ["hello-plugin"]).output == "hello from a plugin\n"
