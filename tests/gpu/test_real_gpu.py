"""Against a real NVIDIA GPU and driver: the agent's NVML backend and the task sandbox's GPU fence.

Everywhere else these run against a fake `pynvml` (tests/agents/fake_pynvml.py) and `mknod`
device files with no driver behind them (tests/agents/test_isolation.py); here the driver
answers. Run on a GPU node, as root: `make test-gpu`. Collected only with FAIRGPU_REAL_GPU=1
(tests/conftest.py), and then a node without a GPU fails them: they never skip.

The CUDA probes use PyTorch, from FAIRGPU_TEST_CUDA_PYTHON (default: this interpreter), which
task uids must be able to read and run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents.gpu.nvml import NvmlBackend
from agents.isolation import Confinement, IsolationConfig
from agents.runner import Runner
from agents.state import StateDir
from protocol.states import GpuHealth
from tests.agents.helpers import require_cgroups, spec, wait_for

CUDA_PY = os.environ.get("FAIRGPU_TEST_CUDA_PYTHON", sys.executable)
UID_BASE = 200_000 + (os.getpid() % 10_000) * 100
ACME: dict[str, Any] = {"org": "acme", "org_id": 1}
RIVAL: dict[str, Any] = {"org": "rival", "org_id": 2}
NVIDIA_MAJOR = 195
GIB = 2**30


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    nvml = NvmlBackend.open()
    yield nvml
    nvml.close()


def driver_gpus() -> list[Path]:
    """The GPUs the kernel driver knows, one directory each (by PCI address)."""
    return sorted(Path("/proc/driver/nvidia/gpus").iterdir())


def test_the_backend_lists_every_gpu_the_driver_has(backend: NvmlBackend) -> None:
    infos = backend.devices()
    print("\n".join(info.model_dump_json() for info in infos))
    assert len(infos) == len(driver_gpus()) > 0
    assert [info.index for info in infos] == list(range(len(infos)))
    minors = backend.device_minors()
    assert sorted(minors) == [info.index for info in infos], minors
    for info in infos:
        assert info.uuid.startswith("GPU-"), info
        assert info.model not in ("", "unknown"), info
        assert info.memory_bytes > 8 * GIB, info
        device = os.stat(f"/dev/nvidia{minors[info.index]}")
        assert stat.S_ISCHR(device.st_mode)
        assert os.major(device.st_rdev) == NVIDIA_MAJOR
        assert os.minor(device.st_rdev) == minors[info.index]
    smi = shutil.which("nvidia-smi")
    if smi is not None:  # the driver's own tool agrees on the UUIDs and their order
        listed = subprocess.run(
            [smi, "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert listed == [info.uuid for info in infos]


def test_an_idle_gpu_is_sampled_whole(backend: NvmlBackend) -> None:
    first = backend.sample({})
    time.sleep(1.0)
    second = backend.sample({})
    for before, after in zip(first, second, strict=True):
        print(after.model_dump_json())
        assert after.health is GpuHealth.HEALTHY, after
        assert after.utilization_ratio is not None
        assert 0.0 <= after.utilization_ratio <= 1.0
        assert after.memory_total_bytes is not None
        assert after.memory_total_bytes > 8 * GIB
        assert after.memory_used_bytes is not None
        assert 0 <= after.memory_used_bytes <= after.memory_total_bytes
        assert after.temperature_c is not None
        assert 5.0 <= after.temperature_c <= 110.0
        assert after.power_w is not None
        assert after.power_w > 0.0
        assert before.energy_joules is not None
        assert after.energy_joules is not None
        assert after.energy_joules >= before.energy_joules
        assert after.xid_events == []
        assert after.sampled_at > before.sampled_at


CUDA_LOAD = """
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda")
hold = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    y = x @ x
    torch.cuda.synchronize()
