"""The RLoopRun resource: one pydantic model, the single source of truth.

The same document is a Kubernetes custom resource (`kubectl apply`) and the local config
(`rloop run FILE`). The CRD schema in `crds/rlooprun.yaml` is generated from these models
(`python -m rloop.crd`). Field names are camelCase on the wire (Kubernetes convention) and
snake_case in Python.

This module is deliberately light (pydantic + yaml only): the operator imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "rloop.dev"
API_VERSION = "v1alpha1"
KIND = "RLoopRun"
PLURAL = "rloopruns"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """An RLoopRun that cannot run. The message names each bad field and how to fix it."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON-able dict, without unset optional fields (what a user would write)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ----------------------------------------------------------------------------------------- model
class TinyModel(_Model):
    """A random-init Qwen2 with a character tokenizer, warmed up with SFT on the synthetic task.

    Built once by the `init` stage and cached in the store, deterministic from `seed`."""

    hidden_size: int = Field(128, ge=16, le=4096)
    """Transformer width."""
    layers: int = Field(4, ge=1, le=64)
    """Number of decoder layers."""
    heads: int = Field(4, ge=1, le=64)
    """Attention heads (must divide hiddenSize)."""
    warmup_steps: int = Field(400, ge=0, le=100_000)
    """Supervised warm-up steps on synthetic (prompt, correct answer) pairs, so RL has signal."""
    warmup_batch_size: int = Field(128, ge=1, le=8192)
    """Pairs per warm-up step."""
    warmup_lr: float = Field(1e-3, gt=0, le=1)
    """AdamW learning rate of the warm-up."""
    seed: int = Field(0, ge=0)
    """Seed for initialisation and warm-up data."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"heads ({self.heads}) must divide hiddenSize ({self.hidden_size}); "
                "pick e.g. heads: 4 with hiddenSize: 128"
            )
        return self


class LoraSpec(_Model):
    """Train a LoRA adapter instead of all weights (peft). Adapters are merged into the saved policy."""

    r: int = Field(16, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (peft `target_modules`)."""


class ModelSpec(_Model):
    """The base policy P_0."""

    base: str = Field(..., min_length=1)
    """`builtin:tiny` for the built-in tiny model (see `tiny`), or a path/URI to a directory saved with
    `save_pretrained` (model + tokenizer), local or in the store (s3://...)."""
    tiny: TinyModel = Field(default_factory=TinyModel)
    """Settings of the built-in tiny model; ignored unless base is `builtin:tiny`."""
    lora: LoraSpec | None = None
    """Train LoRA adapters (RL and RFT) instead of full fine-tuning; unset = full fine-tune."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision. `bfloat16` (GPUs): training keeps fp32 master weights under bf16 autocast, policies
    are stored and evaluated in bf16. `float32`: everything in fp32 (CPU)."""
    chat_template: bool = False
    """Render prompts through the tokenizer's chat template (instruct models); the template's own
    special tokens are not added a second time."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward (RL and RFT updates): less memory, ~30% more compute."""

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, v: Any) -> Any:
        if v in ("float16", "fp16", "half"):
            raise ValueError(
                "float16 training needs loss scaling, which RLoop does not do; use 'bfloat16' (GPUs since "
                "Ampere) or 'float32'"
            )
        return v

    @field_validator("base")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if v.startswith("builtin:") and v != "builtin:tiny":
            raise ValueError(f"unknown built-in model {v!r}; the only built-in is 'builtin:tiny'")
        return v


# ------------------------------------------------------------------------------------------ data
class SyntheticSpec(_Model):
    """The built-in subset-sum task (prompt `38152/09:`, answer: listed digits summing to the target)."""

    task: Literal["subset-sum"] = "subset-sum"
    """Task name."""
    split: Literal["train", "heldout"] = "train"
    """`heldout` prompts use digit lists disjoint from `train` and from the warm-up data."""
    size: int = Field(256, ge=1, le=50_000)
    """Number of distinct prompts."""
    seed: int = Field(0, ge=0)
    """Sampling seed."""


