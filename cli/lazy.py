"""Commands imported when they run, not when `fairgpu` starts: a person waits for every start-up.

Each entry names the module and attribute of a command (a Typer function or a Typer sub-app)
and carries its one-line help, so that `fairgpu --help` lists every command without importing
any of them. Running a command, or asking for its own help, imports its module then.
(tests/cli/test_startup.py checks that the one-line helps match the commands' docstrings.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import typer
from typer import _click as click  # the click typer vendors (since 0.2x): its groups take these
from typer.core import TyperCommand, TyperGroup

from cli import coercion

coercion.install()


@dataclass(frozen=True, slots=True)
class Lazy:
    module: str
    attr: str
    help: str
    context_settings: dict[str, Any] = field(default_factory=dict)

    def load(self, name: str) -> click.Command:
        target = getattr(importlib.import_module(self.module), self.attr)
        if isinstance(target, typer.Typer):
            group = typer.main.get_group(target)
            group.name = name
            return plain(group)
        single = typer.Typer(add_completion=False)  # the root app's options, not each command's
        single.command(name, context_settings=self.context_settings or None)(target)
        return plain(typer.main.get_command(single))


def plain(command: click.Command) -> click.Command:
    """Help as click prints it, with its subcommands': Typer's rich help imports rich and
    markdown-it (a tenth of a second) to print the same words in boxes."""
    if isinstance(command, TyperCommand | TyperGroup):
        command.rich_markup_mode = None
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            plain(sub)
    return command


class _Deferred(TyperCommand):
    """Stands in a listing; the real command takes over as soon as it is parsed."""

    def __init__(self, name: str, entry: Lazy) -> None:
        super().__init__(name, help=entry.help, short_help=entry.help)
        self.entry = entry
        self._real: click.Command | None = None

    @property
    def real(self) -> click.Command:
        if self._real is None:
            assert self.name is not None
            self._real = self.entry.load(self.name)
        return self._real

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        raw = list(args)  # parsing consumes `args`; `submit` asks whether a `--` was among them
        ctx = self.real.make_context(info_name, args, parent=parent, **extra)
        ctx.meta["fairgpu.args"] = raw
        return ctx

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return self.real.get_params(ctx)  # shell completion of its options


class LazyGroup(TyperGroup):
    """A Typer group whose subcommands come from `commands_lazy` (set on a subclass) on demand."""

    commands_lazy: dict[str, Lazy] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.commands_lazy]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.commands_lazy.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        return _Deferred(cmd_name, entry)
