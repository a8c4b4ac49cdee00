"""Fine-tuning from the frozen backbone's prefix cache: exactly the lookups' training, rebuilt when stale.

Also run as a torchrun worker (`python -m torch.distributed.run ... tests/test_prefix_cache.py SPEC.json`):
each rank builds its share of the cache, as the fine-tune phase does on two ranks.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

STRATEGIES = ["iak", "lora"]


@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory, small_cfg):
    """The session's synthetic data in row groups of 128 rows: a cache of several files, shared by two ranks."""
    from iak_dist.data.prepare import prepare

    out = tmp_path_factory.mktemp("grouped")
    prepare(replace(small_cfg.data, row_group_size=128), out)
    return out


def own_backbone(backbone_dir: Path, tmp_path: Path) -> Path:
    """A copy of the session's backbone: the cache is written beside it (`<seed dir>/prefix_cache`)."""
    copy = tmp_path / "seed0" / "backbone"
    shutil.copytree(backbone_dir, copy)
    return copy


def finetune_weights(strategy, setting, cfg, grouped_dir, backbone, ctx, out, capsys=None):
    """The adapter weights fine-tuned with `finetune.prefix_cache: setting`, and the log lines."""
    from safetensors.torch import load_file

    from iak_dist.phases.finetune import finetune

    ft = replace(cfg.finetune, prefix_cache=setting)
    out = out / strategy  # each run its own checkpoint folder (`out.parent / .checkpoints`)
    summary = finetune(grouped_dir, backbone, strategy, ft, 0, out, ctx, show_progress=False)
    lines = capsys.readouterr().err if capsys is not None else ""
    return load_file(str(out / "adapter_model.safetensors")), summary, lines


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_finetuning_from_the_cache_is_bitwise_the_lookups_training(strategy, small_cfg, grouped_dir, backbone_dir,
                                                                   ctx, tmp_path, capsys):
    import torch

    backbone = own_backbone(backbone_dir, tmp_path)
    through_lookups, plain, _ = finetune_weights(strategy, "off", small_cfg, grouped_dir, backbone, ctx,
                                                 tmp_path / "off")
    assert not (backbone.parent / "prefix_cache").exists()
    capsys.readouterr()
    from_cache, cached, lines = finetune_weights(strategy, "auto", small_cfg, grouped_dir, backbone, ctx,
                                                 tmp_path / "auto", capsys)
    assert "[finetune] prefix cache: built" in lines
    assert plain["train/losses"] == cached["train/losses"]
    assert through_lookups.keys() == from_cache.keys()
    for name, value in through_lookups.items():
        assert torch.equal(value, from_cache[name]), name
    _, _, again = finetune_weights(strategy, "on", small_cfg, grouped_dir, backbone, ctx, tmp_path / "on", capsys)
    assert "[finetune] prefix cache: reused" in again


def test_validation_passes_read_a_cache_of_the_valid_split_and_measure_what_the_lookups_do(
        small_cfg, grouped_dir, backbone_dir, ctx, tmp_path, capsys):
    """A frozen backbone's validation passes score the valid split from its own prefix cache: the same
    losses as through the lookups (to the last bits a GEMM's row count may move), the same best pass."""
    backbone = own_backbone(backbone_dir, tmp_path)
    cfg = replace(small_cfg, finetune=replace(small_cfg.finetune, optim=replace(
        small_cfg.finetune.optim, validate_every=0.25)))
    _, plain, _ = finetune_weights("iak", "off", cfg, grouped_dir, backbone, ctx, tmp_path / "off")
    capsys.readouterr()
    _, cached, lines = finetune_weights("iak", "auto", cfg, grouped_dir, backbone, ctx, tmp_path / "auto", capsys)
    assert f"prefix cache: built {backbone.parent / 'prefix_cache' / 'valid'}" in lines
    assert len(plain["valid/passes"]) == len(cached["valid/passes"]) >= 3
    for (step, value), (cached_step, cached_value) in zip(plain["valid/passes"], cached["valid/passes"], strict=True):
        assert step == cached_step and cached_value == pytest.approx(value, rel=1e-6, abs=0)
    assert plain["valid/best_step"] == cached["valid/best_step"]


