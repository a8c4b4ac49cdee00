"""One contract over every strategy: zero-init parity, frozen backbone, domain activation, save/load."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from iak_dist.config import ZeroConfig
from iak_dist.data.batch import arrow_to_batch
from iak_dist.data.sampler import DomainBatchSampler
from iak_dist.distributed.checkpoint import load_backbone_weights, plain_state_dict
from iak_dist.distributed.sharding import local_module
from iak_dist.distributed.zero import DenseEngine
from iak_dist.model.strategies.base import DomainLinear
from iak_dist.model.strategies.saving import load_adapter, save_adapter, save_backbone_state
from iak_dist.phases.common import build_from_backbone
from iak_dist.phases.finetune import build_finetune, sampled_batches
from iak_dist.phases.loop import train_loop

STRATEGIES = ["none", "full", "head", "lora", "patch", "iak", "moe_adaptor"]
# IAK options, each tested to start at the pre-trained model and keep the backbone frozen
IAK_VARIANTS = {
    "iak:input": {"insertion": "input"},
    "iak:every-option": {"insertion": "input+every_layer", "encoder": "mlp", "logvar_init": -3.0, "init_std": 0.1,
                         "beta_size_gamma": 1.0, "decoder_in_compression": True},
    "iak:shared-encoder": {"encoder": "mlp_shared"},
}


def build_variant(name, small_cfg, synth_dir, backbone_dir, ctx):
    """`build_finetune` for a strategy, or for an IAK variant of `IAK_VARIANTS` (as finetune would:
    told the domain sizes)."""
    cfg = small_cfg.finetune
    if name in IAK_VARIANTS:
        cfg = copy.deepcopy(cfg)
        cfg.settings["iak"] = dataclasses.replace(cfg.settings["iak"], **IAK_VARIANTS[name])
    run = build_finetune(synth_dir, backbone_dir, name.split(":")[0], cfg, ctx)
    run.adapter.set_domain_sizes(np.bincount(run.domains, minlength=len(run.schema.domains)))
    return run


def scores(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch)
    return out.p_ctr, out.p_ctcvr


def first_rows(run, n=300):
    return arrow_to_batch(run.table.slice(0, n), run.schema)


def train_some(run, cfg, steps=30):
    sampler = DomainBatchSampler(run.domains, len(run.schema.domains), 128, 0.5, seed=0)
    if run.trainable:
        dense = DenseEngine(run.trainable, 0.01, 0.0, ZeroConfig(), 128, 1)
        train_loop(run.model, dense, sampled_batches(run.table, run.schema, sampler), steps,
                   cfg.finetune.optim, "test", adapter=run.adapter, num_domains=len(run.schema.domains),
                   show_progress=False)


@pytest.mark.parametrize("strategy", STRATEGIES + list(IAK_VARIANTS))
def test_attached_adapter_starts_exactly_at_the_pretrained_model(strategy, small_cfg, synth_dir, backbone_dir, ctx):
    run = build_variant(strategy, small_cfg, synth_dir, backbone_dir, ctx)
    plain = build_from_backbone(backbone_dir, None, ctx, train_embeddings=False)[0].model
    batch = first_rows(run)
    for got, want in zip(scores(run.model, batch), scores(plain, batch), strict=True):
        if strategy == "head":  # copied heads run through another kernel: equal up to float rounding
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        else:  # zero-initialised up-projections add exact zeros: bitwise equal
            assert torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["head", "lora", "patch", "iak", "moe_adaptor", *IAK_VARIANTS])
def test_frozen_backbone_is_bitwise_unchanged_and_adapter_trains(strategy, small_cfg, synth_dir, backbone_dir, ctx):
    torch.manual_seed(0)
    run = build_variant(strategy, small_cfg, synth_dir, backbone_dir, ctx)
    adapter_before = {k: v.clone() for k, v in run.adapter.state_dict().items()}
    train_some(run, small_cfg)
    after = plain_state_dict(run.model, prefix="backbone.")
    original = load_backbone_weights(backbone_dir)
    assert after.keys() == original.keys()
    for key in original:
        assert torch.equal(after[key], original[key]), key
    changed = [k for k, v in run.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert changed, "the adapter did not train"
    if strategy in IAK_VARIANTS:  # every kernel trained, the input kernel's decoder included
        assert "kernels.input.decoder.weight" in changed
        assert {k.split(".")[1] for k in changed} == set(run.adapter.kernels)


def test_full_finetune_changes_embeddings_and_tower(small_cfg, synth_dir, backbone_dir, ctx):
    run = build_finetune(synth_dir, backbone_dir, "full", small_cfg.finetune, ctx)
    train_some(run, small_cfg, steps=10)
    after = plain_state_dict(run.model, prefix="backbone.")
    original = load_backbone_weights(backbone_dir)
    assert not torch.equal(after["tower.0.weight"], original["tower.0.weight"])
    assert not torch.equal(after["embeddings.embedding_bags.t_user_id.weight"],
                           original["embeddings.embedding_bags.t_user_id.weight"])


@pytest.mark.parametrize("gemm_limit", [DomainLinear.gemm_limit, 0], ids=["default-paths", "grouped-gemm"])
@pytest.mark.parametrize("strategy", ["head", "lora", "patch", "iak", "moe_adaptor"])
def test_mixed_domain_batch_equals_each_domain_scored_alone(strategy, gemm_limit, small_cfg, synth_dir, backbone_dir,
                                                           ctx, monkeypatch):
    monkeypatch.setattr(DomainLinear, "gemm_limit", gemm_limit)
    torch.manual_seed(1)
    run = build_finetune(synth_dir, backbone_dir, strategy, small_cfg.finetune, ctx)
    train_some(run, small_cfg, steps=15)
    table = run.table.slice(0, 400)
    mixed = scores(run.model, arrow_to_batch(table, run.schema))
    domains = run.domains[:400]
    assert len(np.unique(domains)) >= 2
    for d in np.unique(domains):
        rows = np.flatnonzero(domains == d)
        alone = scores(run.model, arrow_to_batch(table.take(rows), run.schema))
        for got, want in zip(alone, mixed, strict=True):
            torch.testing.assert_close(got, want[torch.from_numpy(rows)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["lora", "patch", "iak", "head", "moe_adaptor"])
def test_unknown_domain_rows_fall_back_to_the_plain_backbone(strategy, small_cfg, synth_dir, backbone_dir, ctx):
    torch.manual_seed(2)
    run = build_finetune(synth_dir, backbone_dir, strategy, small_cfg.finetune, ctx)
    train_some(run, small_cfg, steps=15)
    batch = first_rows(run, 100)
    batch.domain = torch.full_like(batch.domain, -1)
    plain = build_from_backbone(backbone_dir, None, ctx, train_embeddings=False)[0].model
    for got, want in zip(scores(run.model, batch), scores(plain, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_adapter_reloads_with_identical_scores(strategy, small_cfg, synth_dir, backbone_dir, ctx, tmp_path):
    torch.manual_seed(3)
    run = build_finetune(synth_dir, backbone_dir, strategy, small_cfg.finetune, ctx)
    train_some(run, small_cfg, steps=15)
    batch = first_rows(run)
    want = scores(run.model, batch)
    state = save_backbone_state(run.model, tmp_path) if strategy == "full" else None
    save_adapter(tmp_path, run.adapter, run.schema.domains, run.meta, state)
    adapter, override, _ = load_adapter(tmp_path, run.meta)
    reloaded = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=False,
                                   backbone_override=override)[0].model
    for got, expected in zip(scores(reloaded, batch), want, strict=True):
        assert torch.equal(got, expected)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    if strategy != "full":
        backbone_bytes = sum(p.stat().st_size for p in backbone_dir.rglob("*.safetensors"))
        assert size < backbone_bytes / 5


def test_adapter_refuses_a_different_backbone(small_cfg, synth_dir, backbone_dir, ctx, tmp_path):
    from iak_dist.errors import UserError

    run = build_finetune(synth_dir, backbone_dir, "iak", small_cfg.finetune, ctx)
    save_adapter(tmp_path, run.adapter, run.schema.domains, run.meta)
    other = dict(run.meta, weights="0000000000000000")
    with pytest.raises(UserError, match="adapter was trained on backbone weights"):
        load_adapter(tmp_path, other)
    assert local_module(run.model).adapter is run.adapter


def test_losses_reach_the_host_only_at_log_points(small_cfg, synth_dir, backbone_dir, ctx, monkeypatch):
    """A host copy of the loss each step would stall a GPU; per-step losses are still all reported."""
    from dataclasses import replace

    run = build_finetune(synth_dir, backbone_dir, "lora", small_cfg.finetune, ctx)
    copies = []  # sizes of floating-point tensors copied to the host (index lists are TorchRec's)

    def counting(real):
        def host_copy(t):
            if t.is_floating_point():
                copies.append(t.numel())
            return real(t)
        return host_copy

    monkeypatch.setattr(torch.Tensor, "__float__", counting(torch.Tensor.__float__))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting(torch.Tensor.item))
    sampler = DomainBatchSampler(run.domains, len(run.schema.domains), 128, 0.5, seed=0)
    dense = DenseEngine(run.trainable, 0.01, 0.0, ZeroConfig(), 128, 1)
    summary = train_loop(run.model, dense, sampled_batches(run.table, run.schema, sampler), 12,
                         replace(small_cfg.finetune.optim, log_every=5), "test", adapter=run.adapter,
                         num_domains=len(run.schema.domains), show_progress=False)
    assert copies == [1, 5, 5, 1]  # log points at steps 0, 5, 10 and the last (11)
    losses = summary["train/losses"]
    assert len(losses) == 12 and all(isinstance(v, float) and v > 0 for v in losses)
    ema = losses[0]
    for v in losses[1:]:
        ema = 0.98 * ema + 0.02 * v
    assert summary["train/loss_ema"] == ema
