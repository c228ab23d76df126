"""Between the launch wrapper and docker's (or podman's) `run`: reads the job's image's ENTRYPOINT
and CMD, then becomes the `run` that starts the image through the agent's helper.

Every container the agent starts on docker or podman has the helper (agents/helper/
fairgpu-exec.c) as its `--entrypoint`, which replaces the image's and, on the command line,
drops the image's CMD. So the helper is told what docker would have run: the image's ENTRYPOINT
followed by the job's command, or by the image's CMD where the job gives none. This reads both
from `IMAGE inspect` (pulling the image first when it is not on the node, as `run` would, its
progress on stderr: the task's log), and runs the image by the id it read, so that a tag moved
in between cannot pair one image's ENTRYPOINT with another's files. It runs in the task's start,
not in the agent, because a pull can take minutes.

Run by path (`python -I -S imagelaunch.py CONFIG_JSON`) as root, like agents/sandbox.py, so it
imports nothing but the standard library. It takes no variable of the job's (they are not in its
environment: agents/containerenv.py). A step that fails prints one line on stderr and exits 125,
docker's status for a container it could not start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

FAILED = 125


class LaunchError(RuntimeError):
    """The container cannot be started; the message is one line."""


def qualified(image: str) -> str:
    """`image` named in full as docker names it (its `ParseNormalizedNamed`): a first component
    with a `.` or `:`, or `localhost`, is a registry, anything else is on docker.io, and a
    one-component name there is in `library/`. podman, given a short name, resolves it through
    its own configuration (registries.conf's search list and aliases: Debian's names `centos`
    quay.io's) and, in its local store, matches any image whose name ends the same way, from any
    registry: on a podman node another org's `quay.io/them/trainer:1`, once pulled there, was
    what a job naming `trainer:1` ran, with its variables and data. Named in full, the image
    is the one docker would run and the org's image patterns (`--images`) checked."""
    name, at, digest = image.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    if registry == "index.docker.io":
        registry = "docker.io"
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return f"{registry}/{path}{at}{digest}"


def program(entrypoint: list[str], cmd: list[str], command: list[str]) -> list[str]:
    """What docker runs for `docker run IMAGE COMMAND...`: ENTRYPOINT + (COMMAND or CMD)."""
    return [*entrypoint, *(command or cmd)]


def run_argv(config: dict[str, Any], image_id: str, argv: list[str]) -> list[str]:
    """The runtime's `run` with the helper as the container's entrypoint, running `argv`."""
    helper = [config["helper"], *config["helper_args"], "--"]
    return [*config["run"], "--entrypoint", helper[0], image_id, *helper[1:], *argv]


def image_config(binary: str, image: str) -> tuple[str, list[str], list[str]]:
    """The image's id, ENTRYPOINT and CMD (empty where it has none), pulled first if absent."""
    inspect = [binary, "image", "inspect", image]
    found = subprocess.run(inspect, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        pulled = subprocess.run([binary, "pull", image], stdout=2, check=False)  # to the log
        if pulled.returncode != 0:
            raise LaunchError(f"cannot pull the image {image}")
        found = subprocess.run(inspect, capture_output=True, text=True, check=False)
        if found.returncode != 0:
            lines = [line for line in found.stderr.splitlines() if line.strip()]
            raise LaunchError(f"{binary} image inspect: {lines[-1] if lines else image}")
    try:
        [info] = json.loads(found.stdout)
        config = info.get("Config") or {}
        image_id = info["Id"]
        entrypoint, cmd = config.get("Entrypoint") or [], config.get("Cmd") or []
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LaunchError(f"{binary} image inspect {image}: unexpected answer ({exc})") from None
    if not (isinstance(image_id, str) and _strings(entrypoint) and _strings(cmd)):
        raise LaunchError(f"{binary} image inspect {image}: unexpected answer")
    return image_id, entrypoint, cmd


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    image = qualified(config["image"]) if config.get("qualify") else config["image"]
    try:
        image_id, entrypoint, cmd = image_config(config["run"][0], image)
        run = program(entrypoint, cmd, config["command"])
        if not run:
            raise LaunchError(f"the image {image} has no ENTRYPOINT or CMD to run")
        final = run_argv(config, image_id, run)
        os.execvp(final[0], final)  # noqa: S606 - argv as given
    except (LaunchError, OSError, subprocess.SubprocessError) as exc:
        os.write(2, f"fairgpu: starting the container: {exc}\n".encode())
    return FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
