"""``dilaserve serve`` stops cleanly on SIGTERM (systemd, docker stop, kill), as on Ctrl-C.

Ray's ``init`` replaces the process's SIGTERM handler; before the CLI took it back, a SIGTERM
aborted the process and left the local Ray instance's agents running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("pydantic")


def test_sigterm_stops_the_server_and_its_ray_instance(tmp_path):
    log = tmp_path / "serve.log"
    proc = _start_serve(tmp_path, "cli-sigterm", "engine: {kv_memory_gib: 0.05}", log)
    try:
        deadline = time.monotonic() + 180
        while "DiLaServe is serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        below = _descendants(proc.pid)
        assert len(below) >= 3, below  # a local Ray instance: GCS, raylet, agents, workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopping" in text, text[-3000:]
    _assert_gone(below)  # nothing of that Ray instance is left running


def test_a_replica_that_cannot_start_ends_serve_with_its_cause_and_leaves_nothing_running(tmp_path):
    # Before: Serve's "Failed to update the deployments ['replica-cpu-0']" under ~250 lines of
    # the replicas' tracebacks, the cause (a missing latency profile) at line 74.
    missing = tmp_path / "no-such-profile.json"
    log = tmp_path / "serve.log"
    engine = f"engine: {{kv_memory_gib: 0.05, latency_profile: {missing}}}"
    proc = _start_serve(tmp_path, "cli-bad-replica", engine, log)
    below: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            below = sorted(set(below) | set(_descendants(proc.pid)))
            time.sleep(0.5)
        assert proc.poll() is not None, "serve kept running with a replica that cannot start"
        err = log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("dilaserve serve: error:") and "replica-cpu-0 failed to start" in last, last
    assert "FileNotFoundError" in last and str(missing) in last, last
    assert "_metrics_task" not in err  # the half-built replica's teardown no longer fails too
    _assert_gone(below)  # the Ray instance it started is gone


def test_a_gpu_config_on_a_machine_without_gpus_is_refused_not_left_waiting(tmp_path):
    # Before: Serve waited forever for a GPU ("taken more than 30s to be scheduled", repeated).
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    log = tmp_path / "serve.log"
    proc = _start_serve(tmp_path, "cli-no-gpu", "", log, device="cuda", variant="gpu")
    try:
        returncode = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text(errors="replace")
    last = err.strip().splitlines()[-1]
    assert returncode == 2, err[-3000:]
    assert "variant 'gpu' needs 1 GPU(s) per replica and this machine has 0" in last, last
    assert not _gcs_servers()  # the Ray instance it started is shut down


def test_local_gpu_check_counts_every_replica():
    from dilaserve.errors import DeployError
    from dilaserve.serving.app import check_local_gpus
    from dilaserve.serving.config import parse_config

    config = parse_config({"models": [{"name": "m", "device": "cuda"}],
                           "variants": [{"name": "a", "model": "m", "num_replicas": 2},
                                        {"name": "b", "model": "m", "tensor_parallel": 2}]})
    check_local_gpus(config, 4.0)
    with pytest.raises(DeployError, match="need 4 GPUs together and this machine has 3"):
        check_local_gpus(config, 3.0)
    with pytest.raises(DeployError, match="variant 'b' needs 2 GPU"):
        check_local_gpus(config, 1.0)
    check_local_gpus(parse_config({"models": [{"name": "m"}], "variants": [{"name": "c", "model": "m"}]}), 0.0)


def test_root_cause_is_the_innermost_exception_line():
    from dilaserve.serving.app import root_cause

    message = ("The deployment failed to start 3 times in a row.\nRuntimeError: Traceback (most recent call last):\n"
               '  File "replica.py", line 4010, in _call_func_or_gen\n    result = await result\n'
               "ValueError: unknown chunk control 'turbo'; known: fixed, adaptive\n")
    assert root_cause(message) == "ValueError: unknown chunk control 'turbo'; known: fixed, adaptive"
    assert root_cause("replica died\n") == "replica died"
    assert root_cause("") == "no message"


def _start_serve(tmp_path: Path, app_name: str, variant_extra: str, log: Path, device: str = "cpu",
                 variant: str = "cpu"):
    """``dilaserve serve`` in a subprocess on a config of one replica of the embedded model, on a
    free port, starting its own Ray instance; its output goes to ``log`` (a file, not a pipe: Ray's
    log lines could fill a pipe and block it). Skips where a Ray instance already runs (serve
    would join it and start no processes of its own)."""
    if _gcs_servers():
        pytest.skip("a Ray instance runs on this machine: dilaserve serve would join it, not start its own")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    extra = f", {variant_extra}" if variant_extra else ""
    config = tmp_path / "serve.yaml"
    config.write_text(f"""app_name: {app_name}
models: [{{name: dilaserve-tiny-arith, path: null, device: {device}}}]
variants: [{{name: {variant}, model: dilaserve-tiny-arith, num_replicas: 1, num_cpus_per_replica: 0.5{extra}}}]
http: {{host: 127.0.0.1, port: {port}, ingress_num_cpus: 0.1}}
""")
    env = {**os.environ, "RAY_ADDRESS": ""}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "dilaserve.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])


def _assert_gone(pids: list[int], wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left


def _gcs_servers() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"gcs_server" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's GCS, raylet, agents and workers for a local start)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pids: list[int]) -> list[str]:
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":  # a zombie has exited
            left.append(f"{pid}: {title[:80]}")
    return left


def test_a_port_in_use_or_a_bad_host_is_refused_before_ray_starts():
    from dilaserve.errors import DeployError
    from dilaserve.serving.app import check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeployError, match=f"cannot listen on 127.0.0.1:{port}: .*another server"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again
    with pytest.raises(DeployError, match="check --host"):
        check_port_free("999.1.1.1", port)
