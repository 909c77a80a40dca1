"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's `leaderelection` does it.

Every replica runs the kopf watches (so a standby knows every run the moment it takes over), but only
the replica holding the Lease starts its reconcile workers. The rules, in client-go's terms:

- A Lease is **expired** when its record (holder, renew time, resourceVersion) has not changed for
  `leaseDurationSeconds` *as observed on this replica's own monotonic clock*. Wall-clock times in the
  Lease are written for humans (`kubectl get lease`) and never compared across machines, so clock skew
  between nodes cannot make a live leader look expired.
- A candidate writes the Lease only with the `metadata.resourceVersion` it read (a merge patch with an
  optimistic lock; a create when there is none): of two candidates racing for an expired Lease, the API
  server lets exactly one write succeed, the other gets 409 and stays a standby.
- The leader renews every `retry_period`. It considers itself leader only until `renew_deadline`
  after the *start* of its last successful write. Since `renew_deadline < leaseDurationSeconds`, and a
  standby can only start its expiry clock after that write has happened, the old leader has stopped
  before any standby may acquire (given clocks that run at the same rate, which is all client-go
  assumes too). What stopping means is the caller's decision (handlers.py: the process exits).
- On a graceful shutdown the leader releases the Lease (empty holder), so a standby takes over at its
  next retry instead of after expiry.

