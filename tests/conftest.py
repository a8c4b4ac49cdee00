"""Shared fixtures: one single-process group, a small synthetic data set and a pre-trained backbone."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def ctx():
    from iak_dist.distributed.context import close_distributed, init_distributed

    context = init_distributed()
    yield context
    close_distributed(context)


@pytest.fixture(scope="session")
def small_cfg():
    from iak_dist.config import load_config

    return load_config(None, [
        "data.source=synth", "data.synth_rows=6000", "data.synth_domains=3", "data.synth_domain_shift=1.5",
        # pretrain and test are the rows of the three-split fractions [0.7, 0.15, 0.15] (same draws); a third
        # of fine-tune became valid: the pre-trained backbone and the test set are the same as before
        "data.split_fractions=[0.7, 0.1, 0.05, 0.15]", "data.row_group_size=1000",
        "model.tower=[32, 16]", "model.embedding_dim=8",
        "pretrain.steps=40", "pretrain.batch_size=256",
        "finetune.optim.steps=30", "finetune.optim.batch_size=256",
        "finetune.optim.lr_dense=0.01", "finetune.iak.compression_fraction=0.3",
    ])


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory, small_cfg):
    from iak_dist.data.prepare import prepare

    out = tmp_path_factory.mktemp("synth")
    prepare(small_cfg.data, out)
    return out


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory, small_cfg, synth_dir, ctx):
    from iak_dist.phases.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrained")
    pretrain(synth_dir, small_cfg.model, small_cfg.pretrain, small_cfg.distributed, 0, out, ctx, show_progress=False)
    return out / "backbone"
