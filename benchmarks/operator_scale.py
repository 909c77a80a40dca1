"""Operator scale benchmark: N concurrent RLoopRuns through the real operator, Jobs completed instantly.

    python benchmarks/operator_scale.py                  # N = 1, 10, 100
    python benchmarks/operator_scale.py --runs 1 10 --iterations 1

Parts: the patched kmock API emulator (tests/k8s/apiserver.py) on 127.0.0.1, the test kubelet in
instant mode (every Job succeeds as soon as it is created, with a stage summary as its pod's
termination message), and the real operator (`kopf run -m rloop_operator`) as a subprocess.

Measured per N (a fresh emulator and operator for each):
- stage-transition latency: for each Job after a run's first, the time from the run's latest Job
  finishing to this Job's creation, both taken from the emulator's own event stream;
- API requests per transition: the operator's HTTP requests (watch streams excluded) over the Jobs
  created after each run's first;
- operator peak RSS (VmHWM of the process), and the same for the peer, a bare kopf operator with
  no-op handlers watching the same resources in the finished cluster: what kopf alone costs.
Targets (issue 3): p50 < 1 s and peak RSS < 300 MB at N = 100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rloop_operator.naming import LABEL_MANAGED_BY, LABEL_RUN, MANAGED_BY  # noqa: E402
from tests.k8s.apiserver import JOBS, RLOOPRUNS, Server, start, wait_until  # noqa: E402
from tests.k8s.kubelet import Kubelet  # noqa: E402
from tests.k8s.operator import OperatorProcess, peak_rss_bytes, sample  # noqa: E402
from tests.s3harness import free_ports  # noqa: E402

NS = "bench"
PEER = Path(__file__).with_name("kopf_noop_peer.py")


def run_manifest(name: str, iterations: int) -> dict[str, Any]:
    return {
        "apiVersion": "rloop.dev/v1alpha1",
        "kind": "RLoopRun",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"base": "builtin:tiny"},
            "data": {
                "train": {"synthetic": {"task": "subset-sum", "split": "train", "size": 32}},
                "eval": [
                    {"name": "heldout", "synthetic": {"task": "subset-sum", "split": "heldout", "size": 16}}
                ],
            },
            "verifier": {"name": "subset_sum"},
            "loop": {"iterations": iterations, "eval": {"kList": [1, 4]}},
            "storage": {"uri": "s3://bench/runs"},
        },
    }


def instant_message(job: dict[str, Any]) -> str:
    """What a finished stage would report (so the status gets metrics, as in a real run)."""
    stage = job["metadata"]["labels"].get("rloop.dev/stage", "")
    if stage.endswith(".rl"):
        return json.dumps({"train_reward_last10pct": 0.5})
    if ".eval." in stage:
        return json.dumps({"avg_at_n": 0.4, "pass_at_k": {"1": 0.4, "4": 0.8}})
    return json.dumps({"stage": stage})


class Recorder:
    """Timestamps of Job creations and completions, per run, from the emulator's event stream."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[str, list[tuple[float, str]]] = {}
        self.finished: dict[str, list[float]] = {}
        self._done: set[str] = set()

    def __call__(self, resource: Any, event: dict[str, Any]) -> None:
        if getattr(resource, "plural", None) != "jobs":
            return
        t = time.perf_counter()
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        run = (meta.get("labels") or {}).get(LABEL_RUN)
        if run is None:
            return
        with self.lock:
            if event.get("type") == "ADDED":
                self.created.setdefault(run, []).append((t, meta["name"]))
            elif (obj.get("status") or {}).get("succeeded") and meta["name"] not in self._done:
                self._done.add(meta["name"])
                self.finished.setdefault(run, []).append(t)

    def latencies(self) -> list[float]:
        out = []
        with self.lock:
            for run, created in self.created.items():
                finished = sorted(self.finished.get(run, []))
                for t, _ in sorted(created)[1:]:
                    before = [f for f in finished if f <= t]
                    if before:
                        out.append(t - before[-1])
        return out

    def transitions(self) -> int:
        with self.lock:
            return sum(max(len(c) - 1, 0) for c in self.created.values())