Pure core: `read_lease`, `observe`, `decide`, `lease_spec`, `release_spec`. Thin edges: `Elector`
(one attempt per `tick`, through a `LeaseApi`) and `keep_leading` (the asyncio loop with the deadline).
Like client-go's, this is no fencing: a process frozen for longer than the renew deadline still holds
whatever request it had in flight. Correctness never depends on it (Job names are deterministic, a
create that finds its Job is a no-op); leader election keeps two replicas from doing the work twice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a pod finds its own namespace (the Lease's, unless the settings name one)."""
RELEASED_DURATION_SECONDS = 1
"""leaseDurationSeconds of a released Lease (client-go writes 1 as well)."""


class LeaseApi(Protocol):
    """The Lease calls the elector needs (`rloop_operator.k8s.KubeApi` implements them)."""

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Lease, or None when there is none."""

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None when one of that name exists already (another replica won)."""

    def patch_lease(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """The patched Lease, or None on 409 (stale resourceVersion: another replica wrote) or 404."""


# ------------------------------------------------------------------------------------------ pure core
@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says, as far as the election is concerned."""

    holder: str
    """`spec.holderIdentity`; "" when nobody holds it (released)."""
    duration_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    resource_version: str


@dataclass(frozen=True)
class Observation:
    record: LeaseRecord
    since: float
    """Local monotonic time this exact record (same resourceVersion) was first seen."""


class Step(enum.Enum):
    CREATE = "create"
    """No Lease exists: create it, holding it."""
    ACQUIRE = "acquire"
    """Another replica's Lease expired or was released: take it over."""
    RENEW = "renew"
    """This replica holds it: write a new renew time."""
    WAIT = "wait"
    """Another replica holds a live Lease: stay a standby."""


def micro_time(when: datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_lease(lease: dict[str, Any] | None, default_duration: int) -> LeaseRecord | None:
    """The record of a Lease object (None for none). A missing or non-positive duration reads as
    `default_duration`: a malformed Lease must not read as expired at once."""
    if lease is None:
        return None
    spec = lease.get("spec") if isinstance(lease.get("spec"), dict) else {}
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=duration if isinstance(duration, int) and duration > 0 else default_duration,
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=transitions if isinstance(transitions, int) and transitions >= 0 else 0,
        resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
    )


def observe(previous: Observation | None, record: LeaseRecord | None, now: float) -> Observation | None:
    """Track when the record last changed: an unchanged record keeps its first-seen time."""
    if record is None:
        return None
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


def decide(observation: Observation | None, identity: str, now: float) -> Step:
    """What a replica with `identity` does about the Lease it observes, at monotonic time `now`."""
    if observation is None:
        return Step.CREATE
    record = observation.record
    if record.holder == identity:
        return Step.RENEW
    if not record.holder or now >= observation.since + record.duration_seconds:
        return Step.ACQUIRE
    return Step.WAIT


def lease_spec(
    step: Step, record: LeaseRecord | None, identity: str, duration_seconds: int, now: datetime
) -> dict[str, Any]:
    """The Lease spec a CREATE, ACQUIRE or RENEW writes."""
    if step is Step.WAIT:
        raise ValueError("a standby writes nothing")
    stamp = micro_time(now)
    if step is Step.RENEW and record is not None:
        acquired, transitions = record.acquire_time or stamp, record.transitions
    else:
        # A new holder: leaseTransitions counts holder changes (a fresh Lease starts at 0).
        acquired = stamp
        transitions = 0 if record is None else record.transitions + (record.holder != identity)
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": duration_seconds,
        "acquireTime": acquired,
        "renewTime": stamp,
        "leaseTransitions": transitions,
    }


def release_spec(record: LeaseRecord, now: datetime) -> dict[str, Any]:
    """The spec that gives a Lease up: no holder, so any standby may acquire it at once."""
    stamp = micro_time(now)
    return {
        "holderIdentity": "",
        "leaseDurationSeconds": RELEASED_DURATION_SECONDS,
        "acquireTime": stamp,
        "renewTime": stamp,
        "leaseTransitions": record.transitions,
    }


def pod_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (from its service account mount), else `default`."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


# ------------------------------------------------------------------------------------- thin edges
class Elector:
    """One replica's side of the election. `tick` makes one attempt (blocking API calls: run it in a
    thread); `leading(now)` says whether this replica may act at monotonic time `now`."""

    def __init__(
        self,
        api: LeaseApi,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_seconds: int,
        renew_deadline_seconds: float,
    ):
        if not 0 < renew_deadline_seconds < lease_duration_seconds:
            raise ValueError(
                f"renew deadline ({renew_deadline_seconds}s) must be below the lease duration "
                f"({lease_duration_seconds}s): a leader must stop before a standby may take over"
            )
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_seconds = lease_duration_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self._lock = threading.Lock()
        self._observed: Observation | None = None
        self._renewed_at: float | None = None
        """Monotonic time our last successful write *started* (None: not leading)."""

    @property
    def holder(self) -> str | None:
        """The holder of the Lease as last observed (None: no Lease seen)."""
        observed = self._observed
        return None if observed is None else observed.record.holder

    def deadline(self) -> float | None:
        """Monotonic time until which this replica leads without another successful renewal."""
        renewed = self._renewed_at
        return None if renewed is None else renewed + self.renew_deadline_seconds

    def leading(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now < deadline

    def tick(self, now: float, wall: datetime) -> Step:
        """Observe the Lease, then create, acquire or renew it, or wait. `now` is taken before the
        request is sent, so a renewal counts from before it reached the API server (conservative)."""
        with self._lock:
            record = read_lease(self.api.get_lease(self.namespace, self.name), self.lease_duration_seconds)
            self._observed = observe(self._observed, record, now)
            if record is None or record.holder != self.identity:
                self._renewed_at = None  # someone else holds it (or it is gone): we lead no longer
            step = decide(self._observed, self.identity, now)
            if step is Step.WAIT:
                return step
            spec = lease_spec(step, record, self.identity, self.lease_duration_seconds, wall)
            if step is Step.CREATE:
                written = self.api.create_lease(
                    self.namespace,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": spec,
                    },
                )
            else:
                assert record is not None
                written = self.api.patch_lease(
                    self.namespace,
                    self.name,
                    # The resourceVersion makes the patch conditional: 409 if anyone wrote since our read.
                    {"metadata": {"resourceVersion": record.resource_version}, "spec": spec},
                )
            if written is None:
                self._renewed_at = None  # another replica wrote first
                return Step.WAIT
            mine = read_lease(written, self.lease_duration_seconds)
            assert mine is not None
            self._observed = Observation(mine, now)
            self._renewed_at = now
            return step

    def release(self, wall: datetime) -> bool:
        """Give the Lease up if we hold it (graceful shutdown, after the workers stopped); True when
        the write succeeded."""
        with self._lock:
            observed = self._observed
            self._renewed_at = None  # stop leading before the write: never lead on a released Lease
            if observed is None or observed.record.holder != self.identity:
                return False
            written = self.api.patch_lease(
                self.namespace,
                self.name,
                {
                    "metadata": {"resourceVersion": observed.record.resource_version},
                    "spec": release_spec(observed.record, wall),
                },
            )
            return written is not None


async def keep_leading(
    elector: Elector,
    *,
    retry_period: float,
    on_started: Callable[[], None],
    on_stopped: Callable[[], None],
    executor: Executor,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Try to acquire the Lease every `retry_period`; once leading, renew it every `retry_period`.
    Calls `on_started()` on becoming leader; when renewals fail until the renew deadline (or another
    replica holds the Lease), calls `on_stopped()` and returns: a replica leads at most once.

    `executor` runs the blocking ticks: give it its own thread, so renewals never wait behind
    reconcile passes. A tick still in flight at the deadline does not delay stepping down."""
    loop = asyncio.get_running_loop()
    leading = False
    holder: str | None = None
    in_flight: asyncio.Future[Step] | None = None
    """A tick still running in its thread (a hanging request): waited for again, never duplicated."""
    while True:
        now = clock()
        # Checked before anything else after a sleep: a replica frozen past its deadline (a long GC
        # pause, SIGSTOP) steps down before it does anything else.
        if leading and not elector.leading(now):
            break
        deadline = elector.deadline()
        budget = deadline - now if leading and deadline is not None else elector.renew_deadline_seconds
        if in_flight is None:
            in_flight = loop.run_in_executor(executor, elector.tick, now, wall())
        # asyncio.wait, not wait_for: a blocking call cannot be cancelled anyway, and on timeout it is
        # left to finish in its thread (and may still count, from the time it started).
        done, _ = await asyncio.wait({in_flight}, timeout=budget)
        if done:
            failure = in_flight.exception()
            in_flight = None
            if failure is not None:  # API errors: retried next tick; leadership kept until the deadline
                log.warning(
                    "Lease %s/%s: %s: %s", elector.namespace, elector.name, type(failure).__name__, failure
                )
        else:
            log.warning("Lease %s/%s: request took longer than %.1fs", elector.namespace, elector.name, budget)
        now = clock()
        if elector.leading(now):
            if not leading:
                leading = True
                log.info(
                    "leader: acquired Lease %s/%s as %s", elector.namespace, elector.name, elector.identity
                )
                on_started()
        elif leading:
            break
        elif elector.holder != holder:
            holder = elector.holder
            if holder:
                log.info("standby: Lease %s/%s is held by %s", elector.namespace, elector.name, holder)
        deadline = elector.deadline()
        delay = retry_period if not leading or deadline is None else min(retry_period, deadline - now)
        await sleep(max(delay, 0.0))
    log.error(
        "leader: lost Lease %s/%s (not renewed within %.1fs; last seen held by %r)",
        elector.namespace,
        elector.name,
        elector.renew_deadline_seconds,
        elector.holder,
    )
    on_stopped()
