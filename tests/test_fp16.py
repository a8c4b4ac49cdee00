"""fp16 embedding tables (`model.table_dtype: fp16`): stored, trained, exported and re-loaded as fp16.

The two-rank part runs this file as a torchrun worker (`python -m torch.distributed.run ... test_fp16.py
OUT`): each rank trains a sharded fp16 backbone, exports it (each rank its shards), and checks the
export against its own shards and against a re-load under another plan.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import free_port

COLUMN_WISE = {"user": "column_wise", "item": "column_wise"}
TABLE_WISE = {"user": "table_wise", "item": "table_wise"}


def tiny_schema():
    from iak_dist.data.schema import Schema, SparseFeature

    return Schema(sparse=[SparseFeature("user", 300), SparseFeature("item", 200)], domains=["a", "b"], dense=[])


def sharding(kinds):
    from iak_dist.config import ShardingConfig, TablePlan

    return ShardingConfig(plan={f: TablePlan(sharding_type=k) for f, k in kinds.items()})


def batches(schema, n, size, seed):
    """`n` batches of single-hot IDs whose clicks depend on the user ID (something to learn)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iak_dist.data.batch import Batch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = [torch.randint(0, f.table_size, (size,), generator=gen) for f in schema.sparse]
        click = (ids[0] % 2).float()
        kjt = KeyedJaggedTensor(keys=schema.feature_names, values=torch.cat(ids),
                                lengths=torch.ones(len(ids) * size, dtype=torch.int32))
        domain = ids[1] % 2
        out.append(Batch(kjt, torch.zeros(size, 1), click, click * 0, domain, ids[0]))
    return out