"""


def test_a_cuda_process_shows_in_its_gpus_sample(backend: NvmlBackend) -> None:
    idle = backend.sample({})[0]
    load = subprocess.Popen([CUDA_PY, "-c", CUDA_LOAD, "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None
        assert load.stdout.readline().strip() == "ready"
        seen: list[Any] = []

        def busy() -> bool:
            sample = backend.sample({})[0]
            seen.append(sample)
            procs = {p.pid: p for p in sample.processes}
            return (
                load.pid in procs
                and (procs[load.pid].used_memory_bytes or 0) >= 2 * GIB
                and (sample.utilization_ratio or 0.0) >= 0.5
            )

        try:
            wait_for(busy, 20.0)
        finally:
            print("idle", idle.model_dump_json())
            print("last", seen[-1].model_dump_json() if seen else None)
        assert seen[-1].memory_used_bytes is not None
        assert idle.memory_used_bytes is not None
        assert seen[-1].memory_used_bytes - idle.memory_used_bytes >= 2 * GIB
    finally:
        load.kill()
        load.communicate()  # reaps it and closes its stdout


class Node:
    """A strictly confining agent over the host's real /dev and its real GPUs."""

    def __init__(self, tmp_path: Path, backend: NvmlBackend) -> None:
        self.data = tmp_path / "data"
        for org in ("acme", "rival"):
            (self.data / org).mkdir(parents=True)
        self.state = StateDir(tmp_path / "state")
        self.confinement = Confinement(
            IsolationConfig(
                mode="strict",
                task_root=tmp_path / "tasks",
                task_uid_base=UID_BASE,
                org_roots=(str(self.data / "{org}"),),
                memory_per_gpu_bytes=16 * GIB,
                cgroup_parent=f"fairgpu-test-{uuid.uuid4().hex[:8]}",
                gpu_minors=backend.device_minors(),
                hide=(self.state.root,),
            ),
            total_gpus=len(backend.devices()),
        )
        self.runner = Runner(self.state, confinement=self.confinement)

    def run(
        self, task_id: int, command: list[str], wait_s: float = 120.0, **fields: Any
    ) -> dict[str, Any]:
        self.runner.start(spec(task_id, command, time_limit_s=int(wait_s) + 180, **fields))
        wait_for(
            lambda: (
                (self.runner.poll(), self.runner.records[task_id].state)[1]
                not in ("starting", "running")
            ),
            wait_s,
        )
        record = self.runner.records[task_id]
        log = self.state.read_log(record).decode()
        return {
            "state": record.state,
            "exit": record.exit_code,
            "reason": record.reason,
            "log": log,
        }

    def close(self) -> None:
        for task_id, record in self.runner.records.items():
            if record.state in ("starting", "running"):
                self.confinement.kill(task_id)
            self.confinement.finish(task_id)
        assert self.confinement.cgroups is not None
        self.confinement.cgroups.remove()


@pytest.fixture
def node(tmp_path: Path, backend: NvmlBackend) -> Iterator[Node]:
    require_cgroups()
    tmp_path.chmod(0o755)  # task uids pass through it to their directories
    n = Node(tmp_path, backend)
    yield n
    n.close()


# What a task finds of the node's GPUs: each NVIDIA device file opened or refused, NVML's and
# CUDA's counts and UUIDs, what nvidia-smi prints, and the driver's /proc files readable.
PROBE = """
import errno, glob, json, os, shutil, subprocess
out = {"uid": os.getuid(), "files": {}, "proc": []}
with open("/proc/self/status") as f:  # 2: under the sandbox's seccomp filter
    out["seccomp"] = [line.split()[1] for line in f if line.startswith("Seccomp:")][0]
for path in sorted(glob.glob("/dev/nvidia*")):
    if os.path.isdir(path):  # /dev/nvidia-caps; a covered device file is a plain file
        continue
    try:
        os.close(os.open(path, os.O_RDWR))
        out["files"][path] = "opened"
    except OSError as exc:
        out["files"][path] = errno.errorcode[exc.errno]
for path in glob.glob("/proc/driver/nvidia/gpus/*/information"):
    try:
        with open(path) as f:
            out["proc"].append(f.read())
    except OSError as exc:
        out["proc"].append(errno.errorcode[exc.errno])
try:
    import pynvml
    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    uuids = []
    for i in range(count):
        try:
            uuids.append(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
        except pynvml.NVMLError as exc:
            uuids.append("error: " + str(exc))
    out["nvml"] = {"count": count, "uuids": uuids}
except Exception as exc:
    out["nvml"] = {"error": type(exc).__name__ + ": " + str(exc)}
try:
    import torch
    count = torch.cuda.device_count()
    out["cuda"] = {"count": count}
    if count:
        x = torch.ones(1024, 1024, device="cuda")
        out["cuda"]["sum"] = float((x @ x).sum())
        out["cuda"]["uuid"] = str(torch.cuda.get_device_properties(0).uuid)
except Exception as exc:
    out["cuda"] = {"error": type(exc).__name__ + ": " + str(exc)}
smi = shutil.which("nvidia-smi")
if smi:
    run = subprocess.run([smi, "-L"], capture_output=True, text=True)
    out["smi"] = {"rc": run.returncode, "text": run.stdout + run.stderr}
print("PROBE " + json.dumps(out))
"""