class DatasetSpec(_Model):
    """A prompt set: a file (JSONL with prompt/answer, or verl-style parquet) or the synthetic task."""

    path: str | None = None
    """Local path or URI (s3://...) of a `.jsonl` or `.parquet` file."""
    synthetic: SyntheticSpec | None = None
    """Generate the built-in synthetic task instead of reading a file."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """File format; `auto` decides by suffix."""
    prompt_key: str = "prompt"
    """JSONL field holding the prompt."""
    answer_key: str = "answer"
    """JSONL field holding the ground truth (GSM8K's `#### n` suffix is understood)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first `limit` rows."""

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a .jsonl/.parquet file) or `synthetic` (built-in task)")
        return self


class EvalSetSpec(DatasetSpec):
    """A held-out set evaluated after every iteration (and on the base policy)."""

    name: str = Field(..., min_length=1, max_length=40)
    """Name used in the store layout (`eval/<name>/`) and metrics; a DNS label."""
    samples_per_prompt: int = Field(16, ge=1, le=1024)
    """n in avg@n and pass@k."""

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a DNS label; use lowercase letters, digits and '-' (e.g. 'heldout')")
        return v


class DataSpec(_Model):
    """Train prompts and held-out evaluation sets."""

    train: DatasetSpec
    """Prompts RL trains on."""
    eval: list[EvalSetSpec] = Field(default_factory=list, max_length=16)
    """Held-out sets evaluated on P_0 and after each iteration."""
    prompt_template: str = "{prompt}"
    """Python format string applied to every prompt; must contain `{prompt}`."""

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain '{prompt}', e.g. 'Question: {prompt}\\nAnswer:'")
        return v

    @field_validator("eval")
    @classmethod
    def _unique_names(cls, v: list[EvalSetSpec]) -> list[EvalSetSpec]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate eval set names {sorted(dup)}; give each set its own name")
        return v


class VerifierSpec(_Model):
    """How responses are scored: a plain function (response, ground_truth, **row) -> reward."""

    name: Literal["subset_sum", "math", "exact"] = "subset_sum"
    """`math` (math-verify, in a process pool), `exact` (string match), `subset_sum` (synthetic task)."""
    timeout_seconds: float = Field(5.0, gt=0, le=300)
    """Per-response scoring timeout; a timed-out response is unscorable (excluded from the baseline)."""


# ------------------------------------------------------------------------------------------ loop
class RLSpec(_Model):
    """The RL stage (GRPO family). `algorithm` picks defaults; explicit fields override them."""

    algorithm: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """grpo: std-normalised advantages, seq-mean loss. dapo: + clip-higher, token-mean loss, dynamic
    sampling, overlong shaping. dr_grpo: unscaled advantages, length-normalised-by-constant loss."""
    steps: int = Field(60, ge=1, le=1_000_000)
    """RL steps per iteration (N_rl): a short horizon, not to convergence."""
    prompts_per_step: int = Field(16, ge=1, le=65_536)
    """Prompt groups sampled per step."""
    samples_per_prompt: int = Field(8, ge=2, le=1024)
    """Group size G (responses per prompt)."""
    mini_batches: int = Field(1, ge=1, le=1024)
    """Optimizer steps per rollout batch per epoch (the trained responses are split into this many
    mini-batches, each normalised on its own). With 1 mini-batch and 1 epoch the update is on-policy:
    the ratio is 1 and clipping (clip-higher included) never acts."""
    update_epochs: int = Field(1, ge=1, le=64)
    """Passes over the rollout batch (PPO epochs); each pass makes `miniBatches` optimizer steps."""
    micro_batch_size: int | None = Field(None, ge=1, le=65_536)
    """Sequences per forward/backward (gradient accumulation inside a mini-batch). Memory only: the
    update is the same as with the whole mini-batch at once. Unset = the whole mini-batch."""
    lr: float = Field(3e-4, gt=0, le=1)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold."""
    clip_low: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip below 1 (1 - clipLow)."""
    clip_high: float | None = Field(None, gt=0, le=10)
    """PPO ratio clip above 1 (1 + clipHigh); default 0.28 for dapo, else clipLow."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    """Loss aggregation; default token_mean (dapo), seq_mean_token_sum_norm (dr_grpo), else seq_mean_token_mean."""
    kl_coef: float = Field(0.0, ge=0, le=10)
    """Weight of the k3 KL penalty against P_k (0 = no reference model)."""
    max_response_tokens: int = Field(8, ge=1, le=131_072)
    """Generation length cap."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature of RL rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of RL rollouts."""
    dynamic_sampling: bool | None = None
    """Drop groups whose scorable responses are all correct or all wrong (no signal), by verifier
    accuracy (not shaped reward), and sample more prompts to refill the batch; default on for dapo."""
    dynamic_sampling_max_rounds: int = Field(3, ge=1, le=100)
    """With dynamic sampling: at most this many generation rounds per step to collect `promptsPerStep`
    groups with signal (DAPO's max_num_gen_batches); the step trains on what it has after the last.
    Every generated trajectory goes to the pool."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong punishment: length band before the cap where the penalty ramps up (0 = off)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Maximum overlong penalty."""
    stop: list[str] = Field(default_factory=list, max_length=8)
    """Stop strings ending a response (besides EOS)."""
    seed: int = Field(0, ge=0)
    """Seed of prompt order and sampling (the iteration index is added)."""

    @model_validator(mode="after")
    def _algorithm_defaults(self) -> RLSpec:
        dapo = self.algorithm == "dapo"
        if self.clip_high is None:
            self.clip_high = 0.28 if dapo else self.clip_low
        if self.loss_agg is None:
            self.loss_agg = {"dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}.get(
                self.algorithm, "seq_mean_token_mean"
            )
        if self.dynamic_sampling is None:
            self.dynamic_sampling = dapo
        if self.overlong_buffer >= self.max_response_tokens:
            raise ValueError(
                f"overlongBuffer ({self.overlong_buffer}) must be smaller than maxResponseTokens "
                f"({self.max_response_tokens}); use e.g. overlongBuffer: {self.max_response_tokens // 4}"
            )
        if self.prompts_per_step * self.samples_per_prompt < self.mini_batches:
            raise ValueError(
                f"miniBatches ({self.mini_batches}) exceeds the responses per step (promptsPerStep * "
                f"samplesPerPrompt = {self.prompts_per_step * self.samples_per_prompt}); lower miniBatches"
            )
        return self