def test_cache_rows_are_the_backbones_prefix_and_the_streams_draw_the_same_rows(small_cfg, grouped_dir, backbone_dir,
                                                                                 ctx, tmp_path, monkeypatch):
    """What a cached row holds is the interaction output of that row's lookups; `DomainStreams` over the
    cache serves the same rows (labels, users, domains) in the same order as over the files, with at
    most `OPEN_FILES` files mapped."""
    import numpy as np
    import torch

    from iak_dist.data import prefix_cache
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.domain_streams import DomainStreams, count_share
    from iak_dist.phases.finetune import build_finetune, open_prefix_cache

    backbone = own_backbone(backbone_dir, tmp_path)
    run = build_finetune(grouped_dir, backbone, "iak", small_cfg.finetune, ctx)
    cache = open_prefix_cache(run, backbone.parent / "prefix_cache", ctx)
    monkeypatch.setattr(prefix_cache, "OPEN_FILES", 2)  # fewer than the 5 files: mappings are closed as it goes
    share = count_share(run.split, run.schema, 0, 1, 0)
    files, cached = (DomainStreams(source, run.schema, share, 128, 0.5, 0, buffer_rows=500)
                     for source in (run.split, cache))
    bb = run.sharded.ranker.backbone
    for _ in range(12):  # past the first buffers of every domain
        rows, prefix = arrow_to_batch(files.next_batch(), run.schema), cache.to_batch(cached.next_batch())
        for name in ("click", "conversion", "domain", "user"):
            assert torch.equal(getattr(rows, name), getattr(prefix, name)), name
        with torch.no_grad():
            assert torch.equal(bb.prefix(bb.embed(rows.sparse), rows.dense), prefix.prefix)
        assert len(cache._open) <= 2
    assert np.all(prefix.domain.numpy() >= 0)


def test_a_changed_key_or_a_truncated_shard_is_rebuilt_never_reused(small_cfg, grouped_dir, backbone_dir, ctx,
                                                                    tmp_path, capsys):
    from iak_dist.data.prefix_cache import MARKER
    from iak_dist.phases.finetune import build_finetune, open_prefix_cache

    backbone = own_backbone(backbone_dir, tmp_path)
    root = backbone.parent / "prefix_cache"
    run = build_finetune(grouped_dir, backbone, "lora", small_cfg.finetune, ctx)
    first = open_prefix_cache(run, root, ctx)
    capsys.readouterr()

    # a cache of the layout before `<split>/` (`prefix_cache/<key>/`) is removed, not left behind
    old_layout = root / "0123456789abcdef"
    (old_layout / "part-000000.rec").parent.mkdir(parents=True)
    (old_layout / "part-000000.rec").write_bytes(b"x")
    assert open_prefix_cache(run, root, ctx).folder == first.folder and not old_layout.exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["finetune"]

    # truncated shard (a write cut short): detected by its size, rebuilt
    shard = sorted(first.folder.glob("part-*.rec"))[1]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    again = open_prefix_cache(run, root, ctx)
    err = capsys.readouterr().err
    assert "prefix cache: built" in err and f"{shard.name} has {len(whole) // 2} bytes" in err
    assert shard.read_bytes() == whole and again.folder == first.folder

    # another backbone (its weights hash): another key; the old folder is not reused (and is removed)
    run.meta = {**run.meta, "weights": "0" * 16}
    other = open_prefix_cache(run, root, ctx)
    assert other.folder != first.folder and not first.folder.exists()
    assert "prefix cache: built" in capsys.readouterr().err

    # the data rewritten in place at the same size (same fingerprint): its modification time gives another key
    import os

    from iak_dist.data.prefix_cache import cache_key

    data_file = run.split.parts[0].path
    before = cache_key(run.meta, run.split, run.schema)
    stat = os.stat(data_file)
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert cache_key(run.meta, run.split, run.schema) != before
    finally:
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # a marker of another key in the folder of this one (copied over, edited): rebuilt
    marker = other.folder / MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "key": "f" * 16}))
    open_prefix_cache(run, root, ctx)
    err = capsys.readouterr().err
    assert "prefix cache: built" in err and f"is for key {'f' * 16}" in err
    assert json.loads(marker.read_text())["key"] == meta["key"]

    # the same size, other bytes: refused when read, naming the file
    from iak_dist.errors import UserError

    shard = other.folder / "part-000000.rec"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    damaged = open_prefix_cache(run, root, ctx)
    assert "prefix cache: reused" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"part-000000.rec: hash differs from cache.json"):
        damaged.read(run.split.parts[0])


def test_prefix_cache_on_for_a_strategy_that_trains_the_backbone_is_refused(small_cfg, grouped_dir, backbone_dir,
                                                                             ctx, tmp_path):
    from iak_dist.errors import UserError
    from iak_dist.phases.finetune import finetune

    for strategy in ("full", "full_per_domain"):
        with pytest.raises(UserError, match=rf"^finetune.prefix_cache: on, but strategy '{strategy}' trains the "):
            finetune(grouped_dir, backbone_dir, strategy, replace(small_cfg.finetune, prefix_cache="on"), 0,
                     tmp_path / strategy, ctx, show_progress=False)