def probe(node: Node, task_id: int, **fields: Any) -> dict[str, Any]:
    result = node.run(task_id, [CUDA_PY, "-c", PROBE], **fields)
    lines = [line for line in result["log"].splitlines() if line.startswith("PROBE ")]
    assert (result["state"], result["exit"]) == ("exited", 0), result
    assert lines, result
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("PROBE "))
    print(json.dumps(found, indent=1))
    return found


def test_a_task_uses_its_own_gpu_through_cuda_and_nvml(node: Node, backend: NvmlBackend) -> None:
    info = backend.devices()[0]
    minor = backend.device_minors()[0]
    found = probe(node, 1, gpus=[0], **ACME)
    assert found["uid"] == UID_BASE + 1
    assert found["seccomp"] == "2"  # CUDA works under the task's seccomp filter
    assert found["files"][f"/dev/nvidia{minor}"] == "opened"
    assert found["cuda"].get("count") == 1, found["cuda"]
    assert found["cuda"]["sum"] == 1024.0**3
    assert info.uuid.endswith(found["cuda"]["uuid"]), (info.uuid, found["cuda"])
    assert found["nvml"].get("uuids") == [info.uuid], found["nvml"]
    assert any(info.uuid in text for text in found["proc"]), found["proc"]


def test_a_task_without_that_gpu_finds_none_of_it(node: Node, backend: NvmlBackend) -> None:
    """A task not given a GPU (a CPU-only task here; on a node of several, another task's GPU)
    opens none of its device file, and neither CUDA, NVML nor nvidia-smi gives it the GPU, nor
    its UUID, not even the driver's /proc files: the fence by mount holds against the real
    driver, which CUDA_VISIBLE_DEVICES alone would not."""
    info = backend.devices()[0]
    minor = backend.device_minors()[0]
    found = probe(node, 2, gpus=[], env={"CUDA_VISIBLE_DEVICES": "0"}, **RIVAL)
    assert found["files"][f"/dev/nvidia{minor}"] == "EACCES"
    assert found["cuda"].get("count", 0) == 0, found["cuda"]
    assert info.uuid not in json.dumps(found["nvml"]), found["nvml"]
    assert info.uuid not in json.dumps(found.get("smi", {}))
    assert found["nvml"].get("count", 0) == 0, found["nvml"]
    assert info.uuid not in json.dumps(found["proc"]), found["proc"]  # the driver's /proc too


def test_a_tasks_gpu_processes_end_with_it(node: Node, backend: NvmlBackend) -> None:
    """A CUDA process the task left behind in a session of its own is ended with the task, and
    the GPU's memory is back before the next task gets the GPU."""
    idle = backend.sample({})[0]
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {CUDA_LOAD!r}, '600'],"
        " start_new_session=True, stdout=subprocess.PIPE, text=True)\n"
        "print(p.stdout.readline().strip(), p.pid, flush=True)\n"
    )
    result = node.run(3, [CUDA_PY, "-c", code], gpus=[0], **ACME)
    assert result["log"].startswith("ready "), result
    left = int(result["log"].split()[1])

    def released() -> bool:
        sample = backend.sample({})[0]
        return (
            not sample.processes
            and (sample.memory_used_bytes or 0) <= (idle.memory_used_bytes or 0) + 256 * 2**20
        )

    wait_for(released, 30.0)
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie for init to reap
        assert psutil.Process(left).status() == psutil.STATUS_ZOMBIE


