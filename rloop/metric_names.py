"""Every Prometheus metric name RLoop exposes: one source of truth for the operator
(`rloop_operator.metrics`), the stage pods (`rloop.telemetry`) and the Grafana dashboard
(`rloop.dashboard`), so a renamed metric cannot leave a panel querying nothing.

Names are the ones Prometheus stores: counters end in `_total` (prometheus_client strips and re-adds
the suffix), histograms are the base name of their `_bucket`/`_sum`/`_count` series. It imports
nothing, so the operator image and the dashboard build read it without torch or prometheus_client.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ operator: per run
RUNS = "rloop_runs"
RUN_ITERATION = "rloop_run_iteration"
RUN_STAGES_COMMITTED = "rloop_run_stages_committed"
RUN_STAGES = "rloop_run_stages"
RUN_TRAIN_REWARD = "rloop_run_train_reward"
RUN_EVAL_AVG_AT_N = "rloop_run_eval_avg_at_n"
RUN_EVAL_PASS_AT_K = "rloop_run_eval_pass_at_k"
RUN_LAST_ACTIVITY = "rloop_run_last_activity_timestamp_seconds"
RUN_CONDITION = "rloop_run_condition"
RUN_STAGE_INFO = "rloop_run_stage_info"
RUN_EXPERT_TRAJECTORIES = "rloop_run_expert_trajectories"
"""Per iteration: size of the expert set the verify stage kept."""
RUN_RFT_LOSS_BEFORE = "rloop_run_rft_loss_before"
"""Per iteration: mean token NLL of the expert set before the RFT stage trained on it."""
RUN_RFT_LOSS = "rloop_run_rft_loss"
"""Per iteration: mean token NLL of the expert set after the RFT stage."""

# ------------------------------------------------------------------------ operator: stage Jobs
STAGE_DURATION = "rloop_stage_duration_seconds"  # histogram
STAGE_ATTEMPTS = "rloop_stage_attempts_total"
STAGE_FAILURES = "rloop_stage_failures_total"
STAGE_RETRIES = "rloop_stage_retries_total"
STAGE_DISRUPTIONS = "rloop_stage_disruptions_total"

# ---------------------------------------------------------------------------- operator: itself
RECONCILE_DURATION = "rloop_reconcile_duration_seconds"  # histogram
RECONCILE_ERRORS = "rloop_reconcile_errors_total"
OPERATOR_LEADER = "rloop_operator_leader"
WORKQUEUE_DEPTH = "rloop_workqueue_depth"
PROCESS_RESIDENT_MEMORY = "process_resident_memory_bytes"
"""Not ours: prometheus_client's ProcessCollector, which the operator registers."""

# ------------------------------------------------------------------------------- stage pods (RL)
TRAIN_STEP = "rloop_train_step"
TRAIN_REWARD = "rloop_train_reward"
TRAIN_PASS_RATE = "rloop_train_pass_rate"
TRAIN_ENTROPY = "rloop_train_entropy"
TRAIN_TOKENS_PER_SECOND = "rloop_train_tokens_per_second"
ROLLOUT_TOKENS_PER_SECOND = "rloop_rollout_tokens_per_second"
TRAIN_PHASE_SECONDS = "rloop_train_phase_seconds"
TRAIN_STEPS = "rloop_train_steps_total"

PHASES = ("rollout", "verify", "advantage", "update", "sync")
"""Phases of one RL step, the `phase` label of TRAIN_PHASE_SECONDS (step metrics `time_{phase}_s`)."""

HISTOGRAMS = (STAGE_DURATION, RECONCILE_DURATION)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
