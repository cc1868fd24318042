"""Two machines on one host: two `accelerate launch` commands with `--num_machines 2 --machine_rank 0|1`, one CPU
process each (gloo over loopback), sharing output_dir, as a two-node Slurm job runs them.

One scenario, in the order a user lives it: both machines train from step 0; after checkpoint step-2, machine 1
stops answering (SIGSTOP: a node that loses its power or its network closes no connection, so the survivor hears
nothing) and is then SIGKILLed; machine 0 gives up after `distributed_timeout` with one line; both machines are
started again with `resume_from_checkpoint: latest` and finish. The run must end with the UNet, EMA and optimizer
state of one process at the same global batch, as an uninterrupted run does. (A SIGKILL alone closes the node's
connections on a shared host and the survivor fails at once with "Connection reset by peer", before any timeout.)

What machine 1 writes is read from the system calls of its processes (`strace -ff`: every open for writing, rename,
mkdir and unlink, whether made by Python, by torch's C++ writer or by safetensors' Rust one). Under output_dir it
may write only its own random-number state in each checkpoint, which Accelerate's `save_state` has every process
write, and create that checkpoint's folder when it gets there before the main process.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
from conftest import write_caption_folder
from safetensors.torch import load_file
from test_launch import ROOT, send
from test_scale import STEPS, assert_same_state, scale_config, write_config

from ldm_pipeline.config import config_from_dict
from ldm_pipeline.distributed import failed_collective, process_group_kwargs
from ldm_pipeline.loop import peer_lost
from ldm_pipeline.training import train

TIMEOUT = 20  # distributed_timeout of these runs, in seconds
STRACE = shutil.which("strace")
WRITE_CALLS = "open,openat,creat,rename,renameat,renameat2,mkdir,mkdirat,unlink,unlinkat,rmdir,linkat,symlinkat"


@dataclass
class Machine:
    process: subprocess.Popen
    folder: Path  # its working directory, with its stdout and stderr
    traced: bool  # started under strace

    def processes(self) -> list[int]:
        """The machine's launcher and worker (under strace, the children of strace, which goes on recording)."""
        children = [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
        return children if self.traced else [self.process.pid] + children

    def stderr(self) -> str:
        return (self.folder / "stderr").read_text()

    def stdout(self) -> str:
        return (self.folder / "stdout").read_text()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_machines(config: Path, folder: Path, trace: Path | None) -> list[Machine]:
    """Both machines' `accelerate launch`, each from a working directory of its own; machine 1 under strace,
    writing its system calls to `trace`, when there is one."""
    port, machines = free_port(), []
    for rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(ROOT / "train.py"), "--config", str(config)]
        traced = rank == 1 and trace is not None
        if traced:  # -ff: one file per thread, `trace.<tid>`, so no call is split by another thread's;
            # -y: the folder an *at call's path is relative to
            command = [STRACE, "-ff", "-qq", "-y", "-e", f"trace={WRITE_CALLS}", "-o", str(trace)] + command
        cwd = folder / f"machine{rank}"
        cwd.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        with open(cwd / "stdout", "w") as stdout, open(cwd / "stderr", "w") as stderr:
            machines.append(Machine(subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr),
                                    cwd, traced))
    return machines


def wait_for(machines: list[Machine], timeout: float) -> None:
    """Wait for every machine's command; past `timeout` their processes print their stacks and the test fails."""
    deadline = time.monotonic() + timeout
    for machine in machines:
        try:
            machine.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(machines, signal.SIGABRT)  # PYTHONFAULTHANDLER prints each thread's stack
            time.sleep(5)
            stop(machines, signal.SIGKILL)
            pytest.fail(f"the machines did not finish in {timeout} s; their stderr:\n"
                        + "\n".join(f"--- machine {rank}:\n{m.stderr()[-6000:]}" for rank, m in enumerate(machines)))


def stop(machines: list[Machine], signal_number: int) -> None:
    for machine in machines:
        if machine.process.poll() is None:
            send(reversed(machine.processes()), signal_number)