def api_requests(server: Server) -> int:
    """Operator HTTP requests so far, watch streams excluded."""
    return server.request_count - server.watch_count


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def measure(n: int, iterations: int, workers: int, tmp: Path) -> dict[str, Any]:
    server = start()
    server.create_namespace(NS)
    recorder = Recorder()
    server.add_listener(recorder)
    kubelet = Kubelet(server, namespace=NS, instant=True, instant_message=instant_message, poll_interval=0.2)
    kubelet.start()
    operator = OperatorProcess(server, tmp / f"operator-{n}.log", namespace=NS, workers=workers).start()
    try:
        requests0 = api_requests(server)
        t0 = time.perf_counter()
        for i in range(n):
            server.create(RLOOPRUNS, run_manifest(f"run-{i:03d}", iterations), namespace=NS)

        def all_done() -> bool:
            runs = server.list(RLOOPRUNS, NS)
            return len(runs) == n and all(
                any(
                    c["type"] == "Succeeded" and c["status"] == "True"
                    for c in (r.get("status") or {}).get("conditions") or []
                )
                for r in runs
            )

        wait_until(all_done, timeout=600, interval=0.25, message=f"{n} runs to succeed")
        wall = time.perf_counter() - t0
        requests = api_requests(server) - requests0
        rss = operator.peak_rss_bytes()
        metrics = operator.metrics()
        jobs = len(server.list(JOBS, NS))
        assert jobs == n * (1 + 1 + 4 * iterations), f"expected one Job per stage, found {jobs}"
    finally:
        operator.stop()
    peer_rss = measure_peer(server, tmp / f"peer-{n}.log")
    kubelet.stop()
    server.stop()
    lat = recorder.latencies()
    transitions = recorder.transitions()
    return {
        "n": n,
        "transitions": transitions,
        "p50_ms": 1000 * percentile(lat, 0.50),
        "p95_ms": 1000 * percentile(lat, 0.95),
        "max_ms": 1000 * max(lat) if lat else float("nan"),
        "req_per_transition": requests / max(transitions, 1),
        "rss_mb": rss / 2**20,
        "peer_rss_mb": peer_rss / 2**20,
        "wall_s": wall,
        "reconciles": sample(metrics, "rloop_reconcile_duration_seconds_count") or 0,
        "mean_reconcile_ms": 1000
        * (sample(metrics, "rloop_reconcile_duration_seconds_sum") or 0)
        / max(sample(metrics, "rloop_reconcile_duration_seconds_count") or 1, 1),
    }


def measure_peer(server: Server, log_path: Path) -> int:
    """Peak RSS of a bare kopf operator (no-op handlers, same watches) over the finished cluster."""
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "RLOOP_"))}
    env.update(server.env(), RLOOP_BENCH_SELECTOR=f"{LABEL_MANAGED_BY}={MANAGED_BY}")
    cmd = [
        sys.executable,
        "-m",
        "kopf",
        "run",
        str(PEER),
        "--standalone",
        "--namespace",
        NS,
        f"--liveness=http://127.0.0.1:{port}/healthz",
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        def live() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(live, timeout=60, interval=0.2, message="the kopf peer to start")
        # The peer has seen everything once its handler log mentions every object (runs + Jobs).
        expected = len(server.list(RLOOPRUNS, NS)) + len(server.list(JOBS, NS))
        wait_until(
            lambda: log_path.read_text().count("noop-seen") >= expected,
            timeout=120,
            interval=0.2,
            message="the kopf peer to list every object",
        )
        return peak_rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, nargs="+", default=[1, 10, 100], help="N values (concurrent runs)")
    ap.add_argument("--iterations", type=int, default=2, help="RLoop iterations per run (4 stages each)")
    ap.add_argument("--workers", type=int, default=8, help="operator reconcile workers (its default: 8)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rloop-bench-") as d:
        rows = []
        for n in args.runs:
            print(f"N={n}: running ...", file=sys.stderr, flush=True)
            rows.append(measure(n, args.iterations, args.workers, Path(d)))
    stages = 2 + 4 * args.iterations
    print(
        f"\nOperator scale: {stages} stages per run, instant kubelet, {args.workers} workers, "
        f"{os.cpu_count()} CPUs\n"
    )
    print(
        "| N runs | transitions | latency p50 (ms) | p95 (ms) | max (ms) | API requests / transition "
        "| operator peak RSS (MB) | bare kopf peer RSS (MB) | ratio | mean reconcile (ms) | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['transitions']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['max_ms']:.0f} "
            f"| {r['req_per_transition']:.1f} | {r['rss_mb']:.0f} | {r['peer_rss_mb']:.0f} "
            f"| {r['rss_mb'] / r['peer_rss_mb']:.2f} | {r['mean_reconcile_ms']:.1f} | {r['wall_s']:.1f} |"
        )
    last = rows[-1]
    ok = last["p50_ms"] < 1000 and last["rss_mb"] < 300
    print(f"\ntargets at N={last['n']} (p50 < 1000 ms, peak RSS < 300 MB): {'met' if ok else 'NOT met'}")
    print(f"RESULT n={last['n']} p50_ms={last['p50_ms']:.0f} p95_ms={last['p95_ms']:.0f} "
          f"req_per_transition={last['req_per_transition']:.1f} rss_mb={last['rss_mb']:.0f} "
          f"rss_ratio_vs_kopf={last['rss_mb'] / last['peer_rss_mb']:.2f} targets_met={int(ok)}")


if __name__ == "__main__":
    main()