def test_prefix_cache_on_and_off_read_from_yaml_as_booleans_mean_on_and_off(tmp_path):
    from iak_dist.config import load_config

    (tmp_path / "c.yaml").write_text("finetune:\n  prefix_cache: off\n")
    assert load_config(str(tmp_path / "c.yaml")).finetune.prefix_cache == "off"
    assert load_config(None, ["finetune.prefix_cache=on"]).finetune.prefix_cache == "on"
    assert load_config(None, []).finetune.prefix_cache == "auto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cache_built_on_two_ranks_is_read_on_one(small_cfg, grouped_dir, backbone_dir, ctx, tmp_path, capsys):
    """Two gloo ranks build the cache (each its row groups, lookups over sharded tables); one rank then
    reuses it and trains exactly as through the lookups."""
    import torch

    backbone = own_backbone(backbone_dir, tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(grouped_dir), "backbone": str(backbone), "loss": str(tmp_path / "loss")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prefix cache: built" in result.stderr
    marker = json.loads(next((backbone.parent / "prefix_cache").glob("finetune/*/cache.json")).read_text())
    assert len(marker["parts"]) > 2  # both ranks wrote row groups
    valid_parts = json.loads(next((backbone.parent / "prefix_cache").glob("valid/*/cache.json")).read_text())["parts"]
    assert len(valid_parts) % 2 == 1  # one rank has a row group more: the other pads in lockstep
    assert json.loads((tmp_path / "loss").read_text()) == pytest.approx(lookup_validation_loss(
        small_cfg, grouped_dir, backbone, ctx), rel=1e-6)
    capsys.readouterr()
    through_lookups, _, _ = finetune_weights("iak", "off", small_cfg, grouped_dir, backbone, ctx, tmp_path / "off")
    from_cache, _, lines = finetune_weights("iak", "auto", small_cfg, grouped_dir, backbone, ctx, tmp_path / "auto",
                                            capsys)
    assert "prefix cache: reused" in lines
    for name, value in through_lookups.items():
        assert torch.equal(value, from_cache[name]), name


def lookup_validation_loss(cfg, data_dir: Path, backbone: Path, ctx) -> float:
    """The valid split's loss through the lookups, in this process: the reference of a cached pass."""
    import functools

    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.source import Split
    from iak_dist.phases.evaluate import first_row
    from iak_dist.phases.finetune import build_finetune
    from iak_dist.phases.validation import VALID_BATCH, validation_loss

    run = build_finetune(data_dir, backbone, "iak", cfg.finetune, ctx)
    split = Split.open(data_dir, "valid", run.schema)
    return validation_loss(run.model, ParquetReader(split, run.schema, VALID_BATCH), ctx,
                           functools.partial(first_row, split, run.schema))


def build_on_every_rank(spec_path: str) -> None:
    """torchrun worker: build the prefix cache of the spec's data and backbone (table-wise over the ranks)."""
    from iak_dist.config import load_config
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.phases.finetune import build_finetune, open_prefix_cache
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed()
    try:
        cfg = load_config(None, ["model.tower=[32, 16]", "model.embedding_dim=8", "distributed.zero.stage=3"])
        run = build_finetune(spec["data"], spec["backbone"], "iak", cfg.finetune, ctx, cfg.distributed)
        root = Path(spec["backbone"]).parent / "prefix_cache"
        open_prefix_cache(run, root, ctx)
        # a validation pass from the valid split's cache, the adapter under ZeRO-3 (its forwards gather
        # parameters: collective, so the ranks' unequal shares of row groups run in lockstep)
        from iak_dist.distributed.zero import DenseEngine
        from iak_dist.model.ranker import PrefixRanker
        from iak_dist.phases.finetune import cached_validation
        from iak_dist.phases.validation import loss_over

        DenseEngine(run.trainable, 1e-3, 0.0, cfg.distributed.zero, 64, ctx.world_size)
        model = PrefixRanker(run.sharded.ranker.backbone, run.adapter)
        loss = loss_over(cached_validation(run, spec["data"], root, model, ctx), ctx)
        if ctx.is_main:
            Path(spec["loss"]).write_text(json.dumps(loss))
    finally:
        close_distributed(ctx)
    exit_launched_rank(0)


if __name__ == "__main__":
    build_on_every_rank(sys.argv[1])


def test_a_second_phase_waits_for_the_first_ones_build(tmp_path):
    """Two phases of one seed deciding at once: the second takes the building lock once the first let go."""
    import threading
    import time

    from iak_dist.data.prefix_cache import building_lock

    events: list[str] = []

    def second() -> None:
        with building_lock(tmp_path, holder=True):
            events.append("second")

    with building_lock(tmp_path, holder=True):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        events.append("first done")
    waiting.join(timeout=10)
    assert events == ["first done", "second"]
