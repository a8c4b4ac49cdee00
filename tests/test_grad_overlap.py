"""The dense gradient all-reduce overlapped with backward gives the update it gave after backward.

Two real ranks on gloo (torchrun runs this file as the worker). Each ZeRO stage trains the same
small model on each rank's own batches twice: with the overlap (stage 0: `OverlappedGradReduce`;
stages 1-3: DeepSpeed's `overlap_comm`) and without it (`zero_optimization.overlap_comm: false`,
DeepSpeed's one reduction after backward). Gradients far above the clipping norm, so clipping acts.
The same ranks then check the plain TorchRec DMP loop the profile measures the overlap against.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STAGES = (0, 1, 2, 3)
STEPS = 4


class Net(torch.nn.Module):
    """Four layers of about 65k weights (one stage-0 bucket each) and a branch only rank 0 uses, so one
    rank's bucket waits for backward's end while the other's left during it."""

    def __init__(self) -> None:
        super().__init__()
        self.side = torch.nn.Linear(64, 1)  # first: in the last bucket (buckets run backward's order)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                       torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 1))

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        out = self.mlp(x)
        return out + self.side(x) if use_side else out


def train(stage: int, overlap: bool, rank: int, out: Path) -> dict:
    """Train STEPS steps; save the weights and a DeepSpeed checkpoint; say when each bucket left."""
    from iak_dist.config import ZeroConfig
    from iak_dist.distributed.zero import DenseEngine

    torch.manual_seed(0)
    net = Net()
    use_side = stage == 0 and rank == 0  # ZeRO 1-3 expect every rank to use every parameter
    # on: explicit, as GPUs get it by default at stages 1-2 (on CPU DeepSpeed's default there is off)
    zero = ZeroConfig(stage=stage, gradient_clipping=0.5, deepspeed={"zero_optimization": {"overlap_comm": overlap}})
    engine = DenseEngine({"net": net}, lr=0.01, weight_decay=0.01, cfg=zero, micro_batch=32, world_size=2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    left_during_backward = []  # buckets started from the hooks, seen when backward ends
    if engine.overlap is not None:
        finish = engine.overlap.finish
        engine.overlap.finish = lambda: (left_during_backward.append(engine.overlap.next_bucket), finish())
    for step in range(STEPS):
        if stage == 0 and step == STEPS // 2:  # frozen after the engine was built: DeepSpeed leaves it alone
            net.side.bias.requires_grad_(False)
        x = torch.randn(32, 64, generator=gen) * 10
        engine.backward(((net(x, use_side) - 3.0) ** 2).mean())
        engine.step()
    tag = f"stage{stage}_{'on' if overlap else 'off'}"
    with engine.gathered():
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out / f"{tag}_rank{rank}.pt")
    engine.engine.save_checkpoint(str(out / f"{tag}_ckpt"), tag="state")
    buckets = len(engine.overlap.buckets) if engine.overlap is not None else 0
    return {"overlapped": engine.overlap is not None, "buckets": buckets, "left_during_backward": left_during_backward}


def plain_torchrec_gradient_gaps(ctx, data_dir: Path, steps: int = 2) -> list[list[float]]:
    """The plain TorchRec DMP loop the profile compares us with (`profiling.steps.plain_torchrec_model`),
    each rank on its own batches: after each backward, [largest difference of this rank's dense gradients
    from rank 0's, their largest magnitude]. DDP averages them over the ranks: no difference."""
    import torch.distributed as dist

    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.sharding import shard_ranker
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker
    from iak_dist.phases.step import esmm_loss_per_row
    from profiling.steps import plain_torchrec_model

    cfg = load_config(None, ["data.source=parquet", f"data.dir={data_dir}", "model.tower=[32, 16]",
                             "pretrain.batch_size=64"])
    schema = Schema.load(data_dir / "schema.yaml")
    bs = cfg.pretrain.batch_size
    ranker = Ranker(Backbone(schema, cfg.model, device=torch.device("meta")))
    plan = shard_ranker(ranker, ctx, cfg.distributed.sharding, cfg.pretrain.lr_sparse, bs).plan
    model = plain_torchrec_model(cfg, schema, ctx, plan)
    params = model.module.dense_parameters()
    reader = ParquetReader(Split.open(data_dir, "pretrain", schema), schema, bs, ctx.rank, ctx.world_size,
                           shuffle=True, drop_last=True)
    gaps = []
    for batch, _ in zip(reader.epoch(0), range(steps), strict=False):
        for param in params:
            param.grad = None
        esmm_loss_per_row(model(batch.sparse, batch.dense), batch).mean().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        rank0 = grads.clone()
        dist.broadcast(rank0, 0)
        gaps.append([(grads - rank0).abs().max().item(), grads.abs().max().item()])
    return gaps


