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
    # the frozen tables stay out of the checkpoints; the backbone's hash names them
    from iak_dist.distributed.checkpoint import FROZEN_TABLES, read_backbone_meta

    saved = sorted((tmp_path / "run" / ".checkpoints" / "iak").glob("step_*"))
    assert [p.name for p in saved] == ["step_00000010", "step_00000015"]
    for path in saved:
        assert not (path / "sparse").exists()
        assert (path / FROZEN_TABLES).read_text() == read_backbone_meta(backbone_dir)["weights"]
    resumed = run(tmp_path / "run")  # resumed at 15
    assert resumed["train/losses"] == reference["train/losses"][15:]
    want = load_file(str(tmp_path / "ref" / "iak" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "iak" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_an_adapter_checkpoint_of_another_backbones_tables_is_refused(small_cfg, synth_dir, backbone_dir, ctx,
                                                                      tmp_path):
    from iak_dist.distributed.checkpoint import FROZEN_TABLES
    from iak_dist.errors import UserError
    from iak_dist.phases.finetune import finetune

    dist_cfg = replace(small_cfg.distributed, checkpoint_every=5)
    cfg = replace(small_cfg.finetune, optim=replace(small_cfg.finetune.optim, steps=10))
    with pytest.raises(Interrupted):
        finetune(synth_dir, backbone_dir, "lora", cfg, 0, tmp_path / "lora", ctx, show_progress=False,
                 dist_cfg=dist_cfg, on_checkpoint=stop_at(5))
    checkpoint = tmp_path / ".checkpoints" / "lora" / "step_00000005"
    # resumed with a domain held out that the first 5 steps trained on: refused
    with pytest.raises(UserError, match=rf"^{checkpoint}: checkpoint of a fine-tune holding out \[\], the config "
                                        rf"holds out \['d1'\]; move .* aside to fine-tune again$"):
        finetune(synth_dir, backbone_dir, "lora", replace(cfg, hold_out_domains=["d1"]), 0, tmp_path / "lora", ctx,
                 show_progress=False, dist_cfg=dist_cfg)
    (checkpoint / FROZEN_TABLES).write_text("0" * 16)  # as if trained on another backbone's tables
    with pytest.raises(UserError, match=rf"^{checkpoint}: checkpoint of an adapter on the backbone with weights "
                                        rf"0{{16}}, this phase's backbone has \w+; move .* aside"):
        finetune(synth_dir, backbone_dir, "lora", cfg, 0, tmp_path / "lora", ctx, show_progress=False,
                 dist_cfg=dist_cfg)


@pytest.fixture
def other_backbone(backbone_dir, tmp_path):
    """A copy of the backbone whose `dense.safetensors` is another seed's: same shapes, other values."""
    import shutil

    from safetensors.torch import save_file

    other = tmp_path / "other_backbone"
    shutil.copytree(backbone_dir, other)
    tensors = load_file(str(other / "dense.safetensors"))
    tensors["tower.0.weight"] = tensors["tower.0.weight"] + 0.01
    save_file(tensors, str(other / "dense.safetensors"))
    return other


def test_backbone_weights_swapped_or_damaged_are_refused(other_backbone, backbone_dir, ctx):
    import json

    from iak_dist.distributed.checkpoint import file_hash, layout_hash, load_backbone_weights, verify_backbone
    from iak_dist.errors import UserError
    from iak_dist.phases.common import build_from_backbone

    weights = other_backbone / "dense.safetensors"
    with pytest.raises(UserError, match=rf"^{weights}: weights hash \w+ differs from \w+ recorded in backbone.json"):
        build_from_backbone(other_backbone, None, ctx, train_embeddings=False)
    with pytest.raises(UserError, match=rf"^{weights}: weights hash"):
        verify_backbone(other_backbone)  # what a copy (export) checks
    meta = verify_backbone(backbone_dir)
    assert meta["weights"] == layout_hash(meta["layout"])  # what adapters are stamped with
    assert all(file_hash(backbone_dir / name) == digest for name, digest in meta["layout"]["files"].items())
    weights.write_bytes((backbone_dir / "dense.safetensors").read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match=rf"^{weights}: weights hash .* \(the file was replaced or damaged\)"):
        load_backbone_weights(other_backbone)
    # a damaged file whose hash was recorded as it is: still one line, not a traceback
    meta = json.loads((other_backbone / "backbone.json").read_text())
    meta["layout"]["files"]["dense.safetensors"] = file_hash(weights)
    (other_backbone / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"^{weights}: not a readable safetensors file"):
        load_backbone_weights(other_backbone)
    assert torch.equal(load_backbone_weights(backbone_dir)["tower.0.weight"],
                       load_file(str(backbone_dir / "dense.safetensors"))["tower.0.weight"])


def test_adapter_weights_of_another_run_or_damaged_are_refused(small_cfg, backbone_dir, tmp_path):
    import json

    from iak_dist.distributed.checkpoint import read_backbone_meta
    from iak_dist.errors import UserError
    from iak_dist.model.backbone import tower_widths
    from iak_dist.model.strategies import build_adapter
    from iak_dist.model.strategies.saving import load_adapter, save_adapter, verify_adapter

    meta = read_backbone_meta(backbone_dir)
    domains = meta["schema_obj"].domains
    for seed in (0, 1):  # two seeds' adapters: the same shapes
        torch.manual_seed(seed)
        adapter = build_adapter("iak", len(domains), tower_widths(meta["schema_obj"], meta["model_obj"]),
                                small_cfg.finetune)
        save_adapter(tmp_path / f"seed{seed}", adapter, domains, meta)
    mine, theirs = tmp_path / "seed0", tmp_path / "seed1"
    load_adapter(mine, meta)  # loads as saved
    weights = mine / "adapter_model.safetensors"
    weights.write_bytes((theirs / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match=rf"^{weights}: weights hash .* recorded in adapter_config.json"):
        load_adapter(mine, meta)
    with pytest.raises(UserError, match=rf"^{weights}: weights hash"):
        verify_adapter(mine, meta)
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError, match=rf"^{weights}: weights hash"):
        load_adapter(mine, meta)
    config = json.loads((theirs / "adapter_config.json").read_text())
    del config["adapter_weights"]  # an adapter written before the hash was stamped
    (theirs / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"adapter_config.json: no adapter_weights .*fine-tune this strategy again"):
        load_adapter(theirs, meta)
    (theirs / "adapter_config.json").write_text('{"strategy": "ia')
    with pytest.raises(UserError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(theirs, meta)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_umask_mode_and_are_fsynced_before_the_rename(umask, mode, tmp_path, monkeypatch):
    import os
    import stat

    from safetensors.torch import save_file

    from iak_dist.io import atomic_path, atomic_write_json

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "out" / "report.json", {"a": 1})
        with atomic_path(tmp_path / "out" / "w.safetensors") as tmp:
            save_file({"x": torch.arange(3.0)}, str(tmp))
    finally:
        os.umask(old)
    for name in ("report.json", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == mode, name
    assert (tmp_path / "out" / "report.json").read_text() == '{\n  "a": 1\n}\n'
    assert torch.equal(load_file(str(tmp_path / "out" / "w.safetensors"))["x"], torch.arange(3.0))
    assert events == ["fsync file", "replace", "fsync dir"] * 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "w.safetensors"]  # no temp left
