"""Plain (unsharded) weights in and out of a sharded model, and the backbone export format.

An exported backbone is a folder with `model.safetensors` (full tables, every dense weight) and
`backbone.json` (schema, model config, identity hash, weights hash). It loads onto any sharding
plan at any world size: each rank copies its own shards out of the full tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from iak_dist.config import ModelConfig, from_dict, to_dict
from iak_dist.data.schema import Schema
from iak_dist.errors import UserError
from iak_dist.faults import fault_point
from iak_dist.io import atomic_path, atomic_write_json, atomic_write_text, fsync_dir, fsync_tree
from iak_dist.model.backbone import backbone_identity
from iak_dist.runtime import uninterrupted


def plain_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full tensors of `model.state_dict()` whose keys start with `prefix` (prefix removed).

    Sharded tables are gathered to full tensors on every rank (collective: all ranks must call).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size(), dtype=value.dtype, device=collective_device(value))
            for shard in value.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                full[off[0]:off[0] + size[0], off[1]:off[1] + size[1]] = shard.tensor.detach()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)  # shards are disjoint: the sum assembles the table
            out[name] = full.cpu()
        else:
            out[name] = value.detach().cpu().clone()
    return out


def collective_device(value: ShardedTensor) -> torch.device:
    """Where a collective over `value`'s full tensor must run.

    Trap: NCCL only takes CUDA tensors, so the table is assembled on the shards' device (or the
    rank's GPU when it holds no shard of it) and moved to the CPU after the all-reduce.
    """
    shards = value.local_shards()
    if shards:
        return shards[0].tensor.device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy full tensors into `model` in place, each rank taking its own shard of sharded tables."""
    own = model.state_dict()
    expected = {k[len(prefix):] for k in own if k.startswith(prefix)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name in expected:
        target, source = own[prefix + name], state[name]
        if tuple(target.size()) != tuple(source.shape):
            raise UserError(
                f"checkpoint tensor {name} has shape {tuple(source.shape)}, the model expects "
                f"{tuple(target.size())} (a different model config or schema)"
            )
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[off[0]:off[0] + size[0], off[1]:off[1] + size[1]])
        else:
            target.copy_(source)


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of the file's SHA-256, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def export_backbone(model: nn.Module, schema: Schema, cfg: ModelConfig, out_dir: str | Path, rank: int = 0) -> None:
    """Write the backbone of a (sharded) Ranker as a plain, world-size-free folder."""
    state = plain_state_dict(model, prefix="backbone.")
    if rank != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    atomic_write_json(out_dir / "backbone.json", {
        "schema": to_dict(schema),
        "model": to_dict(cfg),
        "identity": backbone_identity(schema, cfg),
        "weights": file_hash(out_dir / "model.safetensors"),
    })


_REEXPORT = "re-export the backbone (run pre-training again)"


def read_backbone_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "backbone.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: no exported backbone here (backbone.json missing); run pre-training first")
    meta = read_json(meta_path, _REEXPORT)
    meta["schema_obj"] = from_dict(Schema, meta["schema"], str(meta_path))
    meta["model_obj"] = from_dict(ModelConfig, meta["model"], str(meta_path))
    return meta


def read_json(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON file we wrote; unreadable (truncated, edited) -> UserError naming it and `remedy`."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {remedy}") from None


def check_weights_hash(path: Path, expected_hash: str, recorded_in: Path, remedy: str) -> None:
    """UserError unless `path` exists and its `file_hash` is the one recorded in the JSON file `recorded_in`.

    The JSON files name the weights they go with; comparing only their strings would let a weights file
    swapped in from another seed or backbone (same shapes) load silently. `file_hash` streams the file.
    """
    if not path.is_file():
        raise UserError(f"{path}: missing; {remedy}")
    actual = file_hash(path)
    if actual != expected_hash:
        raise UserError(f"{path}: weights hash {actual} differs from {expected_hash} recorded in {recorded_in.name} "
                        f"(the file was replaced or damaged); {remedy}")


def verify_backbone(path: str | Path) -> dict[str, Any]:
    """The backbone's meta after checking its weights file, without loading it (for copies: export)."""
    path = Path(path)
    meta = read_backbone_meta(path)
    check_weights_hash(path / "model.safetensors", meta["weights"], path / "backbone.json", _REEXPORT)
    return meta


