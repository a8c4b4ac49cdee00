"""Writes prepared impressions as pre-train / fine-tune / valid / test Parquet splits plus schema.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iak_dist.config import DataConfig
from iak_dist.data.batch import domain_indices
from iak_dist.data.schema import Schema
from iak_dist.data.source import SPLITS
from iak_dist.io import atomic_path, atomic_write_json


def split_by_time(group: np.ndarray, when: np.ndarray, fractions: list[float]) -> np.ndarray:
    """Split index (0 .. len(fractions) - 1) of each row: within each group, by the time quantiles `fractions`.

    Split i of a group holds its rows with cut[i - 1] < time <= cut[i], so every row of a later split
    is strictly later than every row of an earlier one (of the same group). Rows tied in time fall in
    the same split, so a positive and its sampled negatives stay together.
    """
    out = np.zeros(len(when), dtype=np.int8)
    edges = np.cumsum(fractions)[:-1]
    order = np.lexsort((when, group))
    sorted_group = group[order]
    cuts = np.flatnonzero(np.diff(sorted_group)) + 1
    for rows in np.split(order, cuts):
        cut = np.quantile(when[rows], edges)
        out[rows] = np.searchsorted(cut, when[rows], side="left")
    return out


def write_parquet(table: pa.Table, path: Path, row_group_size: int) -> None:
    """Atomic Parquet write (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def write_splits(
    table: pa.Table, schema: Schema, cfg: DataConfig, out_dir: Path, time_column: str | None
) -> dict:
    """Split `table` into `SPLITS` and write `<split>.parquet` for each, schema.yaml and stats.json.

    With `time_column`, the split is by time within each `cfg.split_within` group (user or domain), at
    the quantiles `cfg.split_fractions`; without one, at random in those proportions. Rows are
    shuffled within each split so that row groups mix users and domains. Returns the per-split,
    per-domain row counts (also written to `out_dir/stats.json`).
    """
    rng = np.random.default_rng([cfg.seed, 7])  # a stream of its own: generators draw from cfg.seed
    domain = domain_indices(table.column(schema.domain), schema.domains)
    if time_column:
        group = table.column(schema.user).to_numpy() if cfg.split_within == "user" and schema.user else domain
        split = split_by_time(group, table.column(time_column).to_numpy(), cfg.split_fractions)
    else:
        split = rng.choice(len(SPLITS), size=table.num_rows, p=np.array(cfg.split_fractions)).astype(np.int8)
    stats: dict = {"domains": schema.domains, "splits": {}}
    for index, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == index)
        rows = rows[rng.permutation(len(rows))]
        part = table.take(rows)
        write_parquet(part, out_dir / f"{name}.parquet", cfg.row_group_size)
        counts = np.bincount(domain[rows], minlength=len(schema.domains))
        clicks = part.column(schema.click).to_numpy()
        stats["splits"][name] = {
            "rows": int(len(rows)),
            "click_rate": float(clicks.mean()) if len(rows) else 0.0,
            "rows_per_domain": dict(zip(schema.domains, counts.tolist(), strict=True)),
        }
    (out_dir / "schema.yaml").unlink(missing_ok=True)  # a `splits:` mapping there would name other files
    schema.save(out_dir / "schema.yaml")
    atomic_write_json(out_dir / "stats.json", stats)
    return stats
