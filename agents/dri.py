"""Which DRI device files (`/dev/dri/cardN`, `/dev/dri/renderDN`) belong to which NVIDIA GPU.

With `nvidia-drm` loaded each GPU has DRI nodes besides its `/dev/nvidiaN`, and udev's default
rules make every render node `0666` on many distributions (systemd's `group-render-mode`): a
task fenced to its own `/dev/nvidiaN` could still open another GPU's render node, and through
it allocate that GPU's memory (GBM buffers), under the nose of the org whose job holds it. The
agent finds each DRI node's GPU through the kernel: the node's device number names its PCI
device in sysfs (`/sys/dev/char/MAJOR:MINOR/device`), and the NVIDIA driver tells that PCI
device's minor number (`/proc/driver/nvidia/gpus/<bus id>/information`, "Device Minor"), the N
of its `/dev/nvidiaN`. A node of another vendor's device (a server's BMC graphics) is left as
it is; one whose GPU cannot be told is covered, as another's would be.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

NVIDIA_VENDOR = "0x10de"
_NODE = re.compile(r"^(card|renderD)\d+$")
_MINOR = re.compile(r"^Device Minor:\s*(\d+)\s*$", re.MULTILINE)


def foreign_dri_nodes(
    dev_dir: Path,
    own_minors: Iterable[int],
    *,
    sys_dir: Path = Path("/sys"),
    driver_dir: Path = Path("/proc/driver/nvidia"),
) -> list[str]:
    """The DRI nodes under `dev_dir/dri` of NVIDIA GPUs whose device minor is not one of
    `own_minors`, and of GPUs whose minor cannot be told: the ones a task must not open."""
    own = set(own_minors)
    directory = dev_dir / "dri"
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    foreign = []
    for name in names:
        if not _NODE.match(name):
            continue
        path = directory / name
        try:
            info = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISCHR(info.st_mode):
            continue
        device = sys_dir / "dev/char" / f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
        vendor = _read(device / "device/vendor")
        if vendor is not None and vendor.strip() != NVIDIA_VENDOR:
            continue  # another vendor's device: not a GPU this node schedules
        minor = _nvidia_minor(device / "device", driver_dir)
        if minor is None or minor not in own:
            foreign.append(str(path))
    return foreign


def foreign_driver_dirs(own_minors: Iterable[int], *, driver_dir: Path) -> list[str]:
    """The NVIDIA driver's directories (`driver_dir/gpus/<bus id>`) of GPUs whose device minor
    is not one of `own_minors`, or cannot be told. Each tells its GPU's UUID, PCI address and
    firmware to any reader; a task fenced off a GPU is shown none of it (seen on an H200: a
    task given no GPU read the node's GPU's UUID there, while CUDA, NVML and nvidia-smi found
    none). The NVIDIA container toolkit hides them from containers the same way."""
    own = set(own_minors)
    try:
        buses = sorted(os.listdir(driver_dir / "gpus"))
    except OSError:
        return []
    foreign = []
    for bus_id in buses:
        match = _MINOR.search(_read(driver_dir / "gpus" / bus_id / "information") or "")
        if match is None or int(match.group(1)) not in own:
            foreign.append(str(driver_dir / "gpus" / bus_id))
    return foreign


def _nvidia_minor(device: Path, driver_dir: Path) -> int | None:
    """The NVIDIA device minor of the PCI device at `device` (a sysfs link); None unknown."""
    bus_id = os.path.basename(os.path.realpath(device))
    text = _read(driver_dir / "gpus" / bus_id / "information")
    match = _MINOR.search(text or "")
    return int(match.group(1)) if match else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
