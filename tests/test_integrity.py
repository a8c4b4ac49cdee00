"""State integrity: exact fine-tune resume, weights verified on load, checkpoint fallback, file modes."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint (the checkpoint is complete, the run is gone)."""


def stop_at(step_to_stop):
    def on_checkpoint(step, path):
        if step == step_to_stop:
            raise Interrupted(step)
    return on_checkpoint


def test_iak_finetune_resumed_in_compression_and_matching_is_bitwise_equal(small_cfg, synth_dir, backbone_dir,
                                                                          ctx, tmp_path):
    """Item 3 (the IAK phase is re-applied on resume) and item 16 (the saved data position is the one of
    the last trained step even though the overlapped input pipeline reads batches ahead)."""
    from iak_dist.phases.finetune import finetune

    dist_cfg = replace(small_cfg.distributed, overlap_input_dist=True, checkpoint_every=5, keep_checkpoints=2)
    cfg = small_cfg.finetune  # 30 steps, compression for the first 9 (fraction 0.3)
    assert cfg.iak.compression_fraction * cfg.optim.steps == pytest.approx(9)

    def run(out, on_checkpoint=None):
        return finetune(synth_dir, backbone_dir, "iak", cfg, 0, out / "iak", ctx, show_progress=False,
                        dist_cfg=dist_cfg, on_checkpoint=on_checkpoint)

    reference = run(tmp_path / "ref")
    with pytest.raises(Interrupted):
        run(tmp_path / "run", stop_at(5))  # killed in compression
    with pytest.raises(Interrupted):
        run(tmp_path / "run", stop_at(15))  # resumed at 5, killed in matching
    resumed = run(tmp_path / "run")  # resumed at 15
    assert resumed["train/losses"] == reference["train/losses"][15:]
    want = load_file(str(tmp_path / "ref" / "iak" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "iak" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
