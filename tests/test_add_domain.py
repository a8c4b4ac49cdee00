"""`--add-domain`: an IAK adapter of K domains grows to K+1; only the new domain's kernel trains."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from iak_dist.cli import main
from iak_dist.config import to_dict
from iak_dist.data.batch import arrow_to_batch
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import read_backbone_meta
from iak_dist.errors import UserError
from iak_dist.model.strategies.base import DomainRows
from iak_dist.model.strategies.iak import IakAdapter, IakConfig, domain_beta_scale
from iak_dist.model.strategies.saving import load_adapter
from iak_dist.phases.add_domain import add_domain
from iak_dist.phases.finetune import build_finetune, finetune


def first_domains(synth_dir, out, count: int):
    """The synthetic data as if only its first `count` domains existed (schema and rows)."""
    shutil.copytree(synth_dir, out)
    schema = Schema.load(out / "schema.yaml")
    kept = pa.array(schema.domains[:count])
    dataclasses.replace(schema, domains=schema.domains[:count]).save(out / "schema.yaml")
    for path in out.glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.is_in(table.column("domain"), kept)), path)
    return out


@pytest.fixture(scope="module")
def cfg(small_cfg):
    """IAK with a shared encoder layer: the grown adapter must freeze it, not only mask stacked rows."""
    cfg = copy.deepcopy(small_cfg.finetune)
    cfg.settings["iak"] = dataclasses.replace(cfg.settings["iak"], encoder="mlp_shared", encoder_hidden=8,
                                             insertion="input+every_layer")
    return cfg


@pytest.fixture(scope="module")
def grown(tmp_path_factory, synth_dir, backbone_dir, cfg, ctx):
    """An IAK adapter fine-tuned on the first two domains, and that adapter grown by the third."""
    root = tmp_path_factory.mktemp("add_domain")
    two = first_domains(synth_dir, root / "two", 2)
    finetune(two, backbone_dir, "iak", cfg, 0, root / "iak2", ctx, show_progress=False)
    third = Schema.load(synth_dir / "schema.yaml").domains[2]
    from iak_dist.config import DistributedConfig

    add_domain(synth_dir, backbone_dir, "iak", cfg, 1, root / "iak2", third, root / "iak3", ctx, show_progress=False,
               dist_cfg=DistributedConfig(checkpoint_every=5))
    return two, root / "iak2", root / "iak3"


def states(backbone_dir, *adapter_dirs):
    meta = read_backbone_meta(backbone_dir)
    return [load_adapter(path, meta)[0].state_dict() for path in adapter_dirs]


def test_trained_domains_stay_bitwise_and_only_the_new_kernel_trains(grown, backbone_dir, synth_dir):
    _, before_dir, after_dir = grown
    before, after = states(backbone_dir, before_dir, after_dir)
    shared = {name for name in after if ".encoder_shared." in name}
    assert {"kernels.input.encoder_shared.weight", "kernels.0.encoder_shared.bias"} <= shared
    for name, old in before.items():
        new = after[name]
        if name in shared:
            assert torch.equal(new, old), name
        else:
            assert new.shape == (3, *old.shape[1:]) and torch.equal(new[:2], old), name
    # the new kernel trained: its decoders (zero at start) moved
    assert all(after[name][2].abs().sum() > 0 for name in after if name.endswith("decoder.weight"))
    # its checkpoints are its own output's (two grown by one domain with other settings may share a parent)
    assert (after_dir.parent / ".checkpoints" / f"grown.{after_dir.name}").is_dir()

    config = json.loads((after_dir / "adapter_config.json").read_text())
    old_config = json.loads((before_dir / "adapter_config.json").read_text())
    domains = Schema.load(synth_dir / "schema.yaml").domains
    assert config["domains"] == domains and old_config["domains"] == domains[:2]
    assert config["rows_per_domain"][:2] == old_config["rows_per_domain"] and config["rows_per_domain"][2] > 0
    assert config["grown_from"] == {"adapter": str(before_dir), "adapter_weights": old_config["adapter_weights"],
                                    "domains": domains[:2], "added": domains[2]}
    assert config["strategy_config"] == old_config["strategy_config"]


def test_the_grown_adapter_starts_as_the_trained_one_and_the_backbone(grown, synth_dir, backbone_dir, cfg, ctx):
    """Before training, the grown model scores every row as the K-domain adapter does: its domains with
    their trained kernels, the new domain's rows (unknown to it) with the plain backbone."""
    two, before_dir, _ = grown
    (before,) = states(backbone_dir, before_dir)
    rows = json.loads((before_dir / "adapter_config.json").read_text())["rows_per_domain"]
    torch.manual_seed(0)
    run_three = build_finetune(synth_dir, backbone_dir, "iak", cfg, ctx)
    run_three.adapter.grow_domains(before, 2, np.asarray(rows))
    run_two = build_finetune(two, backbone_dir, "iak", cfg, ctx)
    run_two.adapter.load_state_dict(before)
    batch = arrow_to_batch(run_three.table.slice(0, 512), run_three.schema)
    assert (batch.domain == 2).any() and (batch.domain < 2).any()
    with torch.no_grad():
        grown_scores = run_three.model.eval()(batch).p_ctr
        trained_scores = run_two.model.eval()(arrow_to_batch(run_three.table.slice(0, 512), run_two.schema)).p_ctr
    torch.testing.assert_close(grown_scores, trained_scores)
    # the new domain's beta_d is the one of fine-tuning all three together, though only its rows are counted
    counts = np.bincount(run_three.domains, minlength=3)
    run_three.adapter.set_domain_sizes(np.array([0, 0, counts[2]]))
    assert rows == counts[:2].tolist()
    torch.testing.assert_close(run_three.adapter.beta_scale, domain_beta_scale(counts, cfg.iak.beta_size_gamma))