def written_under(trace: Path, cwd: Path, root: Path) -> set[str]:
    """Paths under `root` (relative to it) that the traced processes, started in `cwd`, created, opened for writing,
    renamed or removed, read from strace's per-thread files `trace.<tid>`. strace -y writes a call's folder beside
    its descriptor: `unlinkat(3</out/x>, "name", 0)`."""
    root, found = str(root.resolve()), set()
    call = re.compile(r"^(\w+)\((.*)\) += (-?\d+)")
    path = re.compile(r'(?:(?:AT_FDCWD|\d+)<([^>]*)>, )?"([^"]*)"')
    threads = sorted(trace.parent.glob(trace.name + ".*"))
    assert threads, f"strace wrote no {trace}.<tid> files"
    for line in (line for thread in threads for line in thread.read_text().splitlines()):
        match = call.match(line)
        if not match or int(match.group(3)) < 0:  # a failed call changed nothing (an existing folder: EEXIST)
            continue
        name, arguments = match.group(1), match.group(2)
        if name.startswith("open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", arguments):
            continue
        for folder, relative in path.findall(arguments):
            target = os.path.normpath(os.path.join(folder or cwd, relative))
            if target == root or target.startswith(root + os.sep):
                found.add(os.path.relpath(target, root))
    return found


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_node")
    write_caption_folder(root / "data")
    return root


@pytest.fixture(scope="module")
def reference(root):
    """One process, global batch 4, uninterrupted: what the two machines must end with."""
    out = root / "reference"
    train(config_from_dict(scale_config(out, root / "data")))
    return out


@pytest.fixture(scope="module")
def lost_node(root):
    """Both machines (batch 2 each) train until checkpoint step-2 is complete; machine 1 then stops answering and
    is killed. Returns (output_dir, machine 0, seconds from the stop to machine 0's exit)."""
    out = root / "two_machines"
    config = write_config(root / "run.yaml", scale_config(out, root / "data", train_batch_size=2,
                                                          distributed_timeout=TIMEOUT))
    trace = root / "machine1_phase1.strace" if STRACE else None
    machines = start_machines(config, root / "phase1", trace)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step-2").is_dir():
        if time.monotonic() > deadline or any(m.process.poll() is not None for m in machines):
            stop(machines, signal.SIGKILL)
            pytest.fail("no checkpoint step-2; machine 0's stderr:\n" + machines[0].stderr()[-6000:])
        time.sleep(0.05)
    send(machines[1].processes(), signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(machines[:1], timeout=TIMEOUT + 120)
        elapsed = time.monotonic() - stopped
    finally:
        send(machines[1].processes(), signal.SIGKILL)
        machines[1].process.wait(timeout=60)  # strace ends once its processes are gone, its record complete
    return out, machines[0], elapsed


@pytest.fixture(scope="module")
def resumed(root, lost_node):
    """Both machines started again with resume_from_checkpoint: latest."""
    out, _, _ = lost_node
    config = write_config(root / "resume.yaml", scale_config(out, root / "data", train_batch_size=2,
                                                             distributed_timeout=TIMEOUT,
                                                             resume_from_checkpoint="latest"))
    machines = start_machines(config, root / "phase2", root / "machine1_phase2.strace" if STRACE else None)
    wait_for(machines, timeout=600)
    for rank, machine in enumerate(machines):
        assert machine.process.returncode == 0, f"machine {rank}:\n{machine.stderr()[-4000:]}"
    return out, machines


def test_a_lost_node_stops_the_survivor_within_the_timeout_in_one_line(lost_node):
    out, survivor, elapsed = lost_node
    assert survivor.process.returncode != 0
    stderr = survivor.stderr()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-4000:]
    assert "Traceback" not in stderr.split("error:")[0], stderr[-4000:]  # the launcher's own report comes after
    (line,) = errors
    # Machine 1 stopped after writing its part of step-2: machine 0 waits in the barrier that ends the save or
    # in step 3's gradient all-reduce, whichever it reached.
    assert line.startswith("error: [unet] after step 2 of 5: "), line
    assert re.search(r"(barrier|DDP's gradient all-reduce in backward) \(ldm_pipeline/\w+\.py:\d+ in \w+: .+\) "
                     r"gave up: Timed out waiting 20000ms for recv operation to complete", line), line
    assert f"did not answer within distributed_timeout ({TIMEOUT} s)" in line
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'step-2'}: start the command again on every " \
           "node with resume_from_checkpoint: latest" in line
    assert TIMEOUT <= elapsed <= TIMEOUT + 90, elapsed  # the timeout, then the launcher's exit (a loaded machine)


