"""Leader election (rloop_operator.leader): the pure decision (expiry on the local clock, renew, takeover,
release), the Elector against a fake API server with optimistic locking, a randomised schedule of two
and three replicas with partitions and pauses where no two ever lead at once, and the asyncio loop's
deadline (a leader whose renewals fail steps down in time, even with a request hanging)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rloop_operator.leader import (
    Elector,
    LeaseRecord,
    Observation,
    Step,
    decide,
    keep_leading,
    lease_spec,
    observe,
    read_lease,
    release_spec,
)

NS, NAME = "rloop-system", "rloop-operator"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(holder: str = "a", rv: str = "1", duration: int = 15, transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(holder, duration, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z",
                       transitions, rv)


# ------------------------------------------------------------------------------------------ pure core
def test_no_lease_is_created() -> None:
    assert decide(None, "a", 0.0) is Step.CREATE


def test_own_lease_is_renewed_even_when_it_looks_expired() -> None:
    assert decide(Observation(record("a"), since=0.0), "a", now=1000.0) is Step.RENEW


def test_a_live_lease_of_another_is_waited_for_until_its_duration_passes_on_our_clock() -> None:
    seen = Observation(record("b", duration=15), since=100.0)
    assert decide(seen, "a", 100.0) is Step.WAIT
    assert decide(seen, "a", 114.99) is Step.WAIT
    assert decide(seen, "a", 115.0) is Step.ACQUIRE


def test_a_released_lease_is_acquired_at_once() -> None:
    assert decide(Observation(record(""), since=50.0), "a", 50.0) is Step.ACQUIRE


def test_expiry_counts_from_when_the_record_last_changed_not_from_its_wall_clock_times() -> None:
    # The renew time in the Lease is from another node's clock: an hour in the past means nothing.
    stale_clock = LeaseRecord("b", 15, "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z", 0, "7")
    first = observe(None, stale_clock, now=10.0)
    assert first is not None and decide(first, "a", 10.0) is Step.WAIT
    # The same record seen again keeps its first-seen time; a renewal (new resourceVersion) restarts it.
    again = observe(first, stale_clock, now=20.0)
    assert again is first and decide(again, "a", 25.0) is Step.ACQUIRE
    renewed = observe(again, LeaseRecord("b", 15, "2020-01-01T00:00:00Z", "2020-01-01T00:00:02Z", 0, "8"), 24.0)
    assert renewed is not None and renewed.since == 24.0 and decide(renewed, "a", 25.0) is Step.WAIT
    assert observe(renewed, None, 26.0) is None


def test_read_lease_tolerates_missing_and_malformed_fields() -> None:
    assert read_lease(None, 15) is None
    empty = read_lease({"metadata": {"resourceVersion": "3"}}, 15)
    assert empty == LeaseRecord("", 15, None, None, 0, "3")
    bad = read_lease({"metadata": {}, "spec": {"holderIdentity": "b", "leaseDurationSeconds": 0,
                                               "leaseTransitions": -4}}, 15)
    # A zero duration would read as expired at once: take our own instead.
    assert bad == LeaseRecord("b", 15, None, None, 0, "")


def test_lease_specs_count_holder_changes_and_keep_the_acquire_time_on_renewal() -> None:
    created = lease_spec(Step.CREATE, None, "a", 15, T0)
    assert created == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-01-01T00:00:00.000000Z",
        "renewTime": "2026-01-01T00:00:00.000000Z",
        "leaseTransitions": 0,
    }
    later = T0 + timedelta(seconds=2, microseconds=5)
    renewed = lease_spec(Step.RENEW, record("a", transitions=4), "a", 15, later)
    assert renewed["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert renewed["renewTime"] == "2026-01-01T00:00:02.000005Z" and renewed["leaseTransitions"] == 4
    taken = lease_spec(Step.ACQUIRE, record("b", transitions=4), "a", 15, later)
    assert taken["acquireTime"] == taken["renewTime"] and taken["leaseTransitions"] == 5
    with pytest.raises(ValueError):
        lease_spec(Step.WAIT, record("b"), "a", 15, later)
    released = release_spec(record("a", transitions=5), later)
    assert released["holderIdentity"] == "" and released["leaseTransitions"] == 5
    assert released["leaseDurationSeconds"] == 1


# ------------------------------------------------------------------------ a fake API server's Lease
class Unreachable(ConnectionError):
    pass


class FakeLeaseServer:
    """One Lease with the API server's optimistic concurrency: a merge patch naming a stale
    resourceVersion answers 409 (None here), a second create answers AlreadyExists (None)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.lock = threading.Lock()

    def client(self, reachable: dict[str, bool] | None = None, name: str = "") -> FakeLeaseApi:
        return FakeLeaseApi(self, reachable if reachable is not None else {}, name)