def test_growing_masks_the_trained_rows_gradient_and_freezes_shared_layers():
    """Rows of the trained domains in a batch (never read by `--add-domain`, but possible) leave them untouched."""
    torch.manual_seed(0)
    section = IakConfig(encoder="mlp_shared", encoder_hidden=8, insertion="input")
    trained = IakAdapter(2, [16, 8], section).state_dict()
    adapter = IakAdapter(3, [16, 8], section)
    adapter.grow_domains(trained, 2)
    x = torch.randn(12, 16)
    rows = DomainRows.of(torch.tensor([0, 1, 2] * 4), 3)
    adapter.kernels["input"].decoder.weight.data.normal_()  # a trained-looking decoder: gradients reach everything
    first = torch.nn.Linear(16, 8)
    out, kl = adapter.adapt_preactivation(0, x, first(x), rows, first)
    (out.square().sum() + kl).backward()
    for name, param in adapter.named_parameters():
        if ".encoder_shared." in name:
            assert not param.requires_grad and param.grad is None and torch.equal(param, trained[name]), name
        else:
            assert param.grad[:2].abs().sum() == 0 and param.grad[2].abs().sum() > 0, name
            if not name.endswith("decoder.weight"):
                assert torch.equal(param[:2], trained[name]), name


def test_bad_additions_are_one_line_errors(grown, synth_dir, backbone_dir, cfg, ctx, tmp_path):
    two, before_dir, _ = grown
    domains = Schema.load(synth_dir / "schema.yaml").domains

    def refused(data=synth_dir, strategy="iak", source=before_dir, domain=domains[2], out=tmp_path / "out",
                finetune_cfg=cfg):
        with pytest.raises(UserError) as info:
            add_domain(data, backbone_dir, strategy, finetune_cfg, 0, source, domain, out, ctx, show_progress=False)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused(domain=domains[1]) == (f"--add-domain {domains[1]}: the adapter in {before_dir} already has "
                                          f"this domain (it knows {', '.join(domains[:2])})")
    assert refused(strategy="head").startswith("--strategy head: --add-domain needs per-domain kernels")
    assert refused(out=before_dir) == f"--from {before_dir}: the grown adapter would overwrite it; write it elsewhere"
    assert refused(data=two) == (f"{two / 'schema.yaml'}: domains {domains[:2]} must be the adapter's "
                                 f"{domains[:2]} followed by {domains[2]!r}")
    decaying = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay=0.01))
    assert refused(finetune_cfg=decaying).startswith("finetune.optim.weight_decay: must be 0 with --add-domain")
    other = tmp_path / "other_backbone"
    shutil.copytree(before_dir, other)
    config = json.loads((other / "adapter_config.json").read_text())
    identity = read_backbone_meta(backbone_dir)["identity"]
    (other / "adapter_config.json").write_text(json.dumps({**config, "backbone_identity": "0" * 16}))
    assert refused(source=other) == (f"{other}: adapter was trained on backbone identity {'0' * 16}, this backbone "
                                     f"has {identity}; load it onto the backbone it was fine-tuned from")
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_cli_add_domain_flags(grown, synth_dir, backbone_dir, tmp_path, capsys):
    _, before_dir, _ = grown
    (tmp_path / "run" / "seed0").mkdir(parents=True)
    (tmp_path / "run" / "seed0" / "backbone").symlink_to(backbone_dir)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seeds": [0],
                                      "data": {"source": "parquet", "dir": str(synth_dir)},
                                      "model": {"embedding_dim": 8, "tower": [32, 16]}}))
    first = Schema.load(synth_dir / "schema.yaml").domains[0]
    base = ["finetune", str(config), "--strategy", "iak"]
    assert main([*base, "--from", str(before_dir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("error: --add-domain NAME and --from ADAPTER_DIR go "
                                                        "together (--out only with them)")
    assert main([*base, "--add-domain", first, "--from", str(before_dir)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: --add-domain {first}: the adapter in")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_grow_the_adapter_alike(grown, synth_dir, backbone_dir, cfg, tmp_path):
    """On 2 ranks (gloo, DeepSpeed's gradient all-reduce) the trained domains stay bitwise too, and rank 0
    completes the config once both ranks have saved."""
    _, before_dir, one_rank_dir = grown
    config_file, spec = tmp_path / "c.yaml", tmp_path / "spec.json"
    config_file.write_text(yaml.safe_dump({"finetune": to_dict(cfg)}))
    spec.write_text(json.dumps({"data": str(synth_dir), "backbone": str(backbone_dir), "from": str(before_dir),
                                "out": str(tmp_path / "grown"), "config": str(config_file)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    before, after = states(backbone_dir, before_dir, tmp_path / "grown")
    for name, old in before.items():
        kept = after[name] if ".encoder_shared." in name else after[name][:2]
        assert torch.equal(kept, old), name
    assert all(after[name][2].abs().sum() > 0 for name in after if name.endswith("decoder.weight"))
    config, one_rank = (json.loads((path / "adapter_config.json").read_text())
                        for path in (tmp_path / "grown", one_rank_dir))
    assert config["rows_per_domain"] == one_rank["rows_per_domain"] and config["grown_from"] == one_rank["grown_from"]


def two_rank_worker(spec_path: str) -> None:
    """One rank of `test_two_ranks_grow_the_adapter_alike` (started by torchrun)."""
    from iak_dist.config import load_config
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed()
    domain = Schema.load(Path(spec["data"]) / "schema.yaml").domains[2]
    add_domain(spec["data"], spec["backbone"], "iak", load_config(spec["config"]).finetune, 1, spec["from"],
               domain, spec["out"], ctx, show_progress=False)
    close_distributed(ctx)
    exit_launched_rank(0)


if __name__ == "__main__":
    two_rank_worker(sys.argv[1])
