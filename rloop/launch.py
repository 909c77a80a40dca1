"""One stage, many processes: `rloop stage rl|rft` started with NNODES x NPROC_PER_NODE > 1 in its env
starts its workers itself, one per GPU, under torch's elastic agent (what `torchrun` runs), and exits
with the stage exit-code contract (rloop.contracts), which `torchrun` would flatten to 1.

The operator sets the env (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT) on the pods of
a multi-GPU or multi-node stage; the container command stays `rloop stage ...`, as on one GPU. Each
worker re-runs the same command with torch's RANK / LOCAL_RANK / WORLD_SIZE set, which is how it knows
it is a worker and not the launcher. Rendezvous is static (node NODE_RANK of NNODES, the store on node
0): pods of an Indexed Job have fixed ranks, and the operator's next attempt is the retry, so the agent
never restarts workers (max_restarts 0) — a dead worker ends the whole stage at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from rloop.contracts import (
    DEFAULT_MASTER_PORT,
    DISTRIBUTED_STAGE_KINDS,
    EXIT_CORRUPT_INPUT,
    EXIT_INVALID_INPUT,
    EXIT_STORE_UNAVAILABLE,
    JOB_COMPLETION_INDEX_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    NNODES_ENV,
    NODE_RANK_ENV,
    NPROC_PER_NODE_ENV,
)

RENDEZVOUS_TIMEOUT_S = 900
"""How long node 0 waits for the other nodes' agents (pods scheduled one by one, images pulling)."""
_WORKER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_EXIT_PRIORITY = (EXIT_INVALID_INPUT, EXIT_CORRUPT_INPUT, EXIT_STORE_UNAVAILABLE)
"""A stage whose workers failed exits with the first of these any worker gave (retrying cannot fix a
bad input, and a corrupt input must be re-planned), else with the first worker's own code."""


class LaunchError(ValueError):
    """The distributed env is malformed (names the variable and the fix)."""


@dataclass(frozen=True)
class LaunchPlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _int_env(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise LaunchError(f"{name}={value} must be >= {low}")
    return value


def launch_plan(kind: str, env: Mapping[str, str] = os.environ) -> LaunchPlan | None:
    """The plan when this `rloop stage` process should start workers; None when it runs the stage
    itself (one process, a stage kind that never spreads, or it already is a worker)."""
    if kind not in DISTRIBUTED_STAGE_KINDS or any(k in env for k in _WORKER_ENV):
        return None
    nnodes = _int_env(env, NNODES_ENV, 1, 1)
    nproc = _int_env(env, NPROC_PER_NODE_ENV, 1, 1)
    if nnodes * nproc == 1:
        return None
    node_rank = _int_env(env, NODE_RANK_ENV, _int_env(env, JOB_COMPLETION_INDEX_ENV, 0, 0), 0)
    if node_rank >= nnodes:
        raise LaunchError(f"{NODE_RANK_ENV}={node_rank} is not below {NNODES_ENV}={nnodes}")
    addr = env.get(MASTER_ADDR_ENV) or ("127.0.0.1" if nnodes == 1 else "")
    if not addr:
        raise LaunchError(f"{MASTER_ADDR_ENV} is unset; with {NNODES_ENV}={nnodes} it must name node 0's pod "
                          "(the operator sets <job>-0.<service>)")
    # One node and no port given (a local `rloop run`): any free port, so two runs on a machine never meet.
    port = _int_env(env, MASTER_PORT_ENV, DEFAULT_MASTER_PORT if nnodes > 1 else 0, 0) or _free_port(addr)
    return LaunchPlan(nnodes, node_rank, nproc, addr, port)


def _free_port(addr: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def exit_code_of(worker_codes: Mapping[int, int]) -> int:
    """The stage's exit code from its failed workers' codes ({global rank: code}; a signal is negative)."""
    codes = [128 - c if c < 0 else c for _, c in sorted(worker_codes.items())]
    for special in _EXIT_PRIORITY:
        if special in codes:
            return special
    return next((c for c in codes if c != 0), 1)


def launch(plan: LaunchPlan, stage_argv: list[str], run_id: str) -> int:
    """Run `python -m rloop <stage_argv>` as `plan.nproc_per_node` workers on this node; returns the
    stage's exit code once every worker here has exited (or one failed and the rest were stopped)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=run_id,
        rdzv_backend="static",
        rdzv_endpoint=f"{plan.master_addr}:{plan.master_port}",
        rdzv_configs={"rank": plan.node_rank, "timeout": RENDEZVOUS_TIMEOUT_S},
        max_restarts=0,
        monitor_interval=0.5,
    )
    print(f"rloop stage: node {plan.node_rank}/{plan.nnodes} starts {plan.nproc_per_node} worker(s), "
          f"world size {plan.world_size}, rendezvous {plan.master_addr}:{plan.master_port}", file=sys.stderr)
    try:
        elastic_launch(config, sys.executable)("-m", "rloop", *stage_argv)
    except ChildFailedError as err:
        return exit_code_of({rank: failure.exitcode for rank, failure in err.failures.items()})
    return 0
