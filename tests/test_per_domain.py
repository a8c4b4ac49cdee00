"""`full_per_domain` (one full fine-tune per domain): a member is exactly `full` on its domain's rows,
each domain is scored by its own member (a domain without one by the plain backbone), the cost is
the members' sum, a saved member is not trained again, and a missing or foreign member is one line.
Two ranks score a per-domain adapter (one lockstep pass per model) to exactly the metrics of one.

Run as a script under torchrun, this file is the 2-rank worker of `test_two_ranks_score_members_as_one`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from iak_dist.config import DistributedConfig
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import read_backbone_meta
from iak_dist.errors import UserError
from iak_dist.model.strategies.saving import verify_adapter
from iak_dist.phases.evaluate import evaluate
from iak_dist.phases.finetune import finetune


def finetune_only(synth_dir, out, domains: list[str]):
    """A copy of the synthetic data whose fine-tune split holds only `domains`' rows."""
    shutil.copytree(synth_dir, out)
    table = pq.read_table(out / "finetune.parquet")
    pq.write_table(table.filter(pc.is_in(table.column("domain"), pa.array(domains))), out / "finetune.parquet")
    return out


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def two_members(tmp_path_factory, synth_dir, backbone_dir, small_cfg, ctx):
    """`full_per_domain` fine-tuned where the last domain has no fine-tune rows: two members, each
    checkpointed on the way (its checkpoints are removed once both are saved)."""
    root = tmp_path_factory.mktemp("per_domain")
    domains = Schema.load(synth_dir / "schema.yaml").domains
    data = finetune_only(synth_dir, root / "data", domains[:2])
    summary = finetune(data, backbone_dir, "full_per_domain", small_cfg.finetune, 0, root / "adapter", ctx,
                       show_progress=False, dist_cfg=DistributedConfig(checkpoint_every=10))
    assert sorted(p.name for p in (root / "adapter" / "domains").iterdir()) == domains[:2]
    return data, root / "adapter", summary


def test_one_domain_member_is_exactly_full_on_that_domain(synth_dir, backbone_dir, small_cfg, ctx, tmp_path):
    domain = Schema.load(synth_dir / "schema.yaml").domains[0]
    data = finetune_only(synth_dir, tmp_path / "data", [domain])
    full = finetune(data, backbone_dir, "full", small_cfg.finetune, 0, tmp_path / "full", ctx, show_progress=False)
    per = finetune(data, backbone_dir, "full_per_domain", small_cfg.finetune, 0, tmp_path / "per", ctx,
                   show_progress=False)
    config = read_json(tmp_path / "per" / "adapter_config.json")
    assert config["strategy"] == "full_per_domain" and list(config["members"]) == [domain]
    # same seed, same rows: the member's config (its weights' and backbone shards' hashes) is full's
    assert read_json(tmp_path / "per" / "domains" / domain / "adapter_config.json") == \
        read_json(tmp_path / "full" / "adapter_config.json")
    assert per["finetune/trainable_params"] == full["finetune/trainable_params"] and per["finetune/members"] == 1
    assert per == read_json(tmp_path / "per" / "train_summary.json")
    assert evaluate(data, backbone_dir, tmp_path / "per", ctx)[domain] == \
        evaluate(data, backbone_dir, tmp_path / "full", ctx)[domain]


def test_each_domain_is_scored_by_its_own_member(two_members, backbone_dir, small_cfg, ctx, monkeypatch):
    data, adapter, summary = two_members
    domains = Schema.load(data / "schema.yaml").domains
    members = {d: read_json(adapter / "domains" / d / "train_summary.json") for d in domains[:2]}
    assert not (adapter / "domains" / domains[2]).exists()
    for key in ("finetune/trainable_params", "train/seconds"):
        assert summary[key] == pytest.approx(sum(m[key] for m in members.values()), rel=1e-12)
    got = evaluate(data, backbone_dir, adapter, ctx)
    for domain in domains[:2]:  # as scored by that member alone (a `full` adapter), marks included
        assert got[domain] == evaluate(data, backbone_dir, adapter / "domains" / domain, ctx)[domain]
        assert got[domain]["finetuned"] is True
    plain = evaluate(data, backbone_dir, None, ctx)[domains[2]]
    assert got[domains[2]] == plain | {"finetuned": False, "finetune_rows": 0,
                                       "note": "no fine-tune rows: plain backbone (no model of its own)"}
    assert got["overall"]["rows"] == sum(got[d]["rows"] for d in domains)

    import iak_dist.phases.finetune as ft

    def refuse(*args, **kwargs):
        raise AssertionError("a saved member was trained again")

    monkeypatch.setattr(ft, "finetune", refuse)  # what finetune_per_domain calls for each member
    again = finetune(data, backbone_dir, "full_per_domain", small_cfg.finetune, 0, adapter, ctx,
                     show_progress=False)
    assert again == summary