def load_safetensors(path: Path, remedy: str) -> dict[str, torch.Tensor]:
    """Tensors of `path`; an unreadable (damaged) file is a UserError naming it, not a SafetensorError."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); {remedy}") from None


def load_backbone_weights(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The exported backbone's tensors, verified against the weights hash in its `backbone.json`."""
    path = Path(path)
    meta = read_backbone_meta(path) if meta is None else meta
    check_weights_hash(path / "model.safetensors", meta["weights"], path / "backbone.json", _REEXPORT)
    return load_safetensors(path / "model.safetensors", _REEXPORT)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: sparse shards + fused optimizer (DCP), dense engine (DeepSpeed), train state


SPARSE_PREFIX = "backbone.embeddings."
_STEP_DIR = re.compile(r"step_\d+")


def _sparse_state(model: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(SPARSE_PREFIX)}


def _fused_optimizer_state(model: nn.Module) -> dict[str, Any]:
    """The fused optimizer's state with empty per-table entries dropped.

    Trap: DCP fails to load a table's optimizer state when it is empty (SGD keeps none) and some
    rank holds no shard of that table.
    """
    state = model.fused_optimizer.state_dict()
    state["state"] = {k: v for k, v in state["state"].items() if v}
    return state


class CheckpointManager:
    """Atomic, resumable checkpoints of one training phase under `root`.

    A checkpoint is written into `step_XXXXXXXX.partial/` by every rank, then rank 0 marks it
    `COMPLETE` and renames it to `step_XXXXXXXX/` after a barrier: a crash during a save leaves the
    previous checkpoint intact, and a folder without `COMPLETE` is never loaded. Restoring walks
    from the newest complete checkpoint back and skips (with a warning) any that fails to load.
    """

    def __init__(self, root: str | Path, ctx, keep: int = 2) -> None:
        self.root = Path(root)
        self.ctx = ctx
        self.keep = keep

    def complete(self) -> list[Path]:
        """Checkpoints marked complete, oldest first (`step_X.partial` / `step_X.corrupt` never count)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()
                      and (p / "COMPLETE").is_file())

    def save(self, step: int, model: nn.Module, dense, extra: dict[str, Any], plan_text: str = "",
             data_parallel_optimizer=None) -> Path:
        """Checkpoint `step`: sparse shards + fused optimizer, the dense engine, `extra` train state and
        the optimizer of data-parallel tables (which TorchRec's fused optimizer does not cover)."""
        with uninterrupted():  # SIGTERM waits for the checkpoint to be complete (or not started)
            return self._save(step, model, dense, extra, plan_text, data_parallel_optimizer)

    def _save(self, step: int, model: nn.Module, dense, extra: dict[str, Any], plan_text: str,
              data_parallel_optimizer) -> Path:
        import torch.distributed.checkpoint as dcp

        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if (final / "COMPLETE").is_file():
            return final  # this step was saved before a restart
        def prepare() -> None:
            if self.ctx.is_main:
                _remove_tree(partial)  # left by a crash during an earlier save of this step
                partial.mkdir(parents=True)

        self._together(prepare)
        dcp.save({"model": _sparse_state(model), "optim": _fused_optimizer_state(model)},
                 checkpoint_id=str(partial / "sparse"))
        fault_point("save", step, self.ctx.rank)
        if dense is not None:
            dense.engine.save_checkpoint(str(partial / "dense"), tag="state")
        if data_parallel_optimizer is not None:
            extra = {**extra, "dp_optimizer": data_parallel_optimizer.state_dict()}
        rng = {"rng": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":  # IAK samples its noise on the device: resume must restore it too
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.ctx.device)
        def save_state() -> None:
            fault_point("save_state", step, self.ctx.rank)
            torch.save({"world_size": self.ctx.world_size, **rng, **extra},
                       partial / f"train_state_rank{self.ctx.rank}.pt")

        self._together(save_state)

        def complete() -> None:
            if self.ctx.is_main:
                atomic_write_text(partial / "plan.txt", plan_text, durable=False)
                atomic_write_text(partial / "tables.json", json.dumps(_table_shapes(model)), durable=False)
                fsync_tree(partial)  # every rank's files are on disk before COMPLETE can be
                atomic_write_text(partial / "COMPLETE", f"{self.ctx.world_size}\n")
                partial.rename(final)
                fsync_dir(self.root)
                for old in self.complete()[:-self.keep]:
                    _remove_tree(old)

        self._together(complete)
        return final

    def _together(self, write: Callable[[], None]) -> None:
        """Run `write` on this rank; if it fails on any rank, raise on every rank.

        Sync point. A rank-local failure (a full disk, a read-only folder) would otherwise leave
        the other ranks waiting in the next collective until its timeout (30 min), with the cause
        lost; here the failing rank raises its own error and the others say which path it was.
        """
        error: BaseException | None = None
        try:
            write()
        except Exception as exc:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = exc
        if not self._everywhere(error is None):
            if error is not None:
                raise error
            raise UserError(f"{self.root}: another rank failed to write its part of the checkpoint (see its error)")

    def restore_latest(self, model: nn.Module, dense, warn=print,
                       data_parallel_optimizer=None) -> dict[str, Any] | None:
        """Load the newest loadable checkpoint; returns its train state (None: no checkpoint, start fresh).

        Newer checkpoints that fail to load are renamed `step_X.corrupt` once an older one has loaded:
        left in place, they would count as the newest for retention, which would delete the good one.
        When checkpoints exist but none loads, the phase is not silently restarted: UserError.
        """
        candidates = self.complete()
        failed: list[tuple[Path, str]] = []
        for path in reversed(candidates):
            state, error = self._try_load(path, model, dense, data_parallel_optimizer)
            if self._everywhere(error is None):  # sync point: every rank loads the same checkpoint
                self._move_aside([p for p, _ in failed], warn)
                return state
            error = error or "it failed to load on another rank"
            warn(f"[checkpoint] {path} cannot be loaded ({error}); falling back to the one before")
            failed.append((path, error))
        if failed:
            raise UserError(
                f"{self.root}: none of the {len(failed)} checkpoints here loads (newest {failed[0][0].name}: "
                f"{failed[0][1]}); move {self.root} aside to start this phase from step 0"
            )
        return None

    def _try_load(self, path: Path, model: nn.Module, dense,
                  data_parallel_optimizer) -> tuple[dict[str, Any] | None, str | None]:
        """(train state, None), or (None, a one-line reason); a UserError (wrong model) is raised."""
        try:
            return self._load(path, model, dense, data_parallel_optimizer), None
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            return None, _one_line(exc)
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if type(exc).__name__ != "CheckpointException":
                raise
            return None, _one_line(exc)

    def _everywhere(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (a rank-local failure must not split the ranks)."""
        if self.ctx.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _move_aside(self, paths: list[Path], warn) -> None:
        if not self.ctx.is_main:
            return
        for path in paths:
            target = path.with_name(path.name + ".corrupt")
            _remove_tree(target)  # an earlier corrupt copy of the same step
            path.rename(target)
            warn(f"[checkpoint] moved {path} aside to {target.name} (it does not load)")

    def _load(self, path: Path, model: nn.Module, dense, data_parallel_optimizer=None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        saved_world = int((path / "COMPLETE").read_text().strip() or 1)
        saved_tables, own_tables = json.loads((path / "tables.json").read_text()), _table_shapes(model)
        if saved_tables != own_tables:
            bad = sorted(k for k in saved_tables.keys() | own_tables.keys()
                         if saved_tables.get(k) != own_tables.get(k))
            raise UserError(f"{path}: checkpoint is from a different model config: tables "
                            + ", ".join(f"{k} (checkpoint {saved_tables.get(k)}, model {own_tables.get(k)})"
                                        for k in bad[:4]))
        sparse = _sparse_state(model)
        optim = _fused_optimizer_state(model)
        dcp.load({"model": sparse, "optim": optim}, checkpoint_id=str(path / "sparse"))
        model.load_state_dict(sparse, strict=False)
        if optim["state"]:
            model.fused_optimizer.load_state_dict(optim)
        if dense is not None:
            if saved_world != self.ctx.world_size and dense.engine.zero_optimization_stage() > 0:
                raise UserError(f"{path}: ZeRO stage {dense.engine.zero_optimization_stage()} state saved on "
                                f"{saved_world} ranks cannot be resumed on {self.ctx.world_size}; resume on "
                                f"{saved_world} ranks, or export the backbone and start a new phase from it")
            load_path, _ = dense.engine.load_checkpoint(str(path / "dense"), tag="state",
                                                        load_module_strict=True, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError("DeepSpeed found no dense state")
        rank_file = path / f"train_state_rank{min(self.ctx.rank, saved_world - 1)}.pt"
        state = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(state.pop("rng"))
        if "cuda_rng" in state and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state.pop("cuda_rng"), self.ctx.device)
        state.pop("cuda_rng", None)
        if data_parallel_optimizer is not None and "dp_optimizer" in state:
            data_parallel_optimizer.load_state_dict(state.pop("dp_optimizer"))
        state["path"] = str(path)
        return state


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The cause of a failed load in one short line.

    DCP's CheckpointException text is every rank's traceback: its last line holds the cause.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if type(exc).__name__ == "CheckpointException" else f"{type(exc).__name__}: {lines[0]}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _table_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k[len(SPARSE_PREFIX):]: list(v.size()) for k, v in _sparse_state(model).items()}


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
