"""The real operator (`kopf run -m rloop_operator`) as a subprocess against the emulator, for tests and
benchmarks: start, wait for /healthz, scrape /metrics, SIGKILL, restart, peak RSS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.k8s.apiserver import Server, wait_until
from tests.s3harness import free_ports

IMAGE = "rloop/trainer:test"
LEASE_ENV = {
    # Leader election stays on (as in the chart), with short timings: a restarted operator (a new
    # identity) waits out the killed one's Lease, and 3 s keeps that short.
    "RLOOP_OPERATOR_LEASE_NAMESPACE": "default",
    "RLOOP_OPERATOR_LEASE_DURATION_SECONDS": "3",
    "RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS": "2",
    "RLOOP_OPERATOR_RETRY_PERIOD_SECONDS": "0.5",
}


class OperatorProcess:
    def __init__(
        self,
        server: Server,
        log_path: Path,
        *,
        namespace: str | None = None,
        workers: int = 8,
        extra_env: dict[str, str] | None = None,
    ):
        self.server = server
        self.log_path = log_path
        self.namespace = namespace
        self.workers = workers
        self.extra_env = dict(extra_env or {})
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        scope = ["--namespace", self.namespace] if self.namespace else ["--all-namespaces"]
        return [sys.executable, "-m", "kopf", "run", "-m", "rloop_operator", "--standalone", *scope]

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RLOOP_", "KUBE"))}
        env.update(self.server.env())
        env.update(
            RLOOP_OPERATOR_IMAGE=IMAGE,
            RLOOP_OPERATOR_METRICS_HOST="127.0.0.1",
            RLOOP_OPERATOR_METRICS_PORT=str(self.port),
            RLOOP_OPERATOR_WORKERS=str(self.workers),
            PYTHONUNBUFFERED="1",
        )
        env.update(LEASE_ENV)
        env.update(self.extra_env)
        self.starts += 1
        log = self.log_path.open("a")
        log.write(f"\n===== operator start #{self.starts} =====\n")
        log.flush()
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_until(
            self._healthy,
            timeout=timeout,
            interval=0.1,
            message=f"the operator's /healthz (log: {self.log_path})\n{self.log_tail()}",
        )
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return self.get("/healthz").strip() == "ok"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return resp.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")

    def peak_rss_bytes(self) -> int:
        """VmHWM of the running operator (the kernel's peak resident set size)."""
        assert self.proc is not None
        return peak_rss_bytes(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (a long GC pause, a partitioned node) but not gone."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process (the kernel's peak resident set size), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"VmHWM not found for pid {pid}")


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must match exactly the given ones)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_for(
    predicate, timeout: float, message: str, operator: OperatorProcess | None = None, interval: float = 0.2
):
    """wait_until, with the operator's log tail in the error."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval, message=message)
    except TimeoutError as err:
        tail = operator.log_tail() if operator else ""
        raise TimeoutError(f"{err}\n--- operator log tail ---\n{tail}") from None