class PoolSpec(_Model):
    """Where the expert candidates come from."""

    source: Literal["rollouts", "checkpoints"] = "rollouts"
    """`rollouts`: every trajectory generated during RL (RLoop's default). `checkpoints`: fresh samples
    from checkpoints saved during RL (the paper's variant)."""
    checkpoint_every: int = Field(20, ge=1)
    """With source=checkpoints: save a checkpoint every this many RL steps."""
    samples_per_prompt: int = Field(8, ge=1, le=1024)
    """With source=checkpoints: samples per train prompt from each checkpoint."""


class FilterSpec(_Model):
    """From the pool to the expert set."""

    max_pass_rate: float = Field(1.0, ge=0, le=1)
    """Keep prompts whose pooled pass rate is at most this (1.0 = keep all; lower focuses on hard prompts)."""
    max_per_prompt: int = Field(4, ge=1, le=1024)
    """At most this many expert trajectories per prompt (m)."""
    dedup: bool = True
    """Keep only distinct responses per prompt."""
    include_truncated: bool = False
    """Also keep correct responses that hit the generation cap (finish reason `length`). Off: RFT on
    them would teach the model to stop mid-solution."""
    seed: int = Field(0, ge=0)
    """Seed of the choice among candidates when more than maxPerPrompt qualify."""


class RFTSpec(_Model):
    """Rejection-sampling fine-tuning: response-token NLL on the expert set."""

    epochs: int = Field(2, ge=1, le=1000)
    """Passes over the expert set."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on optimizer steps (after epochs); unset = no cap."""
    lr: float = Field(1e-3, gt=0, le=1)
    """AdamW learning rate."""
    batch_size: int = Field(32, ge=1, le=65_536)
    """Expert trajectories per optimizer step."""
    micro_batch_size: int | None = Field(None, ge=1, le=65_536)
    """Trajectories per forward/backward (gradient accumulation); memory only. Unset = batchSize."""
    init_policy: Literal["initial", "base"] = "initial"
    """Fine-tune P_k, the policy this iteration started from (RLoop), or always P_0 (`base`)."""


