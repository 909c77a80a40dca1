"""A step under DeepSpeed ZeRO over 2 processes (torchrun, gloo on CPU; ZeRO-2, ZeRO-3, and ZeRO-3 with
optimizer and parameter offload) is the one-process step:
the same RL metrics and RFT losses, and the same parameters after, on the same data.

Tolerances (float32): metrics and losses within 1e-6 (the processes only reorder a sum); parameters
within 1e-4 absolute after 2 RL steps x 2 epochs and 3 RFT steps at lr 1e-2, i.e. 1% of one AdamW
step (Adam divides by sqrt(v) of tiny gradients, which magnifies float rounding; seen: 2.5e-5).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(400)]

WORKER = Path(__file__).with_name("equivalence_worker.py")
ROOT = Path(__file__).resolve().parents[2]
METRIC_ATOL = 1e-6
PARAM_ATOL = 1e-4


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], out: Path) -> dict:
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "one.pt"
    return _run([sys.executable, str(WORKER), str(out), "2"], out)


@pytest.mark.parametrize(("zero_stage", "offload"), [(2, False), (3, False), (3, True)],
                         ids=["zero2", "zero3", "zero3-offload"])
def test_two_processes_match_one(one_process, zero_stage, offload, tmp_path):
    """zero3-offload: Adam state and parameters in host memory (ZeRO-Offload / -Infinity)."""
    out = tmp_path / f"zero{zero_stage}.pt"
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), str(WORKER), str(out), str(zero_stage),
                *(["offload"] if offload else [])], out)
    assert (one_process["world"], two["world"]) == (1, 2)
    # [loss, grad_norm, entropy, kl, trained_responses] per RL step; the first prompt's group is unscorable,
    # so one process trains on fewer rows than the other (and runs idle passes) in step 0.
    assert [row[-1] for row in two["rl_metrics"]] == [12, 16]
    torch.testing.assert_close(torch.tensor(two["rl_metrics"]), torch.tensor(one_process["rl_metrics"]),
                               atol=METRIC_ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(two["sft_losses"]), torch.tensor(one_process["sft_losses"]),
                               atol=METRIC_ATOL, rtol=0)
    assert two["sft_nll_after"] == pytest.approx(one_process["sft_nll_after"], abs=1e-4)
    for key in ("rl_params", "sft_params"):
        moved = (one_process[key] - two[key]).abs().max().item()
        assert moved <= PARAM_ATOL, f"{key}: max |one - two| = {moved:.2e}"
    # and the steps did something: policies that stood still would match trivially
    for key in ("rl", "sft"):
        assert (one_process[f"{key}_params"] - one_process[f"{key}_start"]).abs().max().item() > 1e-3


def test_a_hung_peer_fails_the_collective_after_the_timeout():
    """`loop.distributed.timeoutSeconds` reaches the process group: with a peer that hangs, rank 0's
    collective fails after it (here 5 s) and the agent stops the hung process, so the stage ends."""
    import time

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), str(WORKER.with_name("hung_peer_worker.py")),
                           "5"], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "rank 0: collective failed after" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    waited = float(proc.stdout.split("collective failed after ")[1].split(" s")[0])
    assert 4.0 <= waited < 30.0 and elapsed < 90.0, (waited, elapsed)
