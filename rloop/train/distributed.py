"""Data parallelism for the rl and rft stages: which process this is, the few collectives the trainers
need, and the optimizer backends (plain torch for one process, DeepSpeed ZeRO for several).

Every loss a trainer computes is its process's share of the global loss: token and sequence counts in
the denominators are global (summed over processes), so the shares add up to exactly the one-process
loss. DeepSpeed averages gradients over processes, so `DeepSpeedOptimizer.backward` multiplies the
share by the world size first: the summed gradient is the one-process gradient, and clipping and
AdamW see the same numbers as on one process.

ZeRO-3 makes every forward a collective (each layer's parameters are gathered on the fly), so the
trainers give every process the same number of forward/backward passes: a process with fewer rows
runs `idle` passes (a one-token batch whose loss is multiplied by 0).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from rloop.policy import trainable_parameters
from rloop.spec import DistributedSpec

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes (rank 0 writes everything the stage commits)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T], rank: int | None = None) -> list[T]:
        """`rank`'s share of `items` (every size-th item from its rank): whole items, so a prompt's
        group stays on one process, and shares differ by at most one item."""
        return list(items[self.rank if rank is None else rank :: self.size])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        return self._all_reduce(values, "sum")

    def max(self, values: Sequence[float]) -> list[float]:
        return self._all_reduce(values, "max")

    def all(self, flag: bool) -> bool:
        """True when `flag` is true on every process."""
        return self._all_reduce([0.0 if flag else 1.0], "max")[0] == 0.0

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's `obj` in rank order on rank 0 (pickled); None elsewhere."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _all_reduce(self, values: Sequence[float], op: str) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.tolist()


SINGLE = World()


def init_world(timeout_s: int) -> World:
    """Join the stage's process group when this is one of several workers (torch's RANK/WORLD_SIZE env,
    set by `rloop.launch` or torchrun); a single process gets SINGLE and no process group. Collectives
    time out after `timeout_s`, so a dead or hung peer fails the stage instead of hanging it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size())


def close_world(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------- optimizers
class PolicyOptimizer(Protocol):
    """What the trainers ask of an optimizer; forwards call the model itself."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate this process's loss share; `last`: the optimizer step's final micro-batch."""

    def step(self) -> float:
        """Clip to the max norm, take the step; returns the global gradient norm before clipping."""

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """Inside: the model holds all its parameters (ZeRO-3 gathers them; collective on all processes)."""

    def main_model(self) -> contextlib.AbstractContextManager:
        """Yields, on rank 0, a module with all the trained weights that rank 0 may use alone (measure, save),
        None on the others; collective on all processes."""


class TorchOptimizer:
    """AdamW on one process."""

    def __init__(self, model, *, lr: float, weight_decay: float, max_grad_norm: float):
        self.model, self.params = model, trainable_parameters(model)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        return float(norm)

    def full_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def main_model(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self.model)


def deepspeed_config(cfg: DistributedSpec, *, lr: float, weight_decay: float, max_grad_norm: float,
                     dtype: str) -> dict[str, Any]:
    """The DeepSpeed config of a stage. The trainers split batches themselves (micro-batches, global
    normalisation), so DeepSpeed sees batches of 1 with no accumulation and is told where a step ends.
    torch's AdamW (`torch_adam`), also when offloading, so no DeepSpeed op has to be compiled in the image."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999],
                                                  "eps": 1e-8, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":  # bf16 weights and activations, fp32 master weights in the optimizer
        config["bf16"] = {"enabled": True}
        if cfg.zero_stage >= 1:  # micro-batch gradients summed in fp32, not bf16 (ZeRO-0 cannot)
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


class DeepSpeedOptimizer:
    """DeepSpeed ZeRO over the stage's processes (the model module is trained in place)."""

    def __init__(self, model, world: World, config: dict[str, Any]):
        import deepspeed

        if not torch.cuda.is_available():
            _skip_cpu_inference_comm_op()
        self.world, self.zero_stage = world, config["zero_optimization"]["stage"]
        self.engine, *_ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=trainable_parameters(model))
        self.module = self.engine.module

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        # What engine.forward does first (the trainers call the module, or its decoder and head, directly):
        # close the previous backward's gradient bookkeeping, or ZeRO-3 overwrites accumulated gradients.
        clear_previous_backward = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear_previous_backward is not None:
            clear_previous_backward()
        self.engine.set_gradient_accumulation_boundary(last)  # reduce (and shard) gradients on the last only
        self.engine.backward(loss * self.world.size, scale_wrt_gas=False)  # DeepSpeed averages: undo it

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_parameters(self) -> contextlib.AbstractContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    @contextlib.contextmanager
    def main_model(self):
        if self.zero_stage != 3:  # every process holds the whole model already
            yield self.module if self.world.is_main else None
            return
        # A ZeRO-3 module's hooks gather each layer from all processes at every forward, so rank 0 cannot
        # run it alone: it gets a plain copy of the gathered weights instead.
        with self.full_parameters():
            copy = unsharded_copy(self.module) if self.world.is_main else None
        yield copy


def unsharded_copy(model):
    """A plain module of `model`'s class and config with its (gathered) weights: no ZeRO hooks."""
    param = next(model.parameters())
    fresh = type(model)._from_config(model.config, dtype=param.dtype).to(param.device)
    fresh.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return fresh.train(model.training)


def _skip_cpu_inference_comm_op() -> None:
    """On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op (C++, about two
    minutes on 2 cores, once per TORCH_EXTENSIONS_DIR) at its first start. Only its inference all-reduce
    uses that op, never ZeRO training, which goes through the process group (gloo); so it is not built."""
    import importlib

    # importlib, not `import ... as`: the package's own `torch` attribute is the torch module itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def uses_deepspeed(world: World, cfg: DistributedSpec | None) -> bool:
    """DeepSpeed for several processes, or for one that offloads to host memory."""
    return world.size > 1 or (cfg is not None and (cfg.offload_optimizer or cfg.offload_params))


def make_optimizer(model, *, lr: float, weight_decay: float, max_grad_norm: float, dtype: str = "float32",
                   world: World = SINGLE, distributed: DistributedSpec | None = None) -> PolicyOptimizer:
    if not uses_deepspeed(world, distributed):
        return TorchOptimizer(model, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    config = deepspeed_config(distributed or DistributedSpec(), lr=lr, weight_decay=weight_decay,
                              max_grad_norm=max_grad_norm, dtype=dtype)
    return DeepSpeedOptimizer(model, world, config)

