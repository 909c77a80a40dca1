"""What runs next: a pure function of (spec, committed stages).

Both executors (the local runner and the Kubernetes operator) call `plan()` and run what it returns;
neither has loop logic of its own. A stage is identified by its directory in the run's store
(`base/init`, `iter-001/rl`, `iter-001/eval/heldout`, ...), which is also its id.

The DAG, for iteration k (P_k = policy entering iteration k, P_0 = `base/init/policy`):

    rloop mode:  rl(k) from P_k → [rollout(k) from checkpoints] → verify(k) → rft(k) = P_{k+1}
                 (verify(k) also reads verify(k-1) with loop.filter.accumulate)
                 eval(k, set) evaluates P_{k+1}; rl(k+1) starts from P_{k+1}
    rl mode:     rl(k) from the previous RL end policy (or P_0); eval(k, set) evaluates it
    both:        base/init builds or imports P_0; base/eval/<set> evaluates P_0 (loop.eval.evalBase);
                 eval(k, set) also waits for the previous eval of the set (forgetting rate needs it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rloop.spec import RLoopRunSpec

StageKind = Literal["init", "rl", "rollout", "verify", "rft", "eval"]
STAGE_KINDS: tuple[str, ...] = ("init", "rl", "rollout", "verify", "rft", "eval")


@dataclass(frozen=True)
class Stage:
    """One unit of work; `iteration` None means the base policy (init, base eval)."""

    kind: StageKind
    iteration: int | None = None
    eval_set: str | None = None

    @property
    def prefix(self) -> str:
        return "base" if self.iteration is None else f"iter-{self.iteration:03d}"

    @property
    def id(self) -> str:
        """Directory of the stage's outputs inside the run, and its identity."""
        tail = f"/{self.eval_set}" if self.eval_set else ""
        return f"{self.prefix}/{self.kind}{tail}"

    @classmethod
    def from_id(cls, stage_id: str) -> Stage:
        parts = stage_id.split("/")
        if len(parts) not in (2, 3) or parts[1] not in STAGE_KINDS:
            raise ValueError(f"not a stage id: {stage_id!r} (expected e.g. 'iter-000/rl' or 'base/eval/heldout')")
        it = None if parts[0] == "base" else int(parts[0].removeprefix("iter-"))
        return cls(parts[1], it, parts[2] if len(parts) == 3 else None)  # type: ignore[arg-type]

    def cli_args(self) -> list[str]:
        """Arguments after `rloop stage <kind> --run URI` that select this stage."""
        args = [] if self.iteration is None else ["--iteration", str(self.iteration)]
        return args + (["--set", self.eval_set] if self.eval_set else [])


@dataclass(frozen=True)
class Plan:
    """`ready`: stages whose inputs are all committed, in DAG order (run any, or all in parallel)."""

    ready: tuple[Stage, ...]
    done: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done == self.total


def policy_in(spec: RLoopRunSpec, k: int) -> str:
    """Store path (relative to the run) of P_k, the policy iteration k starts from."""
    if k == 0:
        return "base/init/policy"
    return policy_out(spec, k - 1)


def policy_out(spec: RLoopRunSpec, k: int) -> str:
    """Store path of the policy iteration k produces (what its eval measures)."""
    if spec.mode == "rl":
        return f"iter-{k:03d}/rl/final"
    return f"iter-{k:03d}/rft/policy"


def rft_init_policy(spec: RLoopRunSpec, k: int) -> str:
    """RFT fine-tunes P_k (`initial`, RLoop) or always P_0 (`base`)."""
    return "base/init/policy" if spec.loop.rft.init_policy == "base" else policy_in(spec, k)


def _producer(spec: RLoopRunSpec, policy_path: str) -> Stage:
    stage_id = policy_path.rsplit("/", 1)[0]
    return Stage.from_id(stage_id)


def dependencies(spec: RLoopRunSpec, stage: Stage) -> list[Stage]:
    """Stages whose committed outputs `stage` reads."""
    k = stage.iteration
    if stage.kind == "init":
        return []
    if stage.kind == "eval":
        if k is None:
            return [Stage("init")]
        prev_eval = (
            Stage("eval", k - 1, stage.eval_set)
            if k > 0
            else (Stage("eval", None, stage.eval_set) if spec.loop.eval.eval_base else None)
        )
        deps = [_producer(spec, policy_out(spec, k))]
        return deps + ([prev_eval] if prev_eval else [])
    assert k is not None, f"{stage.kind} needs an iteration"
    if stage.kind == "rl":
        return [_producer(spec, policy_in(spec, k))]
    if stage.kind == "rollout":
        return [Stage("rl", k)]
    if stage.kind == "verify":
        pool = Stage("rollout", k) if spec.loop.pool.source == "checkpoints" else Stage("rl", k)
        # loop.filter.accumulate: the expert set grows from the previous iteration's
        return [pool] + ([Stage("verify", k - 1)] if spec.loop.filter.accumulate and k > 0 else [])
    if stage.kind == "rft":
        return [Stage("verify", k), _producer(spec, rft_init_policy(spec, k))]
    raise ValueError(f"unknown stage kind {stage.kind!r}")


def all_stages(spec: RLoopRunSpec) -> list[Stage]:
    """Every stage of the run in a valid execution order."""
    sets = [s.name for s in spec.data.eval]
    out: list[Stage] = [Stage("init")]
    if spec.loop.eval.eval_base:
        out += [Stage("eval", None, s) for s in sets]
    for k in range(spec.loop.iterations):
        out.append(Stage("rl", k))
        if spec.mode == "rloop":
            if spec.loop.pool.source == "checkpoints":
                out.append(Stage("rollout", k))
            out += [Stage("verify", k), Stage("rft", k)]
        out += [Stage("eval", k, s) for s in sets]
    return out


def plan(spec: RLoopRunSpec, committed: set[str] | frozenset[str]) -> Plan:
    """Next runnable stages given the ids of committed stages. Pure; safe to call at any time."""
    stages = all_stages(spec)
    ids = {s.id for s in stages}
    done = {s for s in stages if s.id in committed}
    ready = tuple(
        s for s in stages if s not in done and all(d.id in committed for d in dependencies(spec, s))
    )
    return Plan(ready=ready, done=len(done & set(stages)), total=len(ids))