class EvalSpec(_Model):
    """Evaluation settings shared by all held-out sets."""

    k_list: list[int] = Field(default_factory=lambda: [1, 4, 8, 16], min_length=1, max_length=16)
    """k values of pass@k (each must be <= the set's samplesPerPrompt)."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature for evaluation."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for evaluation."""
    max_response_tokens: int | None = Field(None, ge=1)
    """Generation cap for evaluation; default = loop.rl.maxResponseTokens."""
    seed: int = Field(1234, ge=0)
    """Sampling seed (same for every iteration, so iterations are compared on equal terms)."""
    eval_base: bool = True
    """Also evaluate the base policy P_0 (the reference row of the report)."""


class LoopSpec(_Model):
    """The outer loop: K iterations of RL (+ filter + RFT in rloop mode)."""

    iterations: int = Field(3, ge=1, le=1000)
    """K."""
    rl: RLSpec = Field(default_factory=RLSpec)
    """RL stage settings."""
    pool: PoolSpec = Field(default_factory=PoolSpec)
    """Expert pool source."""
    filter: FilterSpec = Field(default_factory=FilterSpec)
    """Pool → expert set filter."""
    rft: RFTSpec = Field(default_factory=RFTSpec)
    """RFT stage settings."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation settings."""


# ----------------------------------------------------------------------------- storage / k8s bits
class SecretRef(_Model):
    """A Kubernetes Secret holding S3 credentials (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    optional AWS_ENDPOINT_URL). Locally the same variables come from the environment."""

    name: str = Field(..., min_length=1)
    """Secret name in the run's namespace."""


class StorageSpec(_Model):
    """Where stages exchange data. Credentials never appear here."""

    uri: str | None = None
    """Store root: `s3://bucket/prefix` or a local directory. `rloop run --store` overrides it;
    the operator requires it."""
    secret_ref: SecretRef | None = None
    """Secret with S3 credentials (operator only)."""

    @field_validator("uri")
    @classmethod
    def _no_inline_credentials(cls, v: str | None) -> str | None:
        if v and re.match(r"^[a-z0-9]+://[^/]*@", v):
            raise ValueError("must not embed credentials; put them in the Secret named by storage.secretRef")
        return v


class Toleration(_Model):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class StageResources(_Model):
    """Pod settings of one stage kind (unset fields fall back to `resources.default`)."""

    image: str | None = None
    """Container image (the trainer image for rl/rft/rollout/eval)."""
    gpus: int | None = Field(None, ge=0, le=64)
    """`nvidia.com/gpu` request and limit."""
    cpu: str | None = None
    """CPU request, e.g. `4` or `500m`."""
    memory: str | None = None
    """Memory request and limit, e.g. `16Gi`."""
    node_selector: dict[str, str] | None = None
    """Pod nodeSelector."""
    tolerations: list[Toleration] | None = None
    """Pod tolerations."""
    priority_class_name: str | None = None
    """Pod priorityClassName."""

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$", v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity; write e.g. '4', '500m', '16Gi'")
        return v


class ResourcesSpec(_Model):
    """Per-stage pod resources."""

    default: StageResources = Field(default_factory=StageResources)
    init: StageResources | None = None
    rl: StageResources | None = None
    rollout: StageResources | None = None
    verify: StageResources | None = None
    rft: StageResources | None = None
    eval: StageResources | None = None


class RetrySpec(_Model):
    """Retries of a failed stage (a bad-input failure is never retried)."""

    limit: int = Field(3, ge=0, le=100)
    """Attempts after the first."""
    backoff_seconds: int = Field(30, ge=0, le=86_400)
    """Delay before the first retry; doubles per attempt."""