def worker(out: Path, data_dir: Path) -> None:
    from iak_dist.distributed.context import close_distributed, init_distributed

    ctx = init_distributed()
    report = {f"stage{s}_{'on' if o else 'off'}": train(s, o, ctx.rank, out) for s in STAGES for o in (True, False)}
    report["plain_torchrec_gradient_gaps"] = plain_torchrec_gradient_gaps(ctx, data_dir)
    (out / f"report_rank{ctx.rank}.json").write_text(json.dumps(report))
    ctx.barrier()
    close_distributed(ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_dir) -> Path:
    out = tmp_path_factory.mktemp("grad_overlap")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(out), str(synth_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def load_state(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def assert_same(a, b, where: str) -> None:
    """Same structure, same keys, bitwise-equal tensors (non-tensor values equal)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where


@pytest.mark.parametrize("stage", STAGES)
def test_overlapped_update_is_bitwise_the_update_after_backward(runs, stage):
    """On 2 ranks each element's sum over ranks is a + b whatever the buckets, so equality is bitwise
    (on more ranks a ring all-reduce's order depends on the bucket layout: fp32 rounding)."""
    for rank in (0, 1):
        on = load_state(runs / f"stage{stage}_on_rank{rank}.pt")
        off = load_state(runs / f"stage{stage}_off_rank{rank}.pt")
        torch.manual_seed(0)
        start = Net().state_dict()
        assert_same(on, off, f"stage {stage} rank {rank}")
        assert all(not torch.equal(on[k], start[k]) for k in on if k.startswith("mlp."))  # it trained
    # data parallel: both ranks hold the same weights
    assert_same(load_state(runs / f"stage{stage}_on_rank0.pt"), load_state(runs / f"stage{stage}_on_rank1.pt"),
                f"stage {stage} ranks")


def test_stage0_buckets_leave_during_backward(runs):
    """Our stage-0 overlap: several buckets, all started from gradient hooks while every parameter gets a
    gradient; where one gets none (unused by the batch, or frozen), the buckets before its own left during
    backward and its own after. Off: DeepSpeed reduces after backward."""
    reports = [json.loads((runs / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    on = [r["stage0_on"] for r in reports]
    assert all(r["overlapped"] and r["buckets"] >= 4 for r in on)
    n = on[0]["buckets"]  # rank 0 used every parameter until one was frozen half-way
    assert on[0]["left_during_backward"] == [n] * (STEPS // 2) + [n - 1] * (STEPS - STEPS // 2)
    assert all(0 < n < on[1]["buckets"] for n in on[1]["left_during_backward"])
    assert not any(r[f"stage{s}_off"]["overlapped"] or r[f"stage{s}_on"]["overlapped"]
                   for r in reports for s in STAGES[1:])
    assert not any(r["stage0_off"]["overlapped"] for r in reports)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_format_is_unchanged(runs, stage):
    """DeepSpeed's checkpoint: the same files, the same keys, the same tensors, with the overlap or without.

    Trap: at ZeRO-3 each rank's flat fp32 partition pads every parameter to a multiple of the ranks with
    memory DeepSpeed never initialises, so those few elements differ from run to run whatever the
    overlap; there the partitions are compared through DeepSpeed's own `zero_to_fp32`, which drops them.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    on_dir, off_dir = runs / f"stage{stage}_on_ckpt" / "state", runs / f"stage{stage}_off_ckpt" / "state"
    files = sorted(p.name for p in on_dir.iterdir())
    assert files and files == sorted(p.name for p in off_dir.iterdir())
    for name in files:
        on, off = load_state(on_dir / name), load_state(off_dir / name)
        for volatile in ("ds_config", "ds_version"):  # the config differs by the overlap switch itself
            on.pop(volatile, None), off.pop(volatile, None)
        if stage == 3 and "optimizer_state_dict" in on:
            on["optimizer_state_dict"].pop("fp32_flat_groups"), off["optimizer_state_dict"].pop("fp32_flat_groups")
        assert_same(on, off, name)
    if stage > 0:
        assert_same(get_fp32_state_dict_from_zero_checkpoint(str(on_dir.parent), tag="state"),
                    get_fp32_state_dict_from_zero_checkpoint(str(off_dir.parent), tag="state"), "zero_to_fp32")


def test_plain_torchrec_baseline_averages_its_dense_gradients(runs):
    """The loop the 2-rank profile measures us against does the dense all-reduce we do. Trap: under DMP's
    default DDP wrapper (`static_graph=True`) it did none, and its ranks' dense weights drifted apart."""
    gaps = json.loads((runs / "report_rank1.json").read_text())["plain_torchrec_gradient_gaps"]
    assert len(gaps) == 2
    assert all(gap == 0.0 and magnitude > 0.0 for gap, magnitude in gaps)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
