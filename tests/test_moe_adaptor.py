"""`moe_adaptor` (UniSRec's MoE adaptor, gated per domain): its arithmetic, the phase, bad settings.

The contract every strategy keeps (starts at the pre-trained model, frozen backbone, unknown domains,
save / reload) is in tests/test_strategies.py.
"""

from dataclasses import replace

import pytest
import torch


def test_adapted_item_is_the_domains_gated_mixture_of_whitened_experts():
    """Against the formula written out row by row: x + sum_e softmax(x G_d + c_d)_e (x - b_e) W_e;
    a row of an unknown domain keeps x; other features pass unchanged."""
    from iak_dist.model.strategies.moe_adaptor import MoeAdaptor, MoeAdaptorConfig

    torch.manual_seed(0)
    adapter = MoeAdaptor(3, [24, 8], MoeAdaptorConfig(experts=2), embedding_dim=4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x, other = torch.randn(5, 4), torch.randn(5, 4)
    domain = torch.tensor([0, 2, -1, 1, 2])
    out = adapter.adapt_lookups({"item_id": x, "user_id": other}, domain)
    assert out["user_id"] is other
    for b in range(5):
        d = int(domain[b])
        if d < 0:
            assert torch.equal(out["item_id"][b], x[b])
            continue
        gate = torch.softmax(x[b] @ adapter.gate.weight[d] + adapter.gate.bias[d], dim=0)
        want = x[b] + sum(gate[e] * (x[b] - adapter.whitening_bias[e]) @ adapter.whitening[e] for e in range(2))
        torch.testing.assert_close(out["item_id"][b], want, rtol=1e-5, atol=1e-6)


def test_the_phase_trains_it_through_the_lookups_in_the_overlapped_pipeline(small_cfg, synth_dir, backbone_dir, ctx,
                                                                           tmp_path):
    """It changes the backbone's input, so it trains without the prefix cache, through TorchRec's train
    pipeline (fx-traced); its saved folder reloads with the embedding width it was built with."""
    from iak_dist.distributed.checkpoint import read_backbone_meta
    from iak_dist.model.strategies.saving import load_adapter
    from iak_dist.phases.finetune import finetune

    backbone = tmp_path / "seed0" / "backbone"
    import shutil

    shutil.copytree(backbone_dir, backbone)
    summary = finetune(synth_dir, backbone, "moe_adaptor", small_cfg.finetune, 0, tmp_path / "moe", ctx,
                       show_progress=False, dist_cfg=small_cfg.distributed)
    assert summary["train/pipelined_modules"] >= 1
    assert not (backbone.parent / "prefix_cache").exists()
    adapter, _, config = load_adapter(tmp_path / "moe", read_backbone_meta(backbone))
    assert config["embedding_dim"] == small_cfg.model.embedding_dim == adapter.whitening.shape[1]
    assert adapter.whitening.abs().sum() > 0  # the experts moved from zero


def test_it_trains_under_zero_stage_3(small_cfg, synth_dir, backbone_dir, ctx, tmp_path):
    """ZeRO-3 partitions the adaptor's own parameters and gathers them only when its forward runs."""
    import shutil

    from iak_dist.phases.finetune import finetune

    backbone = tmp_path / "seed0" / "backbone"
    shutil.copytree(backbone_dir, backbone)
    dist_cfg = replace(small_cfg.distributed, zero=replace(small_cfg.distributed.zero, stage=3))
    summary = finetune(synth_dir, backbone, "moe_adaptor", small_cfg.finetune, 0, tmp_path / "moe", ctx,
                       show_progress=False, dist_cfg=dist_cfg)
    assert summary["train/steps"] == small_cfg.finetune.optim.steps and summary["train/loss_ema"] > 0


def test_bad_settings_are_one_line_errors(small_cfg, synth_dir, backbone_dir, ctx):
    from iak_dist.config import load_config
    from iak_dist.errors import UserError
    from iak_dist.phases.finetune import build_finetune, uses_prefix_cache

    with pytest.raises(UserError, match=r"finetune\.moe_adaptor\.features: 'genre' is not a single-lookup sparse "
                                        r"feature of the schema \(those are: user_id, item_id, tags"):
        build_finetune(synth_dir, backbone_dir, "moe_adaptor", load_config(None, [
            *[f"{k}={v}" for k, v in (("model.tower", "[32, 16]"), ("model.embedding_dim", 8))],
            "finetune.moe_adaptor.features=[genre]"]).finetune, ctx)
    with pytest.raises(UserError, match=r"^finetune\.prefix_cache: on, but strategy 'moe_adaptor' adapts the "
                                        r"embeddings \(its prefix changes every step\)"):
        uses_prefix_cache("moe_adaptor", "on")
    assert not uses_prefix_cache("moe_adaptor", "auto")
    with pytest.raises(UserError, match=r"finetune\.moe_adaptor\.experts: must be >= 1, got 0"):
        load_config(None, ["finetune.moe_adaptor.experts=0"])
    assert replace(small_cfg.finetune).settings["moe_adaptor"].features == ["item_id"]
