"""Synthetic multi-domain impressions with controllable domain shift, for tests and scale work.

Users and items are Zipf-distributed ranks; their raw IDs are the ranks scattered over
`[0, synth_id_space)` by a hash (so tables see huge, sparse raw IDs, as in production).
Each user and item has a latent vector; domain d clicks with
`sigmoid(<u, (I + shift * R_d) v> + b_d)`, so `synth_domain_shift = 0` gives one shared click
model and larger values make domains disagree. Domain sizes fall geometrically (about 10x from
the largest to the smallest), as real domains are uneven.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from iak_dist.config import DataConfig
from iak_dist.data.schema import Schema, SparseFeature, hash_ids
from iak_dist.data.splits import write_splits

N_USERS, N_ITEMS, N_TAGS, LATENT = 50_000, 20_000, 200, 8


def _zipf_ranks(rng: np.random.Generator, n: int, vocab: int, exponent: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.power(np.arange(1, vocab + 1), exponent)
    return rng.choice(vocab, size=n, p=weights / weights.sum())


def _raw_ids(ranks: np.ndarray, salt: int, id_space: int) -> np.ndarray:
    """Scatter ranks over [0, id_space) deterministically (distinct ranks stay distinct w.h.p.)."""
    return hash_ids(ranks * 1_000_003 + salt, id_space)


def build_synthetic(cfg: DataConfig) -> tuple[pa.Table, Schema]:
    rng = np.random.default_rng(cfg.seed)
    k, n = cfg.synth_domains, cfg.synth_rows
    sizes = np.power(10.0, -np.linspace(0, 1, k)) if k > 1 else np.ones(1)
    domain = rng.choice(k, size=n, p=sizes / sizes.sum())
    user = _zipf_ranks(rng, n, N_USERS)
    item = _zipf_ranks(rng, n, N_ITEMS)
    u_lat = rng.normal(0, 0.6, (N_USERS, LATENT))
    i_lat = rng.normal(0, 0.6, (N_ITEMS, LATENT))
    mix = np.eye(LATENT)[None] + cfg.synth_domain_shift * rng.normal(0, 0.5, (k, LATENT, LATENT))
    bias = cfg.synth_domain_shift * rng.normal(0, 0.5, k) - 1.0
    logit = np.einsum("nl,nlm,nm->n", u_lat[user], mix[domain], i_lat[item]) + bias[domain]
    dense = rng.normal(0, 1, (n, 2)).astype(np.float32)
    logit += 0.3 * dense[:, 0]
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    convert = click & (rng.random(n) < 1 / (1 + np.exp(-(0.5 * logit + 0.3 * dense[:, 1]))))
    n_tags = rng.integers(1, 4, size=n)
    tag_ranks = _zipf_ranks(rng, int(n_tags.sum()), N_TAGS)
    offsets = np.concatenate([[0], np.cumsum(n_tags)])
    tags = [tag_ranks[offsets[i]:offsets[i + 1]].tolist() for i in range(n)]
    names = [f"d{d}" for d in range(k)]
    table = pa.table({
        "label_click": pa.array(click.astype(np.int8)),
        "label_conversion": pa.array(convert.astype(np.int8)),
        "domain": pa.array(np.array(names, dtype=object)[domain].tolist(), pa.string()),
        "user_id": pa.array(_raw_ids(user, 1, cfg.synth_id_space)),
        "item_id": pa.array(_raw_ids(item, 2, cfg.synth_id_space)),
        "tags": pa.array(tags, pa.list_(pa.int64())),
        "dense_0": pa.array(dense[:, 0]),
        "dense_1": pa.array(dense[:, 1]),
    })
    schema = Schema(
        sparse=[
            SparseFeature("user_id", 2 * N_USERS),
            SparseFeature("item_id", 2 * N_ITEMS),
            SparseFeature("tags", 4 * N_TAGS, multi_hot=True),
        ],
        domains=names,
        dense=["dense_0", "dense_1"],
    )
    return table, schema


def prepare_synthetic(cfg: DataConfig, out_dir: str | Path) -> dict:
    table, schema = build_synthetic(cfg)
    return write_splits(table, schema, cfg, Path(out_dir), time_column=None)
