"""TorchRec's sparse-dist train pipeline (input dist overlapped with compute) changes no number."""

import json

import pytest
import torch
from safetensors.torch import load_file

from iak_dist.distributed.checkpoint import load_backbone_weights, read_backbone_meta
from iak_dist.model.strategies.saving import load_adapter


def run(kind, overlap, small_cfg, synth_dir, backbone_dir, ctx, out):
    from dataclasses import replace

    from iak_dist.phases.finetune import finetune
    from iak_dist.phases.pretrain import pretrain

    dist_cfg = replace(small_cfg.distributed, overlap_input_dist=overlap)
    if kind == "pretrain":
        summary = pretrain(synth_dir, small_cfg.model, small_cfg.pretrain, dist_cfg, 0, out, ctx, show_progress=False)
        assert summary["train/pipelined_modules"] == (1.0 if overlap else 0.0)
        return summary["train/losses"], load_backbone_weights(out / "backbone")
    # the lookups' input pipeline is what is compared (tests/test_prefix_cache.py covers the prefix cache)
    ft = replace(small_cfg.finetune, prefix_cache="off")
    summary = finetune(synth_dir, backbone_dir, kind, ft, 0, out / kind, ctx, show_progress=False, dist_cfg=dist_cfg)
    assert summary["train/pipelined_modules"] == (1.0 if overlap else 0.0)
    weights = load_file(str(out / kind / "adapter_model.safetensors"))
    _, backbone, _ = load_adapter(out / kind, read_backbone_meta(backbone_dir))  # `full` carries its backbone
    if backbone is not None:
        weights |= {f"backbone.{k}": backbone.full(k) for k in backbone.tensors}
    return summary["train/losses"], weights


@pytest.mark.parametrize("kind", ["pretrain", "iak", "lora", "full", "iak-grouped-gemm"])
def test_overlapped_input_dist_trains_exactly_like_the_plain_loop(kind, small_cfg, synth_dir, backbone_dir, ctx,
                                                                  tmp_path, monkeypatch):
    if kind.endswith("-grouped-gemm"):  # the pipeline fx-traces the model: the grouped path must trace too
        from iak_dist.model.strategies.base import DomainLinear

        monkeypatch.setattr(DomainLinear, "gemm_limit", 0)
        kind = kind.removesuffix("-grouped-gemm")
    plain_losses, plain_state = run(kind, False, small_cfg, synth_dir, backbone_dir, ctx, tmp_path / "plain")
    piped_losses, piped_state = run(kind, True, small_cfg, synth_dir, backbone_dir, ctx, tmp_path / "piped")
    assert piped_losses == plain_losses
    assert plain_state.keys() == piped_state.keys()
    for key in plain_state:
        assert torch.equal(plain_state[key], piped_state[key]), key
    assert json.dumps(piped_losses)  # losses were recorded for every step
    assert len(piped_losses) == (small_cfg.pretrain.steps if kind == "pretrain" else small_cfg.finetune.optim.steps)
