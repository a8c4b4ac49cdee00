"""Backbones as per-rank shards: saved on 2 ranks, loaded on 1 and on 2 ranks under other plans, bitwise;
a rank's peak RSS while exporting and loading; a damaged shard refused in one line on every rank.

The 2-rank part runs this file under torchrun (`python -m torch.distributed.run ... THIS SPEC.json`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

USER_ROWS, ITEM_ROWS, DIM = 2_000_000, 1_000_000, 16  # 122 + 61 MiB in fp32: a copy shows in the RSS
SAVE_PLAN = {"user_id": "table_wise", "item_id": "table_wise", "tags": "data_parallel"}  # one big table per rank
# another plan on 2 ranks: every rank reads all of user_id (both ranks' files), one rank item_id
LOAD_PLAN = {"user_id": "data_parallel", "item_id": "table_wise", "tags": "column_wise"}
ONE_RANK_PLAN = {"user_id": "table_wise", "item_id": "data_parallel", "tags": "column_wise"}
USER, ITEM = "embeddings.embedding_bags.t_user_id.weight", "embeddings.embedding_bags.t_item_id.weight"
SEED = 7


def schema(rows=(USER_ROWS, ITEM_ROWS)):
    from iak_dist.data.schema import Schema, SparseFeature

    return Schema(sparse=[SparseFeature("user_id", rows[0]), SparseFeature("item_id", rows[1]),
                          SparseFeature("tags", 300, multi_hot=True)], domains=["d0", "d1"], dense=["dense_0"])


def model_cfg(table_dtype="fp32"):
    from iak_dist.config import ModelConfig

    return ModelConfig(embedding_dim=DIM, tower=[16, 8], table_dtype=table_dtype)


def build(ctx, plan, init=True, rows=(USER_ROWS, ITEM_ROWS), table_dtype="fp32"):
    """A sharded Ranker under `plan`; `init`: tables from `init_tables(SEED)` (the same under every plan)
    and dense tensors from seeded generators, so any plan's model is a reference for any other's."""
    from iak_dist.config import ShardingConfig, TablePlan
    from iak_dist.distributed.sharding import init_tables, shard_ranker
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker

    sharding = ShardingConfig(plan={k: TablePlan(sharding_type=v) for k, v in plan.items()})
    backbone = Backbone(schema(rows), model_cfg(table_dtype), device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, sharding, None, 64)
    if init:
        init_tables(sharded.model, sharded.ranker, SEED)
        with torch.no_grad():
            for i, (_, value) in enumerate(sorted(dense_state(sharded.model).items())):
                value.copy_(torch.randn(value.shape, generator=torch.Generator().manual_seed(i)))
    return sharded


def dense_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.") and ".embedding_bags." not in k}


def local_pieces(model):
    """{key: [(offsets, tensor)]} of this rank's part of every backbone tensor (nothing gathered)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out[key] = ([(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
                        if isinstance(value, ShardedTensor) else [((0, 0), value)])
    return out


def same_pieces(a, b) -> list[str]:
    """Keys whose local pieces differ (bitwise) between two models of the same plan."""
    pa, pb = local_pieces(a), local_pieces(b)
    assert pa.keys() == pb.keys()
    return [k for k in pa if len(pa[k]) != len(pb[k])
            or not all(oa == ob and torch.equal(ta, tb) for (oa, ta), (ob, tb) in zip(pa[k], pb[k], strict=True))]


def shard_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for ps in local_pieces(model).values() for _, t in ps
               if t.dim() == 2 and t.shape[0] > 1000)  # the table shards this rank holds


