"""Batch scripts: how a stored script becomes the argv a node runs.

A job submitted as a script (`fairgpu submit train.sh ARGS`) stores the script's text and
`command = [script name, *ARGS]`. The node runs the script's interpreter, from its `#!` line,
on the text itself: `INTERPRETER [ARG] -c SCRIPT NAME ARGS...`. Shells take NAME as `$0` and
ARGS as `$1...`, as if the file had been run. Nothing is written to the node's disk, so a
strictly isolated task needs no file the agent would have to hand over to its uid.

The script and the rest of the argv must fit one exec (protocol/limits.py): `MAX_SCRIPT_BYTES`
leaves room for the interpreter, the name and a few arguments.
"""

from __future__ import annotations

from protocol.limits import MAX_ARGS, check_command

MAX_SCRIPT_BYTES = 60 * 1024


def interpreter(script: str) -> list[str]:
    """The `#!` line's program and its optional argument, as Linux splits it (everything after
    the program is one argument). Raises ValueError when the script has no usable `#!` line."""
    if not script.startswith("#!"):
        raise ValueError("a batch script must start with a #! line (e.g. #!/bin/bash)")
    first = script.split("\n", 1)[0][2:].strip()
    program, _, argument = first.partition(" ")
    if not program:
        raise ValueError("the script's #! line names no interpreter")
    argument = argument.strip()
    return [program, argument] if argument else [program]


def check_script(script: str) -> str:
    size = len(script.encode("utf-8", "surrogatepass"))
    if size > MAX_SCRIPT_BYTES:
        raise ValueError(f"the script is {size} bytes; at most {MAX_SCRIPT_BYTES}")
    if "\x00" in script:
        raise ValueError("the script must not contain NUL bytes")
    interpreter(script)
    return script


def script_command(script: str, command: list[str]) -> list[str]:
    """The argv that runs `script` with `command` = [name, *args]; it fits one exec or raises
    ValueError (the limits of a command: its arguments and their bytes)."""
    argv = [*interpreter(script), "-c", script, *command]
    if len(argv) > MAX_ARGS:
        raise ValueError(f"a script takes at most {MAX_ARGS - len(argv) + len(command)} arguments")
    return check_command(argv)