def local_tables(model):
    """{table key: [(row offset, col offset, shard tensor)]} of what this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.embeddings.") and key.endswith(".weight"):
            pieces = ([(*s.metadata.shard_offsets, s.tensor.clone()) for s in value.local_shards()]
                      if isinstance(value, ShardedTensor) else [(0, 0, value.clone())])
            out[key[len("backbone."):]] = pieces
    return out


def same_as_file(tables, weights) -> bool:
    """Every local shard is bitwise the slice of the exported table it covers, and fp16."""
    return all(t.dtype == torch.float16 and weights[key].dtype == torch.float16
               and torch.equal(t, weights[key][r:r + t.shape[0], c:c + t.shape[1]])
               for key, pieces in tables.items() for r, c, t in pieces)


def rank_worker(out: Path) -> None:
    """One rank: train fp16 tables for 30 steps, export, check the export and a re-load (another plan)."""
    from iak_dist.config import ModelConfig, ZeroConfig
    from iak_dist.distributed.checkpoint import export_backbone, load_backbone_weights
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.distributed.sharding import init_tables, shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.step import train_step

    ctx = init_distributed()
    schema, cfg = tiny_schema(), ModelConfig(embedding_dim=16, tower=[16], table_dtype="fp16")
    backbone = Backbone(schema, cfg, device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, sharding(COLUMN_WISE), 0.1, 64)
    init_tables(sharded.model, sharded.ranker, 0)
    dense = DenseEngine(backbone.dense_modules(), 0.01, 0.0, ZeroConfig(), 64, ctx.world_size)
    before = local_tables(sharded.model)
    data = batches(schema, 5, 64, seed=ctx.rank)
    sharded.model.train()
    losses = [float(train_step(sharded.model, dense, data[i % 5], None)[0]) for i in range(30)]
    embedded = backbone.embed(data[0].sparse)
    after = local_tables(sharded.model)
    optimizer_state = sharded.model.fused_optimizer.state_dict()["state"]
    export_backbone(sharded.model, schema, cfg, out / "backbone", ctx.rank)
    ctx.barrier()
    weights = load_backbone_weights(out / "backbone")
    reloaded, _ = build_from_backbone(out / "backbone", None, ctx, False, sharding(TABLE_WISE))
    result = {
        "tables": sorted(k for k, p in after.items() if p),
        "dtypes": sorted({str(t.dtype) for p in after.values() for _, _, t in p}),
        "moved": all(not torch.equal(a[2], b[2]) for k in after for a, b in zip(after[k], before[k], strict=True)),
        "state_dtypes": sorted({str(s.dtype) for v in optimizer_state.values() for s in v.values()}),
        "embedded_dtype": str(embedded.dtype),
        "first_losses": losses[:5], "last_losses": losses[-5:],
        "export_exact": same_as_file(after, weights),
        "reload_exact": same_as_file(local_tables(reloaded.model), weights),
    }
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    close_distributed(ctx)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fp16_tables_train_on_two_ranks_and_export_bit_exactly(two_ranks):
    _, ranks = two_ranks
    # small tables: the planner keeps each whole on one rank, so an export needs both ranks' files
    assert sorted(ranks[0]["tables"] + ranks[1]["tables"]) == ["embeddings.embedding_bags.t_item.weight",
                                                               "embeddings.embedding_bags.t_user.weight"]
    for r in ranks:
        assert r["dtypes"] == ["torch.float16"]
        assert r["state_dtypes"] == ["torch.float32"]  # row-wise Adagrad's accumulator stays fp32
        assert r["embedded_dtype"] == "torch.float32"  # what the dense part sees
        assert r["moved"]
        assert sum(r["last_losses"]) < 0.9 * sum(r["first_losses"])
        assert r["export_exact"] and r["reload_exact"]


def test_fp16_backbone_loads_on_one_rank_bit_exactly(two_ranks, ctx):
    from iak_dist.distributed.checkpoint import load_backbone_weights
    from iak_dist.phases.common import build_from_backbone

    out, _ = two_ranks
    weights = load_backbone_weights(out / "backbone")
    sharded, meta = build_from_backbone(out / "backbone", None, ctx, False, sharding(TABLE_WISE))
    assert meta["model"]["table_dtype"] == "fp16"
    assert same_as_file(local_tables(sharded.model), weights)


def test_backbones_exported_before_table_dtype_load_as_fp32_with_their_identity():
    from iak_dist.config import ModelConfig, from_dict, to_dict
    from iak_dist.model.backbone import backbone_identity

    schema = tiny_schema()
    from iak_dist.model.backbone import LATER_MODEL_KEYS

    # backbone.json before table_dtype and the sequence encoder's keys
    old_model = {k: v for k, v in to_dict(ModelConfig()).items() if k not in LATER_MODEL_KEYS}
    # backbone.json before the sequence keys of a sparse feature (left out at their defaults) and table_dtype
    old_schema = {**to_dict(schema), "sparse": [{"name": f.name, "table_size": f.table_size, "multi_hot": f.multi_hot}
                                                for f in schema.sparse]}
    old_identity = hashlib.sha256(json.dumps({"schema": old_schema, "model": old_model},
                                             sort_keys=True).encode()).hexdigest()[:16]
    loaded = from_dict(ModelConfig, old_model, "backbone.json")
    assert loaded.table_dtype == "fp32"
    assert backbone_identity(schema, loaded) == old_identity
    assert backbone_identity(schema, ModelConfig(table_dtype="fp16")) != old_identity
    assert backbone_identity(schema, ModelConfig(sequence_encoder="transformer")) != old_identity


def test_fp16_tables_are_refused_data_parallel():
    from iak_dist.distributed.sharding import plan_constraints
    from iak_dist.errors import UserError

    with pytest.raises(UserError, match=r"^distributed.sharding.plan.user: data_parallel tables must be fp32 "
                                        r"\(model.table_dtype is fp16\); pick another sharding type$"):
        plan_constraints(["t_user"], sharding({"user": "data_parallel"}), "cpu", 2, "fp16")
    planned = plan_constraints(["t_user"], sharding({}), "cpu", 2, "fp16")["t_user"]
    assert "data_parallel" not in planned.sharding_types and "table_wise" in planned.sharding_types


if __name__ == "__main__":
    rank_worker(Path(sys.argv[1]))