# What a task tries on its own GPU's settings (each `nvidia-smi` call's exit status), with the
# state read as root before and after: the driver refuses these to non-root users by default.
SETTINGS = "persistence_mode,compute_mode,power.limit,clocks.applications.graphics,accounting.mode"
TRIES = [
    ["-pm", "1"],
    ["-c", "EXCLUSIVE_PROCESS"],
    ["-pl", "200"],
    ["-ac", "3201,1000"],
    ["-lgc", "500,500"],
    ["-am", "1"],
    ["-r"],
]


def gpu_settings() -> str:
    return subprocess.run(
        ["nvidia-smi", f"--query-gpu={SETTINGS}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_task_cannot_change_its_gpus_settings(node: Node) -> None:
    before = gpu_settings()
    code = (
        "import json, subprocess\n"
        f"for args in {TRIES!r}:\n"
        "    run = subprocess.run(['nvidia-smi', *args], capture_output=True, text=True)\n"
        "    print('TRY', json.dumps([args, run.returncode, (run.stdout + run.stderr)[-200:]]))\n"
    )
    result = node.run(4, [CUDA_PY, "-c", code], gpus=[0], **ACME)
    tries = [json.loads(line[4:]) for line in result["log"].splitlines() if line.startswith("TRY ")]
    print("\n".join(map(str, tries)))
    assert [args for args, _, _ in tries] == TRIES, result
    # Refused, or nothing to do (persistence mode already on; clocks the GPU does not offer).
    changed = [
        (args, text)
        for args, rc, text in tries
        if rc == 0 and "already" not in text and "not supported" not in text
    ]
    assert changed == [], tries
    assert gpu_settings() == before


# The first org's job leaves its weights in GPU memory; the next org's job on the same GPU reads
# what uninitialised GPU memory holds. The driver must have cleared it between them.
PATTERN = 1234.5678
WRITE = f"""
import torch
blocks = [torch.full((2**28,), {PATTERN}, device="cuda") for _ in range(8)]  # 8 GiB
torch.cuda.synchronize()
print("written", sum(int((b == {PATTERN}).sum()) for b in blocks), flush=True)
"""
READ = f"""
import torch
blocks = [torch.empty((2**28,), device="cuda") for _ in range(8)]
torch.cuda.synchronize()
print("found", sum(int((b == {PATTERN}).sum()) for b in blocks), flush=True)
"""


def test_the_next_org_finds_nothing_of_the_last_ones_gpu_memory(node: Node) -> None:
    wrote = node.run(5, [CUDA_PY, "-c", WRITE], gpus=[0], **ACME)
    assert wrote["log"].split() == ["written", str(8 * 2**28)], wrote
    found = node.run(6, [CUDA_PY, "-c", READ], gpus=[0], **RIVAL)
    assert found["log"].split() == ["found", "0"], found


# What training jobs do beyond one process's CUDA, each in a process of its own so that one
# failure (or an environment variable it needs set before torch loads) leaves the rest to run:
# CUDA tensors shared between processes (cudaIpc; with expandable segments through pidfd_getfd),
# DataLoader workers with pinned memory, torch.compile (Triton builds and loads a launcher with
# the C compiler), NCCL's set-up and a collective, a CUDA graph, CuPy's runtime compiler (NVRTC).
# Run as root outside any sandbox first: a check the machine cannot do there is not the filter's.
WORKLOAD_CHECKS: dict[str, tuple[dict[str, str], str]] = {
    "ipc": (
        {},
        """
import torch, torch.multiprocessing as mp
def child(q, r):
    t = q.get(); t += 1; torch.cuda.synchronize(); r.put(float(t.sum()))
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q, r = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child, args=(q, r)); p.start()
    t = torch.zeros(1024, device="cuda"); q.put(t); got = r.get(timeout=120); p.join(60)
    torch.cuda.synchronize()
    assert got == 1024.0 and float(t.sum()) == 1024.0 and p.exitcode == 0, (got, p.exitcode)
""",
    ),
    "ipc_expandable": (
        {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
        """
import torch, torch.multiprocessing as mp
def child(q, r):
    t = q.get(); t += 1; torch.cuda.synchronize(); r.put(float(t.sum()))
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q, r = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=child, args=(q, r)); p.start()
    t = torch.zeros(1024, device="cuda"); q.put(t); got = r.get(timeout=120); p.join(60)
    assert got == 1024.0 and p.exitcode == 0, (got, p.exitcode)
""",
    ),
    "dataloader": (
        {},
        """
import torch
from torch.utils.data import DataLoader, TensorDataset
if __name__ == "__main__":
    data = TensorDataset(torch.arange(4096, dtype=torch.float32).reshape(-1, 4))
    total = 0.0
    for (batch,) in DataLoader(data, batch_size=64, num_workers=2, pin_memory=True):
        total += float(batch.cuda(non_blocking=True).sum())
    assert total == float(sum(range(4096))), total
""",
    ),
    "compile": (
        {},
        """
import torch
f = torch.compile(lambda x: (x.sin() ** 2 + x.cos() ** 2).sum())
x = torch.rand(1 << 20, device="cuda")
got = float(f(x))
assert abs(got - (1 << 20)) < 1.0, got
""",
    ),
    "nccl": (
        {},
        """
import os, tempfile, torch, torch.distributed as dist
store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("nccl", init_method="file://" + store, rank=0, world_size=1,
                        device_id=torch.device("cuda", 0))
t = torch.ones(1 << 20, device="cuda"); dist.all_reduce(t); torch.cuda.synchronize()
assert float(t.sum()) == float(1 << 20)
dist.destroy_process_group()
""",
    ),
    "graph": (
        {},
        """
import torch
x = torch.ones(1024, device="cuda"); g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    y = x * 2
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    y = x * 2
x += 1; g.replay(); torch.cuda.synchronize()
assert float(y.sum()) == 4096.0, float(y.sum())
""",
    ),
    "nvrtc": (
        {},
        """
import cupy
k = cupy.RawKernel(r'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2; }', "twice")
x = cupy.ones(256, dtype=cupy.float32); k((1,), (256,), (x,))
assert float(x.sum()) == 512.0
""",
    ),
}

WORKLOADS = f"""
import json, os, shutil, subprocess, sys, tempfile
checks = {WORKLOAD_CHECKS!r}
out = {{}}
for name, (env, code) in checks.items():
    cache = tempfile.mkdtemp()
    run_env = {{**os.environ, **env, "TRITON_CACHE_DIR": cache + "/triton",
               "TORCHINDUCTOR_CACHE_DIR": cache + "/inductor", "CUPY_CACHE_DIR": cache + "/cupy",
               "USER": os.environ.get("USER", "task")}}
    path = os.path.join(cache, name + ".py")
    with open(path, "w") as f:
        f.write(code)
    try:
        run = subprocess.run([sys.executable, path], env=run_env, capture_output=True, text=True,
                             timeout=90)
        out[name] = "ok" if run.returncode == 0 else f"rc {{run.returncode}}: " + (
            run.stdout + run.stderr)[-600:]
    except subprocess.TimeoutExpired:
        out[name] = "timeout"
    shutil.rmtree(cache, ignore_errors=True)
print("WORKLOADS " + json.dumps(out))
"""


def workloads(log: str) -> dict[str, str]:
    lines = [line for line in log.splitlines() if line.startswith("WORKLOADS ")]
    assert lines, log[-3000:]
    found: dict[str, str] = json.loads(lines[-1].removeprefix("WORKLOADS "))
    return found


@pytest.mark.timeout(560)
def test_training_workloads_run_under_the_tasks_filter(node: Node) -> None:
    """Each check that runs as root outside any sandbox runs in a strict task too: the seccomp
    filter, the fence and the task's uid refuse none of what a training job's libraries do."""
    outside = subprocess.run(
        [CUDA_PY, "-c", WORKLOADS], capture_output=True, text=True, timeout=900, check=False
    )
    baseline = workloads(outside.stdout + outside.stderr)
    print("outside", json.dumps(baseline, indent=1))
    result = node.run(7, [CUDA_PY, "-c", WORKLOADS], wait_s=1200.0, gpus=[0], **ACME)
    inside = workloads(result["log"])
    print("in the task", json.dumps(inside, indent=1))
    assert set(baseline) == set(WORKLOAD_CHECKS)
    assert baseline["ipc"] == baseline["dataloader"] == baseline["graph"] == "ok", baseline
    refused = {name: inside[name] for name, ok in baseline.items() if ok == "ok" != inside[name]}
    assert refused == {}, refused