class RLoopRunSpec(_Model):
    """Desired state of an RLoop run."""

    mode: Literal["rloop", "rl"] = "rloop"
    """`rloop`: RL → expert set → RFT of P_k per iteration. `rl`: vanilla RL continued for the same
    number of steps, evaluated at the same points (the baseline)."""
    model: ModelSpec
    """The base policy and how it is trained."""
    data: DataSpec
    """Prompts."""
    verifier: VerifierSpec = Field(default_factory=VerifierSpec)
    """Reward function."""
    loop: LoopSpec = Field(default_factory=LoopSpec)
    """Algorithm settings."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Object store."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Per-stage pods (operator only)."""
    queue_name: str | None = None
    """Kueue LocalQueue (sets the `kueue.x-k8s.io/queue-name` label on stage Jobs)."""
    suspend: bool = False
    """Suspend the running stage Job (operator) and start no new one."""
    retry: RetrySpec = Field(default_factory=RetrySpec)
    """Stage retry policy."""

    @model_validator(mode="after")
    def _cross_field(self) -> RLoopRunSpec:
        for s in self.data.eval:
            too_big = [k for k in self.loop.eval.k_list if k > s.samples_per_prompt]
            if too_big:
                raise ValueError(
                    f"loop.eval.kList has k={too_big} but data.eval[{s.name}].samplesPerPrompt is "
                    f"{s.samples_per_prompt}; raise samplesPerPrompt or drop those k"
                )
        needs_vocab = self.model.base == "builtin:tiny"
        if needs_vocab and (self.data.train.synthetic is None or self.verifier.name != "subset_sum"):
            raise ValueError(
                "model.base 'builtin:tiny' has a character vocabulary for the synthetic task only: use "
                "data.train.synthetic with verifier.name 'subset_sum', or set model.base to a real model"
            )
        return self


class ObjectMeta(_Model):
    """The part of Kubernetes metadata RLoop reads."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    name: str = Field(..., min_length=1, max_length=40)
    """Run name (a DNS label; short, because stage Job names are derived from it)."""
    namespace: str = "default"
    """Namespace (also the store prefix)."""

    @field_validator("name", "namespace")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a DNS label; use lowercase letters, digits and '-'")
        return v


class RLoopRun(_Model):
    """The whole manifest."""

    api_version: Literal["rloop.dev/v1alpha1"] = Field(f"{API_GROUP}/{API_VERSION}", alias="apiVersion")
    kind: Literal["RLoopRun"] = "RLoopRun"
    metadata: ObjectMeta
    spec: RLoopRunSpec


# ----------------------------------------------------------------------------------------- status
class Condition(_Model):
    """A Kubernetes-style condition."""

    type: Literal["Ready", "Progressing", "Succeeded", "Failed", "Suspended"]
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class StageRecord(_Model):
    """One attempt of one stage (bounded history in the status)."""

    stage: str
    """Stage id, e.g. `iter-001/rl`."""
    attempt: int = 0
    job: str | None = None
    state: Literal["Pending", "Running", "Succeeded", "Failed"] = "Pending"
    start_time: str | None = None
    end_time: str | None = None
    message: str | None = None


class RLoopRunStatus(_Model):
    """Observed state, written by the operator (and mirrored by `rloop status` locally)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    iteration: int | None = None
    """Iteration of the current (or last) stage."""
    stage: str | None = None
    """Current stage id, or `Finished`."""
    history: list[StageRecord] = Field(default_factory=list, max_length=50)
    """Most recent stage attempts (bounded)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest figures: trainReward, evalAvgAtN, evalPassAtK (largest k)."""
    artifacts: dict[str, str] = Field(default_factory=dict)
    """Artifact URIs, e.g. latestPolicy."""


# ------------------------------------------------------------------------------------ validation
def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: the camelCase field path, what is wrong, and (from our validators) the fix."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (fields are camelCase) against crds/rlooprun.yaml"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def parse_run(doc: dict[str, Any]) -> RLoopRun:
    """Validate a manifest dict; raise SpecError naming every bad field."""
    if not isinstance(doc, dict):
        raise SpecError("the document must be a mapping with apiVersion, kind, metadata and spec")
    try:
        return RLoopRun.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def parse_spec(spec: dict[str, Any]) -> RLoopRunSpec:
    """Validate only `.spec` (the operator gets metadata from Kubernetes)."""
    try:
        return RLoopRunSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, prefix="spec")) from None


def load_run(path: str | Path) -> RLoopRun:
    """Read an RLoopRun manifest from a YAML file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: no such file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return parse_run(doc)


# Fields that may change while a run is in flight; everything else would silently mix two experiments.
MUTABLE_FIELDS = ("suspend", "retry", "resources", "queueName", "storage.secretRef", "loop.iterations")


def immutable_changes(old: RLoopRunSpec, new: RLoopRunSpec) -> list[str]:
    """camelCase paths (under spec.) whose value changed and may not change mid-run."""
    changed: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path in MUTABLE_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            changed.append(f"spec.{path}")

    walk(old.to_wire(), new.to_wire(), "")
    return changed
