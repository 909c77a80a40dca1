"""Operator settings: environment variables, typed and validated once at start-up.

The Helm chart sets these on the Deployment; `kopf run` flags choose the namespaces to watch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "RLOOP_OPERATOR_"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(
        "rloop/trainer:0.1.0",
        min_length=1,
        description="Stage image for runs that name none in spec.resources (RLOOP_OPERATOR_IMAGE).",
    )
    metrics_host: str = Field(
        "0.0.0.0", description="Address the /metrics and /healthz server binds (RLOOP_OPERATOR_METRICS_HOST)."
    )
    metrics_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="Port of /metrics and /healthz; 0 picks a free one (…_METRICS_PORT).",
    )
    workers: int = Field(8, ge=1, le=64, description="Runs reconciled concurrently (RLOOP_OPERATOR_WORKERS).")
    resync_seconds: float = Field(
        300.0,
        gt=0,
        description="Every run is reconciled at least this often even without events "
        "(RLOOP_OPERATOR_RESYNC_SECONDS), like controller-runtime's SyncPeriod.",
    )
    stuck_seconds: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when a queued run has waited this long for a worker "
        "(RLOOP_OPERATOR_STUCK_SECONDS): the liveness probe then restarts the operator.",
    )
    leader_election: bool = Field(
        True,
        description="Only the replica holding the Lease reconciles (RLOOP_OPERATOR_LEADER_ELECTION); "
        "false: this replica acts at once, for a single replica that must not wait for a Lease.",
    )
    lease_name: str = Field(
        "rloop-operator",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the coordination.k8s.io/v1 Lease (RLOOP_OPERATOR_LEASE_NAME).",
    )
    lease_namespace: str = Field(
        "",
        max_length=63,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        description="Namespace of the Lease (RLOOP_OPERATOR_LEASE_NAMESPACE); empty: the pod's own.",
    )
    lease_duration_seconds: int = Field(
        15,
        ge=1,
        le=3600,
        description="A Lease not renewed for this long may be taken over (…_LEASE_DURATION_SECONDS).",
    )
    renew_deadline_seconds: float = Field(
        10.0,
        gt=0,
        description="The leader stops acting when it could not renew for this long "
        "(…_RENEW_DEADLINE_SECONDS); below the lease duration.",
    )
    retry_period_seconds: float = Field(
        2.0,
        gt=0,
        description="Renewals and acquisition attempts this often (…_RETRY_PERIOD_SECONDS); below the "
        "renew deadline.",
    )

    @model_validator(mode="after")
    def _leader_timings_nest(self) -> OperatorSettings:
        # client-go's rule: a leader must stop (renew deadline) before a standby may take over (lease
        # duration), and must get more than one renewal attempt (retry period) inside its deadline.
        if not self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError(
                "need RLOOP_OPERATOR_RETRY_PERIOD_SECONDS < RLOOP_OPERATOR_RENEW_DEADLINE_SECONDS < "
                f"RLOOP_OPERATOR_LEASE_DURATION_SECONDS, got {self.retry_period_seconds} < "
                f"{self.renew_deadline_seconds} < {self.lease_duration_seconds}"
            )
        return self


def load_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from `RLOOP_OPERATOR_*` variables; a bad value raises ValueError naming the variable."""
    env = os.environ if env is None else env
    raw = {
        name: env[ENV_PREFIX + name.upper()]
        for name in OperatorSettings.model_fields
        if ENV_PREFIX + name.upper() in env
    }
    try:
        return OperatorSettings.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}={raw.get(str(e['loc'][0]))!r}: {e['msg']}"
            if e["loc"]
            else e["msg"]  # a rule across fields: its message names the variables
            for e in err.errors()
        )
        raise ValueError(f"invalid operator settings: {problems}") from None