class FakeLeaseApi:
    def __init__(self, server: FakeLeaseServer, reachable: dict[str, bool], name: str):
        self.server, self.reachable, self.name = server, reachable, name
        self.calls: list[str] = []

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if not self.reachable.get(self.name, True):
            raise Unreachable(f"{self.name}: API server unreachable")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get")
        with self.server.lock:
            return copy.deepcopy(self.server.lease)

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self._check("create")
        with self.server.lock:
            if self.server.lease is not None:
                return None
            self.server.rv += 1
            self.server.lease = {**copy.deepcopy(body), "metadata": {**body["metadata"],
                                                                     "resourceVersion": str(self.server.rv)}}
            return copy.deepcopy(self.server.lease)

    def patch_lease(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        self._check("patch")
        with self.server.lock:
            lease = self.server.lease
            if lease is None:
                return None
            if patch["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"]:
                return None  # 409 Conflict
            self.server.rv += 1
            lease["spec"].update(patch["spec"])
            lease["metadata"]["resourceVersion"] = str(self.server.rv)
            return copy.deepcopy(lease)


def elector(api: FakeLeaseApi, identity: str, duration: int = 15, deadline: float = 10.0) -> Elector:
    return Elector(api, namespace=NS, name=NAME, identity=identity, lease_duration_seconds=duration,
                   renew_deadline_seconds=deadline)


def wall(t: float) -> datetime:
    return T0 + timedelta(seconds=t)


# ------------------------------------------------------------------------------------------ Elector
def test_renew_deadline_must_be_below_the_lease_duration() -> None:
    with pytest.raises(ValueError, match="below the lease duration"):
        elector(FakeLeaseServer().client(), "a", duration=10, deadline=10.0)


def test_first_replica_creates_the_lease_and_the_second_waits_then_takes_over_after_expiry() -> None:
    server = FakeLeaseServer()
    a, b = elector(server.client(), "a"), elector(server.client(), "b")
    assert a.tick(0.0, wall(0)) is Step.CREATE and a.leading(0.0)
    assert b.tick(0.5, wall(0.5)) is Step.WAIT and not b.leading(0.5) and b.holder == "a"
    assert a.tick(2.0, wall(2)) is Step.RENEW and a.leading(11.9) and not a.leading(12.0)
    # a dies after its renewal at t=2; b first saw that renewal at t=2.5 and waits 15 s from then.
    assert b.tick(2.5, wall(2.5)) is Step.WAIT
    assert b.tick(17.4, wall(17.4)) is Step.WAIT and not b.leading(17.4)
    assert b.tick(17.5, wall(17.5)) is Step.ACQUIRE and b.leading(17.5)
    spec = server.lease["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    # a wakes up: it sees b's Lease and leads no longer, whatever it believed.
    assert a.tick(18.0, wall(18)) is Step.WAIT and not a.leading(18.0)


def test_of_two_replicas_racing_for_an_expired_lease_only_one_wins() -> None:
    server = FakeLeaseServer()
    old = elector(server.client(), "old")
    old.tick(0.0, wall(0))
    a, b = elector(server.client(), "a"), elector(server.client(), "b")
    a.tick(1.0, wall(1))
    b.tick(1.0, wall(1))
    # Both read the same expired record, then both write with its resourceVersion: one gets 409.
    gate = threading.Barrier(2)
    real_get = FakeLeaseApi.get_lease

    def synchronised_get(self: FakeLeaseApi, namespace: str, name: str) -> dict[str, Any] | None:
        found = real_get(self, namespace, name)
        gate.wait(5)
        return found

    FakeLeaseApi.get_lease = synchronised_get  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(2) as pool:
            steps = list(pool.map(lambda e: e.tick(16.0, wall(16)), (a, b)))
    finally:
        FakeLeaseApi.get_lease = real_get  # type: ignore[method-assign]
    assert sorted(s.value for s in steps) == ["acquire", "wait"]
    assert [a.leading(16.0), b.leading(16.0)].count(True) == 1
    assert server.lease["spec"]["holderIdentity"] in ("a", "b")


def test_a_leader_whose_renewals_fail_leads_only_until_the_renew_deadline() -> None:
    server = FakeLeaseServer()
    reachable = {"a": True}
    a = elector(server.client(reachable, "a"), "a")
    a.tick(0.0, wall(0))
    reachable["a"] = False
    for t in (2.0, 4.0, 6.0, 8.0):
        with pytest.raises(Unreachable):
            a.tick(t, wall(t))
        assert a.leading(t)
    assert not a.leading(10.0)


def test_release_lets_a_standby_acquire_at_its_next_try_without_waiting_for_expiry() -> None:
    server = FakeLeaseServer()
    a, b = elector(server.client(), "a"), elector(server.client(), "b")
    a.tick(0.0, wall(0))
    b.tick(0.1, wall(0.1))
    assert a.release(wall(1)) is True and not a.leading(1.0)
    assert server.lease["spec"]["holderIdentity"] == ""
    assert b.tick(1.2, wall(1.2)) is Step.ACQUIRE and b.leading(1.2)
    assert a.release(wall(2)) is False  # no longer ours: nothing written
    assert server.lease["spec"]["holderIdentity"] == "b"


def test_a_deleted_lease_is_recreated_by_its_holder() -> None:
    server = FakeLeaseServer()
    a = elector(server.client(), "a")
    a.tick(0.0, wall(0))
    server.lease = None
    assert a.tick(2.0, wall(2)) is Step.CREATE and a.leading(2.0)


def test_a_leader_that_sees_another_holder_stops_at_once_not_at_its_deadline() -> None:
    """The Lease deleted (by hand, a namespace restore) and re-created by a standby: the old leader's
    next tick sees the other holder and steps down then, well before its renew deadline."""
    server = FakeLeaseServer()
    a, b = elector(server.client(), "a"), elector(server.client(), "b")
    a.tick(0.0, wall(0))
    server.lease = None
    assert b.tick(1.0, wall(1)) is Step.CREATE and b.leading(1.0)
    assert a.leading(1.5)  # it cannot know before it looks
    assert a.tick(2.0, wall(2)) is Step.WAIT
    assert not a.leading(2.0) and a.deadline() is None


@pytest.mark.parametrize("seed", range(40))
def test_never_two_leaders_under_random_schedules_partitions_and_pauses(seed: int) -> None:
    """Replicas tick at random moments (long gaps = paused processes), some lose the API server for a
    while; whatever each believes, at no instant do two of them lead. Leadership does change hands."""
    rng = random.Random(seed)
    server = FakeLeaseServer()
    names = ["a", "b", "c"][: 2 + seed % 2]
    reachable = dict.fromkeys(names, True)
    electors = {n: elector(server.client(reachable, n), n, duration=3, deadline=2.0) for n in names}
    now, holders = 0.0, set()
    for _ in range(400):
        now += rng.choice([0.05, 0.2, 0.5, 0.5, 1.0, 2.5])
        if rng.random() < 0.05:
            who = rng.choice(names)
            reachable[who] = not reachable[who]
        who = rng.choice(names)
        with contextlib.suppress(Unreachable):
            electors[who].tick(now, wall(now))
        # Check at this instant, and at instants just before the next tick could happen.
        for t in (now, now + 0.01, now + 0.049):
            leaders = [n for n, e in electors.items() if e.leading(t)]
            assert len(leaders) <= 1, f"t={t}: {leaders} all lead"
            holders.update(leaders)
    assert len(holders) >= 2, "leadership never changed hands: the schedule tested nothing"


# ------------------------------------------------------------------------------------- keep_leading
class FakeClock:
    """Monotonic time that moves only when the loop sleeps; `on_sleep(now)` runs after each move, so
    what happens between two ticks is fixed by the schedule, not by thread timing."""

    def __init__(self, on_sleep: Callable[[float], None] = lambda now: None) -> None:
        self.now = 0.0
        self.on_sleep = on_sleep

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep(self.now)
        await asyncio.sleep(0)


def run_keep_leading(e: Elector, clock: FakeClock, events: list[tuple[str, float]], until: float) -> None:
    """keep_leading on the fake clock until it returns or the clock passes `until`."""

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            task = asyncio.create_task(keep_leading(
                e, retry_period=2.0, executor=executor, clock=clock, wall=lambda: wall(clock.now),
                sleep=clock.sleep,
                on_started=lambda: events.append(("started", clock.now)),
                on_stopped=lambda: events.append(("stopped", clock.now)),
            ))
            while not task.done() and clock.now <= until:
                await asyncio.sleep(0.001)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_keep_leading_starts_once_and_steps_down_at_the_deadline_when_renewals_fail() -> None:
    server = FakeLeaseServer()
    reachable = {"a": True}
    a = elector(server.client(reachable, "a"), "a", duration=15, deadline=10.0)

    def partition_at_5(now: float) -> None:
        if now >= 5.0:
            reachable["a"] = False  # the renewals at t=0, 2 and 4 succeed; from t=6 on they fail

    events: list[tuple[str, float]] = []
    run_keep_leading(a, FakeClock(partition_at_5), events, until=60.0)
    # The last successful renewal started at t=4: leadership ends at 14, not at the next retry (16).
    assert events == [("started", 0.0), ("stopped", 14.0)]


def test_a_standby_keeps_waiting_while_the_holder_renews_and_takes_over_when_it_stops() -> None:
    server = FakeLeaseServer()
    holder = elector(server.client(), "holder")
    holder.tick(0.0, wall(0))
    b = elector(server.client(), "b", duration=15, deadline=10.0)

    def holder_renews_until_30(now: float) -> None:
        if now <= 30.0:
            holder.tick(now, wall(now))

    events: list[tuple[str, float]] = []
    run_keep_leading(b, FakeClock(holder_renews_until_30), events, until=60.0)
    # b ticks every 2 s; the holder's last renewal is at t=30, b sees it at its tick at t=30 (after the
    # renewal) and acquires 15 s later, at its first tick at or after t=45.
    assert events[0] == ("started", 46.0), events


def test_keep_leading_steps_down_at_the_deadline_while_a_renewal_hangs() -> None:
    """A request that never answers must not keep a leader leading past its deadline."""
    server = FakeLeaseServer()
    hang = threading.Event()
    release = threading.Event()
    api = server.client(name="a")
    real_get = api.get_lease

    def get_lease(namespace: str, name: str) -> dict[str, Any] | None:
        if hang.is_set():
            release.wait(10)
        return real_get(namespace, name)

    api.get_lease = get_lease  # type: ignore[method-assign]
    a = elector(api, "a", duration=3, deadline=0.6)
    stopped_after: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with ThreadPoolExecutor(1) as executor:
            started = asyncio.Event()
            task = asyncio.create_task(keep_leading(
                a, retry_period=0.2, on_started=started.set,
                on_stopped=lambda: stopped_after.append(loop.time() - t0), executor=executor,
            ))
            await asyncio.wait_for(started.wait(), 5)
            hang.set()
            await asyncio.wait_for(task, 5)
            release.set()

    asyncio.run(scenario())
    # Leadership started near t=0 and was renewed at most once before the hang: it ends by ~0.8 s.
    assert stopped_after and stopped_after[0] < 1.5, stopped_after
