"""DeepSpeed ZeRO over the dense modules only.

DeepSpeed is handed a container of the dense modules (tower, heads, interaction, the strategy's
parameters) and never the embedding tables: its start-up broadcast from rank 0 would otherwise
overwrite the other ranks' embedding shards. The modules stay where they are in the Ranker; the
container only references them, so the Ranker's forward runs them (ZeRO-3 gathers partitioned
parameters through the hooks it registers on these very modules).

The gradient all-reduce overlaps backward at every stage, switched by DeepSpeed's own key
`zero_optimization.overlap_comm` (in `distributed.zero.deepspeed`): at stage 0 DeepSpeed has no
overlap (it all-reduces once after backward), so `OverlappedGradReduce` starts bucketed asynchronous
all-reduces from gradient hooks, as DDP does; at stages 1-3 DeepSpeed's own overlap runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iak_dist.config import ZeroConfig
from iak_dist.errors import UserError
from iak_dist.runtime import say


def deepspeed_config(cfg: ZeroConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one training phase: ours, with `cfg.deepspeed` merged over it."""
    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.stage},
        "bf16": {"enabled": cfg.bf16},
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(base, copy.deepcopy(cfg.deepspeed))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def register_container_parameters(root: nn.Module) -> None:
    """ZeRO-3 trap: it gathers a module's parameters when that module's forward runs, but an
    `nn.ParameterList` / `nn.ParameterDict` is never called (its owner indexes it, as TorchRec's
    `LowRankCrossNet` does). Register such parameters as external parameters of the owner."""
    from deepspeed.runtime.zero import register_external_parameter

    for module in root.modules():
        for child in module.children():
            if isinstance(child, nn.ParameterList | nn.ParameterDict):
                for param in child.parameters():
                    register_external_parameter(module, param)


def refuse_mixed_precision(cfg: ZeroConfig, config: dict[str, Any]) -> None:
    """bf16 / fp16 DeepSpeed casts the dense weights, but the embeddings and the adapters feed them
    float32 activations: the first matmul fails ("Float and BFloat16"). Refuse it up front, in one line."""
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled"):
            where = "distributed.zero.bf16" if key == "bf16" and cfg.bf16 else f"distributed.zero.deepspeed.{key}"
            raise UserError(f"{where}: mixed precision of the dense part is not supported (the embeddings feed it "
                            f"float32 activations, which {key} weights refuse); train in float32: set it to false")


