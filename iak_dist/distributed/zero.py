"""DeepSpeed ZeRO over the dense modules only.

DeepSpeed is handed a container of the dense modules (tower, heads, interaction, the strategy's
parameters) and never the embedding tables: its start-up broadcast from rank 0 would otherwise
overwrite the other ranks' embedding shards. The modules stay where they are in the Ranker; the
container only references them, so the Ranker's forward runs them (ZeRO-3 gathers partitioned
parameters through the hooks it registers on these very modules).
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
        if world_size == 1 and cfg.stage == 0:
            # one replica: DeepSpeed's gradient all-reduce would flatten, reduce over one rank and
            # copy every gradient back each step for nothing (measured in docs/performance.md)
            self.engine.enable_backward_allreduce = False

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
        """loss.backward() (the sparse side's fused optimizer runs inside it), then the dense reduce."""
        self.engine.backward(loss)

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
