"""A batch script's directives: `#FAIRGPU` lines, and the common `#SBATCH` ones.

As in sbatch, directives sit in the script's leading comment block: after the `#!` line, every
line that is blank or a comment, up to the first line of code. `#FAIRGPU` lines take `submit`'s
own options; `#SBATCH` lines take the Slurm spellings people bring with their scripts. Each
directive yields a `submit` parameter and its text; `cli/submit.py` parses the text with the
same parsers as the command line, whose flags win.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

import typer


@dataclass(frozen=True, slots=True)
class Option:
    param: str  # the name of submit's parameter it sets
    takes_value: bool = True
    flag_value: str = "true"  # what a flag without a value sets
    note: str | None = None  # said on stderr instead of setting anything


_FAIRGPU: dict[str, Option] = {
    "-G": Option("gpus"),
    "--gpus": Option("gpus"),
    "-N": Option("nodes"),
    "--nodes": Option("nodes"),
    "-t": Option("time_limit"),
    "--time": Option("time_limit"),
    "-J": Option("name"),
    "--job-name": Option("name"),
    "-A": Option("account"),
    "--account": Option("account"),
    "--priority": Option("priority"),
    "--preemptible": Option("preemptible", takes_value=False),
    "--signal": Option("signal"),
    "--network": Option("network"),
    "--requeue": Option("requeue", takes_value=False),
    "--no-requeue": Option("requeue", takes_value=False, flag_value="false"),
    "-e": Option("env"),
    "--env": Option("env"),
    "--workdir": Option("workdir"),
    "--image": Option("image"),
    "--site": Option("site"),
    "--mem": Option("mem"),
    "--after": Option("after"),
    "-d": Option("dependency"),
    "--dependency": Option("dependency"),
    "--hold": Option("hold", takes_value=False),
    "-a": Option("array"),
    "--array": Option("array"),
}

_IGNORED_OUTPUT = "ignored: the job's output is kept by the server (`fairgpu logs JOB`)"
_SBATCH: dict[str, Option] = {
    "--gres": Option("gres"),
    "--gpus-per-node": Option("gpus"),
    "-N": Option("nodes"),
    "--nodes": Option("nodes"),
    "-t": Option("time_limit"),
    "--time": Option("time_limit"),
    "-J": Option("name"),
    "--job-name": Option("name"),
    "-A": Option("account"),
    "--account": Option("account"),
    "--mem": Option("mem"),
    "-D": Option("workdir"),
    "--chdir": Option("workdir"),
    "-H": Option("hold", takes_value=False),
    "--hold": Option("hold", takes_value=False),
    "-a": Option("array"),
    "--array": Option("array"),
    "-d": Option("dependency"),
    "--dependency": Option("dependency"),
    "--signal": Option("signal"),
    "--requeue": Option("requeue", takes_value=False),
    "--no-requeue": Option("requeue", takes_value=False, flag_value="false"),
    "-o": Option("", note=_IGNORED_OUTPUT),
    "--output": Option("", note=_IGNORED_OUTPUT),
    "-e": Option("", note=_IGNORED_OUTPUT),
    "--error": Option("", note=_IGNORED_OUTPUT),
}
PREFIXES = {"#FAIRGPU": _FAIRGPU, "#SBATCH": _SBATCH}


class DirectiveError(Exception):
    """A directive the CLI cannot use; the message names the file and line."""


@dataclass(slots=True)
class Directives:
    values: dict[str, list[str]] = field(default_factory=dict)
    """submit's parameter -> the texts given for it, in order (a list: `-e` repeats)."""
    notes: list[str] = field(default_factory=list)

    def last(self, param: str) -> str | None:
        given = self.values.get(param)
        return given[-1] if given else None


def leading_block(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the comment block after the `#!` line, up to the first code."""
    for number, line in enumerate(text.splitlines()[1:], start=2):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return
        yield number, stripped


def parse_directives(text: str, source: str) -> Directives:
    found = Directives()
    for number, line in leading_block(text):
        prefix, _, rest = line.partition(" ")
        options = PREFIXES.get(prefix)
        if options is None:
            continue  # an ordinary comment
        where = f"{source}:{number}"
        try:
            tokens = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise DirectiveError(f"{where}: cannot read {line!r}: {exc}") from None
        for option, value in _options(tokens, options, where):
            if option.note is not None:
                found.notes.append(f"{where}: {line} {option.note}")
            else:
                found.values.setdefault(option.param, []).append(value)
    return found


def _options(
    tokens: list[str], options: dict[str, Option], where: str
) -> Iterator[tuple[Option, str]]:
    queue = list(tokens)
    while queue:
        token = queue.pop(0)
        if token.startswith("--"):
            name, has_value, value = token.partition("=")
        elif token.startswith("-") and len(token) > 1:
            name, value = token[:2], token[2:]
            has_value = "=" if value else ""
        else:
            raise DirectiveError(f"{where}: unexpected {token!r}: directives take options only")
        option = options.get(name)
        if option is None:
            raise DirectiveError(f"{where}: unknown directive option {name}")
        if not option.takes_value:
            if has_value:
                raise DirectiveError(f"{where}: {name} takes no value")
            yield option, option.flag_value
            continue
        if not has_value:
            if not queue:
                raise DirectiveError(f"{where}: {name} needs a value")
            value = queue.pop(0)
        yield option, value


def fail_directive(error: DirectiveError) -> typer.Exit:
    typer.echo(f"fairgpu: error: {error}", err=True)
    return typer.Exit(2)
