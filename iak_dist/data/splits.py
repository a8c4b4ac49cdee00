"""Writes prepared impressions as pre-train / fine-tune / valid / test Parquet splits plus schema.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iak_dist.config import DataConfig
from iak_dist.data.batch import domain_indices
from iak_dist.data.prepare import COLD_ITEMS_FILE
from iak_dist.data.schema import Schema, hash_ids
from iak_dist.data.source import SPLITS
from iak_dist.errors import UserError
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


def choose_cold_items(items: np.ndarray, fraction: float, seed: int, table_size: int) -> np.ndarray:
    """The cold items' raw IDs, ascending: `round(fraction * distinct items)` of `items` drawn uniformly
    (a stream of `seed`'s own), then every item hashed to the same item_id table slot as a drawn one.

    Why widen: items sharing a slot share their ID row, so a warm item there would train the cold
    one's row in pre-training; the cold slots are then exactly the rows pre-training never reads.
    """
    distinct = np.unique(items)
    drawn = np.random.default_rng([seed, 11]).choice(distinct, size=round(fraction * len(distinct)), replace=False)
    slots = hash_ids(distinct, table_size)
    return distinct[np.isin(slots, hash_ids(drawn, table_size))]


def write_cold_items(out_dir: Path, cold: np.ndarray, fraction: float, seed: int, table_size: int) -> None:
    """`cold_items.json`: what `data.cold_items` left out of pre-training (read by `read_cold_slots`)."""
    atomic_write_json(out_dir / COLD_ITEMS_FILE, {
        "fraction": fraction, "seed": seed, "feature": "item_id", "table_size": table_size,
        "item_ids": cold.tolist(), "slots": np.unique(hash_ids(cold, table_size)).tolist()})


def read_cold_record(path: Path) -> dict:
    """`cold_items.json`, checked: readable, every key there, its slots those of its item IDs (one line if not)."""
    keys = ("fraction", "seed", "feature", "table_size", "item_ids", "slots")
    try:
        record = json.loads(path.read_text())
        missing = [k for k in keys if k not in record]
        slots = np.unique(hash_ids(np.array(record["item_ids"], dtype=np.int64), int(record["table_size"])))
        consistent = slots.tolist() == list(record["slots"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}); prepare the folder again") from exc
    if missing or not consistent:
        what = f"no {', '.join(missing)}" if missing else "its slots are not those of its item IDs"
        raise UserError(f"{path}: {what} (edited or damaged); prepare the folder again")
    return record


def read_cold_slots(data_dir: Path, schema: Schema) -> np.ndarray | None:
    """The item_id table slots of the folder's cold items (ascending), None if it has none."""
    path = Path(data_dir) / COLD_ITEMS_FILE
    if not path.is_file():
        return None
    record = read_cold_record(path)
    feature = next((f for f in schema.sparse if f.name == record["feature"]), None)
    if feature is None or feature.table_size != record["table_size"]:
        raise UserError(f"{path}: cold items hashed into a {record['feature']} table of {record['table_size']} "
                        f"slots, the schema has {feature.table_size if feature else 'no such feature'}; "
                        f"prepare the folder again")
    return np.array(record["slots"], dtype=np.int64)


def write_splits(
    table: pa.Table, schema: Schema, cfg: DataConfig, out_dir: Path, time_column: str | None,
    not_in_pretrain: np.ndarray | None = None,
) -> dict:
    """Split `table` into `SPLITS` and write `<split>.parquet` for each, schema.yaml and stats.json.

    With `time_column`, the split is by time within each `cfg.split_within` group (user or domain), at
    the quantiles `cfg.split_fractions`; without one, at random in those proportions. Rows are
    shuffled within each split so that row groups mix users and domains. Returns the per-split,
    per-domain row counts (also written to `out_dir/stats.json`).

    `not_in_pretrain` ([rows] booleans, None: none): rows dropped from the pre-train split only (cold
    items). They are dropped after the shuffle, so every other split is byte for byte the one written
    without them.
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
        if name == "pretrain" and not_in_pretrain is not None:
            stats["pretrain_rows_left_out"] = int(not_in_pretrain[rows].sum())
            rows = rows[~not_in_pretrain[rows]]
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