STALE_LOCK_S = 600.0
"""A lock of DeepSpeed's JIT-built ops older than this is a dead process's (a build takes about a minute)."""


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove lock files that a killed process left in DeepSpeed's JIT extension folders.

    Trap: every process that loads DeepSpeed's CPU shared-memory comm op takes
    `torch_extensions/<py>_cpu/deepspeed_shm_comm/lock` for a moment (torch's FileBaton); one
    killed in that window leaves the file, and every later run waits on it forever, silently.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    for lock in root.glob("*/deepspeed_shm_comm/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                say(f"[zero] removed {lock}: a stale lock ({age / 60:.0f} min old) left by a killed process")
        except FileNotFoundError:  # another process took or removed it meanwhile
            continue
    return removed


def check_accelerator(device: torch.device) -> None:
    """DeepSpeed's accelerator must be the device the dense modules live on, else it moves them (to the
    CPU while the tables stay on the GPU, say). It is fixed once per process by `DS_ACCELERATOR`."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if device.type in ("cpu", "cuda") and name != device.type:
        raise UserError(f"DeepSpeed's accelerator is {name} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '')!r}) "
                        f"but the model is on {device.type}: set DS_ACCELERATOR={device.type} or unset it")


OVERLAP_BUCKET_ELEMENTS = 2**16
"""Gradient elements per asynchronous all-reduce at stage 0 (256 KiB in fp32). The MovieLens-100K
model's dense part (36,498 parameters) is one bucket, which leaves when the dense backward is done
and overlaps the embeddings' backward; a larger tower splits into several, the first leaving while
the rest of the dense backward runs. Large enough that gloo's / NCCL's per-call latency stays small."""

_reduce_groups: dict[tuple[int, str], Any] = {}


def gradient_reduce_group(backend: str):
    """A process group of all ranks for the dense gradients' all-reduces only, made once per process.

    Trap: those all-reduces are started from gradient hooks in the middle of backward, where TorchRec
    runs its own collectives (the pooled embeddings' and their gradients' all-to-all) on the default
    group. Collectives on one group must be issued in the same order on every rank, and the moment a
    bucket is ready can differ between ranks (a parameter unused by one rank's batch); on a group of
    their own, only the buckets' order matters, and it is fixed. (`new_group` is collective: every rank
    builds its engine at the same point, so every rank calls it once, in the same order.)
    """
    import torch.distributed as dist

    key = (id(dist.group.WORLD), backend)  # a world destroyed and made again gets a group of its own
    if key not in _reduce_groups:
        _reduce_groups.clear()  # groups of an earlier world are dead
        _reduce_groups[key] = dist.new_group(backend=backend)
    return _reduce_groups[key]


class OverlappedGradReduce:
    """Stage 0: the dense gradients are all-reduced in buckets, each started (asynchronously) as soon as
    backward has produced all its gradients, instead of once after backward.

    The arithmetic is DeepSpeed's stage-0 `allreduce_bucket` (sum over ranks, scaled by the engine's
    settings: `pre` before the sum, `post` after; by default x 1/world after), on the same gradients;
    only the grouping into buckets and the moment each leaves differ. Each element's sum over ranks
    does not depend on the grouping on 2 ranks (a + b == b + a), so the update is bitwise DeepSpeed's
    there; on more ranks, ring all-reduces add the ranks' values in an order that depends on where an
    element falls in its buffer, so it equals DeepSpeed's to fp32 rounding.

    Buckets follow the parameters in reverse order (backward produces the last layers' gradients
    first, as DDP assumes) and leave in bucket order on every rank. A parameter without a gradient
    after backward gets zeros, as DeepSpeed gives it (one frozen since keeps none, as DeepSpeed skips it).

    Args:
        params: the trainable dense parameters (fp32).
        group: the process group of the gradient all-reduces (`gradient_reduce_group`).
        pre, post: factors applied to each bucket before and after the sum (None: no scaling).
        bucket_elements: gradient elements per bucket (a parameter is never split).
    """

    def __init__(self, params: list[nn.Parameter], group, pre: float | None, post: float | None,
                 bucket_elements: int = OVERLAP_BUCKET_ELEMENTS) -> None:
        self.group, self.pre, self.post = group, pre, post
        self.buckets: list[list[nn.Parameter]] = [[]]
        for param in reversed(params):
            if self.buckets[-1] and sum(p.numel() for p in self.buckets[-1]) + param.numel() > bucket_elements:
                self.buckets.append([])
            self.buckets[-1].append(param)
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.armed = False
        self.missing: list[int] = []
        self.next_bucket = 0
        self.in_flight: list[tuple[torch.Tensor, Any]] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in params]

    def start(self) -> None:
        """Arm the hooks for one backward (they stay inert outside `DenseEngine.backward`)."""
        self.armed = True
        self.missing = [len(bucket) for bucket in self.buckets]
        self.next_bucket = 0
        self.in_flight = []

    def _on_gradient(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        self.missing[self.bucket_of[id(param)]] -= 1
        while self.next_bucket < len(self.buckets) and self.missing[self.next_bucket] == 0:
            self._launch(self.next_bucket)

    def _launch(self, index: int) -> None:
        import torch.distributed as dist

        grads = []
        for param in self.buckets[index]:
            if param.grad is None and param.requires_grad:  # unused by this batch: DeepSpeed reduces zeros too
                param.grad = torch.zeros_like(param)
            # frozen since the engine was built: DeepSpeed skips it; zeros keep every rank's layout
            grads.append(param.grad.reshape(-1) if param.grad is not None else param.new_zeros(param.numel()))
        flat = torch.cat(grads)
        if self.pre is not None:
            flat.mul_(self.pre)
        self.in_flight.append((flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self.next_bucket = index + 1

    def finish(self) -> None:
        """After backward: start the buckets still waiting (unused parameters), wait for all, write back."""
        self.armed = False
        for index in range(self.next_bucket, len(self.buckets)):
            self._launch(index)
        for (flat, work), bucket in zip(self.in_flight, self.buckets, strict=True):
            work.wait()  # sync point: this bucket's sum over ranks
            if self.post is not None:
                flat.mul_(self.post)
            for param, reduced in zip(bucket, torch.split(flat, [p.numel() for p in bucket]), strict=True):
                if param.grad is not None:
                    param.grad.copy_(reduced.view_as(param.grad))
        self.in_flight = []

    def abandon(self) -> None:
        """Backward failed: disarm without starting or waiting for any more all-reduces."""
        self.armed = False
        self.in_flight = []


class DenseEngine:
    """Backward and optimizer step of the dense side, through a DeepSpeed engine.

    Args:
        modules: name -> module; only their parameters with `requires_grad` are optimised.
        lr, weight_decay: AdamW settings.
        cfg: ZeRO stage, bf16 and pass-through DeepSpeed settings.
        micro_batch: samples per rank and step.
        world_size: data-parallel ranks (DeepSpeed averages gradients over them).
    """

    def __init__(self, modules: dict[str, nn.Module], lr: float, weight_decay: float, cfg: ZeroConfig,
                 micro_batch: int, world_size: int) -> None:
        config = deepspeed_config(cfg, micro_batch, world_size)
        refuse_mixed_precision(cfg, config)
        self.container = nn.ModuleDict(modules)
        params = [p for p in self.container.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        if device.type in ("cpu", "cuda"):
            # before DeepSpeed picks its accelerator (once per process, at first use)
            os.environ.setdefault("DS_ACCELERATOR", device.type)
        clear_stale_extension_locks()
        import deepspeed

        check_accelerator(device)
        if cfg.stage == 3:
            register_container_parameters(self.container)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cfg.fused_optimizer or None)
        # Stage 0 in fp32: DeepSpeed would clip with a Python loop over the parameters plus an
        # all-reduce of the norm every step (0.4 ms of a 2.8 ms step on MovieLens-100K). Its
        # gradients are already averaged over the ranks after backward, so PyTorch's one-kernel
        # clip computes the same norm on each rank. Other stages and precisions clip in DeepSpeed.
        plain_fp32 = not config["bf16"].get("enabled") and not config.get("fp16", {}).get("enabled")
        overlap = config["zero_optimization"].get("overlap_comm")
        if overlap is None and cfg.stage in (1, 2) and device.type == "cuda":
            # DeepSpeed's own overlap (a side stream per reduction) pays on GPUs; on CPU there are no
            # streams, its hooks reduce synchronously, and it measured slower (docs/performance.md)
            config["zero_optimization"]["overlap_comm"] = True
        self.params = params
        self.clip_norm = float(config["gradient_clipping"]) if cfg.stage == 0 and plain_fp32 else 0.0
        if self.clip_norm:
            config["gradient_clipping"] = 0.0
        # DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" to
        # stdout once per process (a plain print, not a log record): our stdout is for results
        with contextlib.redirect_stdout(io.StringIO()):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.container, optimizer=optimizer, model_parameters=params, config=config,
                dist_init_required=False,
            )
        self.overlap: OverlappedGradReduce | None = None
        if world_size == 1 and cfg.stage == 0:
            # one replica: DeepSpeed's gradient all-reduce would flatten, reduce over one rank and
            # copy every gradient back each step for nothing (measured in docs/performance.md)
            self.engine.enable_backward_allreduce = False
        elif cfg.stage == 0 and params and overlap is not False:
            self.overlap = self._overlapped_reduce(params)

    def _overlapped_reduce(self, params: list[nn.Parameter]) -> OverlappedGradReduce | None:
        """Our stage-0 overlap, with DeepSpeed's own scaling of the reduced gradients; None (DeepSpeed
        reduces after backward, as before) for a setting whose arithmetic it does not reproduce."""
        import torch.distributed as dist

        engine = self.engine
        if dist.get_backend() != "gloo":
            # Untested off gloo: a bucket holding a parameter without a gradient on one rank leaves after
            # backward there but during it elsewhere, so the two groups' collectives can be issued in
            # different orders across ranks, which NCCL does not promise to survive. Until measured on
            # GPUs, DeepSpeed reduces after backward there (its own overlap_comm serves ZeRO 1-2).
            return None
        if engine.communication_data_type != params[0].dtype or engine.has_moe_layers \
                or engine.sequence_parallel_size != 1 or any(p.dtype != params[0].dtype for p in params):
            say("[zero] gradient all-reduce not overlapped with backward: communication_data_type, MoE or "
                "sequence parallelism set in distributed.zero.deepspeed (DeepSpeed reduces after backward)")
            return None
        world = float(dist.get_world_size())
        factor = float(engine.gradient_predivide_factor())
        if not engine.gradient_average:  # DeepSpeed's allreduce_bucket, factor by factor
            pre, post = None, None
        elif engine.postscale_gradients():
            pre = 1.0 / factor if factor != 1.0 else None
            post = factor / world if factor != world else None
        else:
            pre, post = 1.0 / world, None
        engine.enable_backward_allreduce = False
        return OverlappedGradReduce(params, gradient_reduce_group(dist.get_backend()), pre, post)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (a schedule sets it every step).

        DeepSpeed's optimizer (stage 0: the AdamW itself; ZeRO 1-3: a wrapper whose `param_groups`
        are the wrapped AdamW's groups of flat partitions) reads `lr` from these groups in its step.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lrs(self) -> list[float]:
        """The learning rate of each parameter group, as the next step will use it."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() (the sparse side's fused optimizer runs inside it), then the dense reduce
        (at stage 0 with several ranks, started bucket by bucket during backward: `OverlappedGradReduce`)."""
        if self.overlap is None:
            self.engine.backward(loss)
            return
        self.overlap.start()
        try:
            self.engine.backward(loss)
        except BaseException:
            self.overlap.abandon()  # no further collectives: the other ranks may be gone
            raise
        self.overlap.finish()

    def step(self) -> None:
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
        self.engine.step()

    def gathered(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3 the parameters are partitioned: gather them to read full weights."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.container.parameters()), modifier_rank=None)
        return contextlib.nullcontext()
