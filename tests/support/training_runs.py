"""Helpers of the trainer tests: run folders' checkpoints, a run killed with SIGKILL after a given
step, and `softvq-fast` runs in 2 gloo processes under torchrun."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.paths import ROOT

SUPPORT = ROOT / "tests" / "support"


def checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:09d}.pt", weights_only=True)


def tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in tensors(value, f"{prefix}/{key}").items()}
    return {}


def records(run: Path) -> list[dict]:
    """The run's log.jsonl."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def kill_after_step(trainer: str, run_file: Path, step: int, env: dict[str, str]) -> None:
    """Run support/train_until_hook.py (`trainer`, the run described by `run_file`) until it
    has finished `step`, then SIGKILL it."""
    marker = run_file.with_name(f"{run_file.stem}-at-step-{step}")
    process = subprocess.Popen([sys.executable, str(SUPPORT / "train_until_hook.py"), trainer, str(run_file), str(step),
                                str(marker)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.communicate(timeout=10)[1].decode()[-3000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def assert_same_state(one: Path, two: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of two runs' checkpoints at `step` and of their exports equal; returns the first's."""
    first, second = tensors(checkpoint(one, step)), tensors(checkpoint(two, step))
    assert first.keys() == second.keys() and any("/optimizer/" in k for k in first) and any("/ema/" in k for k in first)
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ: {different[:5]} ..."
    from safetensors.torch import load_file

    exports = [load_file(str(run / "export" / "model.safetensors")) for run in (one, two)]
    assert exports[0].keys() == exports[1].keys() and all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])
    return first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_gloo_processes(runs: list[list[str]], folder: Path, env: dict[str, str]) -> None:
    """`softvq-fast` once per argument list in each of 2 gloo processes under torchrun."""
    (folder / "runs.json").write_text(json.dumps(runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(SUPPORT / "train_distributed.py"), str(folder / "runs.json")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def subprocess_env(pinned: dict[str, str]) -> dict[str, str]:
    """This environment with `pinned` backends, one thread per process and no GPU."""
    return {**os.environ, **pinned, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def one_thread_like_the_subprocesses(pinned: dict[str, str]):
    """An autouse fixture: one torch thread, like the subprocesses (OMP_NUM_THREADS=1), and the
    `pinned` backends, so that in-process and subprocess runs take the same kernels (tiny models
    also run faster without two threads to wake per op)."""
    @pytest.fixture(autouse=True)
    def one_thread(monkeypatch):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for name, value in pinned.items():
            monkeypatch.setenv(name, value)
        yield
        torch.set_num_threads(threads)

    return one_thread