def test_two_machines_resumed_after_a_lost_node_end_as_one_uninterrupted_process(reference, resumed):
    out, machines = resumed
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in machines[0].stdout()
    assert "effective batch size: 4 = 2 per process x 2 processes x 1 accumulation" in machines[0].stdout()
    final = f"step-{STEPS}"
    assert_same_state(out / "checkpoints" / final, reference / "checkpoints" / final, atol=1e-6)
    saved, expected = (load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                       for run in (out, reference))
    assert saved.keys() == expected.keys()
    assert max((saved[name] - expected[name]).abs().max().item() for name in expected) <= 1e-6


@pytest.mark.skipif(STRACE is None, reason="needs strace to see every write (apt-get install strace)")
def test_machine_1_writes_nothing_shared(root, resumed):
    out, _ = resumed
    written = set().union(*(written_under(root / f"machine1_{phase}.strace", root / phase / "machine1", out)
                            for phase in ("phase1", "phase2")))
    own = re.compile(r"^checkpoints/\.partial-step-\d+(/random_states_1\.pkl)?$")
    assert written and all(own.match(path) for path in written), sorted(written)
    assert "checkpoints/.partial-step-2/random_states_1.pkl" in written  # the record reaches into the checkpoints


def test_the_timeout_reaches_the_process_group_at_any_value():
    # Accelerate leaves out a value equal to its own default (600 s): gloo would then wait torch's 30 minutes.
    for seconds in (20, 600, 1800):
        assert abs(process_group_kwargs(seconds).to_kwargs()["timeout"] - timedelta(seconds=seconds)) \
            < timedelta(seconds=1)


def test_a_closed_connection_is_named_in_one_line_too(tmp_path):
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in "
                         "the application. Check the logs of the remote worker before reporting an error.")
    assert failed_collective(reset) and not failed_collective(RuntimeError("shape mismatch"))
    assert failed_collective(torch.distributed.DistNetworkError("the store is gone"))
    out = tmp_path / "out"
    (tmp_path / "data").mkdir()
    config = config_from_dict({"output_dir": str(out), "data": {"train_data_dir": str(tmp_path / "data")}})
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / ".partial-step-6").mkdir()
    message = str(peer_lost(config, reset, "[unet] after step 5 of 9: "))
    assert message == ("[unet] after step 5 of 9: a collective gave up: Read error [127.0.0.1]:5: Connection reset by "
                       "peer. Another process of the run died or did not answer within distributed_timeout (1800 s). "
                       f"The last complete checkpoint is {out / 'checkpoints' / 'step-4'}: start the command "
                       "again on every node with resume_from_checkpoint: latest")


# Accelerate turns FSDP on only for GPUs and other accelerators (accelerate/state.py, AcceleratorState: the FSDP
# branch sits under `distributed_type in [MULTI_GPU, MULTI_NPU, ...]`); CPU processes become MULTI_CPU and prepare()
# wraps the UNet in DDP. Checked in one process of a one-process gloo group, as a launched worker starts.
FSDP_ON_CPU = """
from accelerate import Accelerator
print(Accelerator(cpu=True).distributed_type.value)
"""


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="Accelerate 1.16 enables FSDP only on accelerators: CPU processes run as MULTI_CPU (DDP)")
def test_accelerate_shards_with_fsdp2_on_cpu_processes():
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", FSDP_ON_CPU], env=env, capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "FSDP"


def test_a_launch_that_asks_for_fsdp_on_cpu_is_refused_by_name(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from ldm_pipeline.config import ConfigError
    from ldm_pipeline.distributed import check_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asked for FSDP, but Accelerate runs these processes as MULTI_CPU"):
        check_fsdp(DistributedType.MULTI_CPU)
    check_fsdp(DistributedType.FSDP)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_fsdp(DistributedType.MULTI_CPU)
