"""Operator settings: environment variables, typed and validated once at start-up.

The Helm chart sets these on the Deployment; `kopf run` flags choose the namespaces to watch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
            for e in err.errors()
        )
        raise ValueError(f"invalid operator settings: {problems}") from None