class PeakRss:
    """Growth of this process's peak RSS over its RSS at entry (Linux: `clear_refs` resets the peak)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.base = self.read("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = self.read("VmHWM") - self.base

    @staticmethod
    def read(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def item_file(out: Path) -> str:
    layout = json.loads((out / "backbone" / "backbone.json").read_text())["layout"]
    return layout["tensors"][ITEM]["pieces"][0]["file"]


def run_two_ranks(out: Path) -> None:
    """Under torchrun: export on 2 ranks (SAVE_PLAN), load on 2 ranks (LOAD_PLAN), load a damaged copy."""
    import gc

    from iak_dist.distributed.checkpoint import backbone_weights, export_backbone, load_sharded, plain_state_dict
    from iak_dist.distributed.context import init_distributed
    from iak_dist.errors import UserError
    from iak_dist.phases.common import build_from_backbone

    ctx = init_distributed()
    result = {}
    saved = build(ctx, SAVE_PLAN)
    with PeakRss() as gather:  # what the export did before the shards (then it also copied it to write it)
        plain_state_dict(saved.model, prefix="backbone.")
    with PeakRss() as export:
        export_backbone(saved.model, schema(), model_cfg(), out / "backbone", ctx.rank)
    result["export"] = {"growth": export.growth, "shard": shard_bytes(saved.model), "gather": gather.growth}
    del saved
    gc.collect()
    ctx.barrier()

    loaded = build(ctx, LOAD_PLAN, init=False)
    weights = backbone_weights(out / "backbone")
    with PeakRss() as load:
        load_sharded(loaded.model, weights, prefix="backbone.")
    result["load"] = {"growth": load.growth, "shard": shard_bytes(loaded.model)}
    result["differ"] = same_pieces(loaded.model, build(ctx, LOAD_PLAN).model)
    del loaded
    gc.collect()

    if ctx.is_main:  # a damaged copy: one byte flipped in the file holding item_id (one rank reads it)
        shutil.copytree(out / "backbone", out / "damaged")
        path = out / "damaged" / item_file(out)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    ctx.barrier()
    from iak_dist.config import ShardingConfig, TablePlan

    try:
        build_from_backbone(out / "damaged", None, ctx, train_embeddings=False,
                            sharding=ShardingConfig(plan={k: TablePlan(sharding_type=v) for k, v in LOAD_PLAN.items()}))
        result["damaged"] = None
    except UserError as exc:
        result["damaged"] = str(exc)
    (out / f"result_rank{ctx.rank}.json").write_text(json.dumps(result))
    ctx.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from test_distributed import free_port

    out = tmp_path_factory.mktemp("backbone_shards")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_writes_its_own_shards_and_the_layout_names_them(two_ranks):
    from iak_dist.distributed.checkpoint import file_hash

    out, _ = two_ranks
    meta = json.loads((out / "backbone" / "backbone.json").read_text())
    files = meta["layout"]["files"]
    assert sorted(files) == ["dense.safetensors", "shards/rank-00000-of-00002.safetensors",
                             "shards/rank-00001-of-00002.safetensors"]
    assert all(file_hash(out / "backbone" / name) == digest for name, digest in files.items())
    pieces = {name: meta["layout"]["tensors"][name]["pieces"] for name in (USER, ITEM)}
    user = meta["layout"]["tensors"][USER]
    assert user["shape"] == [USER_ROWS, DIM] and user["dtype"] == "F32"
    assert [(p["rows"], p["cols"]) for p in pieces[USER]] == [([0, USER_ROWS], [0, DIM])]  # table-wise: whole
    assert {pieces[USER][0]["file"], pieces[ITEM][0]["file"]} == {"shards/rank-00000-of-00002.safetensors",
                                                                  "shards/rank-00001-of-00002.safetensors"}
    tags = meta["layout"]["tensors"]["embeddings.embedding_bags.t_tags.weight"]  # data-parallel: once, by rank 0
    assert [p["file"] for p in tags["pieces"]] == ["dense.safetensors"]


def test_export_and_load_hold_one_chunk_beyond_the_model(two_ranks):
    """Peak RSS growth during export and load, per rank, against the bytes of the table shards it holds.

    Gathering every table on every rank (what the export did before the shards) is measured beside it.
    """
    from iak_dist.distributed.checkpoint import CHUNK_BYTES

    _, results = two_ranks
    for rank, result in enumerate(results):
        for step in ("export", "load"):
            growth, shard = result[step]["growth"], result[step]["shard"]
            assert growth < CHUNK_BYTES + shard // 8, f"rank {rank} {step}: +{growth >> 20} MiB (shard {shard >> 20})"
        assert result["export"]["gather"] > (USER_ROWS + ITEM_ROWS) * DIM * 4  # the old way: every table, every rank
    assert all(r["load"]["shard"] >= USER_ROWS * DIM * 4 for r in results)  # both read all of user_id


def test_two_rank_export_loads_bitwise_on_two_ranks_with_another_plan(two_ranks):
    _, results = two_ranks
    assert [r["differ"] for r in results] == [[], []]


def test_two_rank_export_loads_bitwise_on_one_rank_and_streams_by_row_chunks(two_ranks, ctx):
    from iak_dist.config import ShardingConfig, TablePlan
    from iak_dist.distributed.checkpoint import backbone_weights, plain_state_dict
    from iak_dist.phases.common import build_from_backbone

    out, _ = two_ranks
    sharding = ShardingConfig(plan={k: TablePlan(sharding_type=v) for k, v in ONE_RANK_PLAN.items()})
    loaded = build_from_backbone(out / "backbone", None, ctx, train_embeddings=False, sharding=sharding)[0].model
    reference = build(ctx, ONE_RANK_PLAN).model
    assert same_pieces(loaded, reference) == []
    del loaded
    want = plain_state_dict(reference, prefix="backbone.")[USER]
    chunks = list(backbone_weights(out / "backbone").row_chunks(USER))
    assert len(chunks) > 1 and all(c.shape[1] == DIM for _, c in chunks)
    assert torch.equal(torch.cat([c for _, c in chunks]), want)


def test_a_damaged_shard_is_refused_in_one_line_on_every_rank(two_ranks):
    out, results = two_ranks
    path = out / "damaged" / item_file(out)
    for result in results:  # the rank that does not read the file raises the same line (no hang)
        assert re.fullmatch(rf"{path}: weights hash \w+ differs from \w+ recorded in backbone.json \(the file was "
                            r"replaced or damaged\); re-export the backbone \(run pre-training again\)",
                            result["damaged"]), result["damaged"]


def test_a_backbone_exported_as_one_file_still_loads(tmp_path, ctx):
    """Backbones exported before the shards: full tensors in `model.safetensors`, its hash as `weights`."""
    from safetensors.torch import save_file

    from iak_dist.config import ShardingConfig, TablePlan, to_dict
    from iak_dist.distributed.checkpoint import file_hash, plain_state_dict
    from iak_dist.model.backbone import backbone_identity
    from iak_dist.phases.common import build_from_backbone

    rows = (1000, 500)  # small is enough here
    reference = build(ctx, ONE_RANK_PLAN, rows=rows).model
    save_file({k: v.contiguous() for k, v in plain_state_dict(reference, prefix="backbone.").items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps({
        "schema": to_dict(schema(rows)), "model": to_dict(model_cfg()),
        "identity": backbone_identity(schema(rows), model_cfg()),
        "weights": file_hash(tmp_path / "model.safetensors")}))
    sharding = ShardingConfig(plan={k: TablePlan(sharding_type=v) for k, v in LOAD_PLAN.items()})
    loaded = build_from_backbone(tmp_path, None, ctx, train_embeddings=False, sharding=sharding)[0].model
    assert same_pieces(loaded, build(ctx, LOAD_PLAN, rows=rows).model) == []


def test_fp16_tables_are_stored_and_loaded_as_fp16(tmp_path, ctx):
    from iak_dist.config import ShardingConfig, TablePlan
    from iak_dist.distributed.checkpoint import export_backbone
    from iak_dist.phases.common import build_from_backbone

    rows = (3000, 2000)
    save = {"user_id": "table_wise", "item_id": "column_wise", "tags": "table_wise"}  # fp16: no data-parallel
    load = {"user_id": "column_wise", "item_id": "table_wise", "tags": "column_wise"}
    export_backbone(build(ctx, save, rows=rows, table_dtype="fp16").model, schema(rows), model_cfg("fp16"), tmp_path)
    layout = json.loads((tmp_path / "backbone.json").read_text())["layout"]
    assert {layout["tensors"][k]["dtype"] for k in (USER, ITEM)} == {"F16"}
    sharding = ShardingConfig(plan={k: TablePlan(sharding_type=v) for k, v in load.items()})
    loaded = build_from_backbone(tmp_path, None, ctx, train_embeddings=False, sharding=sharding)[0].model
    assert same_pieces(loaded, build(ctx, load, rows=rows, table_dtype="fp16").model) == []


if __name__ == "__main__":
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    run_two_ranks(Path(sys.argv[1]))
    exit_launched_rank(0)