def test_missing_or_foreign_member_is_one_line(two_members, backbone_dir, tmp_path):
    data, adapter, _ = two_members
    d0, d1 = Schema.load(data / "schema.yaml").domains[:2]
    meta = read_backbone_meta(backbone_dir)
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    verify_adapter(copy, meta, every_file=True)
    (copy / "domains" / d1 / "adapter_config.json").write_bytes(
        (copy / "domains" / d0 / "adapter_config.json").read_bytes())
    recorded = read_json(copy / "adapter_config.json")["members"][d1]
    with pytest.raises(UserError, match=rf"^{copy}/domains/{d1}/adapter_config.json: hash [0-9a-f]{{16}} differs "
                                        rf"from {recorded} recorded in {copy}/adapter_config.json \(a member of "
                                        rf"another run\?\); fine-tune this strategy again$"):
        verify_adapter(copy, meta)
    shutil.rmtree(copy / "domains" / d1)
    message = (f"{copy}/domains/{d1}: the model of domain '{d1}' listed in {copy}/adapter_config.json is missing; "
               f"fine-tune this strategy again")
    with pytest.raises(UserError) as missing:
        verify_adapter(copy, meta)
    assert str(missing.value) == message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_score_members_as_one(two_members, backbone_dir, small_cfg, ctx, tmp_path):
    """A test split of 900 rows (one row group) is 450 rows a rank, 9 batches of 50: the same batches
    as on one rank, so every score and metric is the same; each model's pass is its own lockstep; a
    finished run fine-tuned again on 2 ranks trains nothing and writes the same summary."""
    data, adapter, summary = two_members
    data = shutil.copytree(data, tmp_path / "data")
    pq.write_table(pq.read_table(data / "test.parquet").slice(0, 900), data / "test.parquet")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(data), "backbone": str(backbone_dir), "adapter": str(adapter),
                                "out": str(tmp_path)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in range(2)]
    want = evaluate(data, backbone_dir, adapter, ctx, batch_size=50)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == json.loads(json.dumps(want))
    assert ranks[0]["passes"] == ranks[1]["passes"] == [9, 9, 9]  # two members, then the plain backbone
    assert ranks[0]["summary"] == ranks[1]["summary"] == summary


def two_rank_worker(spec_path: str) -> None:
    """One rank of `test_two_ranks_score_members_as_one` (started by torchrun)."""
    import iak_dist.phases.evaluate as ev
    import iak_dist.phases.finetune as ft
    from iak_dist.config import load_config
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed()
    lockstep, passes = ev.lockstep, []

    def counted(batches, ctx, padding):
        passes.append(0)
        for batch, real in lockstep(batches, ctx, padding):
            passes[-1] += 1
            yield batch, real

    ev.lockstep = counted
    out = {"metrics": ev.evaluate(spec["data"], spec["backbone"], spec["adapter"], ctx, batch_size=50),
           "passes": passes}

    def refuse(*args, **kwargs):
        raise AssertionError("a saved member was trained again")

    ft_finetune, ft.finetune = ft.finetune, refuse
    out["summary"] = ft_finetune(spec["data"], spec["backbone"], "full_per_domain", load_config(None, []).finetune,
                                 0, spec["adapter"], ctx, show_progress=False)
    (Path(spec["out"]) / f"rank{ctx.rank}.json").write_text(json.dumps(out))
    ctx.barrier()
    close_distributed(ctx)
    exit_launched_rank(0)


if __name__ == "__main__":
    two_rank_worker(sys.argv[1])
