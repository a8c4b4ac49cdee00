"""Synthetic multi-domain impressions with controllable domain shift, for tests and scale work.

Users and items are Zipf-distributed ranks; their raw IDs are the ranks scattered over
`[0, synth_id_space)` by a hash (so tables see huge, sparse raw IDs, as in production).
Each user and item has a latent vector; domain d clicks with
`sigmoid(<u, (I + shift * R_d) v> + b_d)`, so `synth_domain_shift = 0` gives one shared click
model and larger values make domains disagree. Domain sizes fall geometrically (about 10x from
the largest to the smallest), as real domains are uneven.

Two writers share the click model (`ClickModel`) and the row generator (`impressions`):

- `prepare_synthetic` (`data prepare` with `data.source: synth`): one table in memory, split at
  random into `pretrain.parquet`, `finetune.parquet`, `valid.parquet`, `test.parquet` (small data,
  tests);
- `write_synthetic` (`data synth`): any number of rows as many Parquet files in Hive day
  partitions (`pretrain/dt=2026-11-01/part-00000.parquet`), later days in later splits, written
  chunk by chunk: memory does not grow with the rows, and each chunk is seeded by
  (seed, file, chunk) alone, so the same arguments write the same bytes.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from iak_dist.config import DataConfig
from iak_dist.data.schema import Schema, SparseFeature, hash_ids
from iak_dist.data.source import SPLITS
from iak_dist.errors import UserError
from iak_dist.io import atomic_path, atomic_write_json, atomic_write_text

N_USERS, N_ITEMS, N_TAGS, LATENT = 50_000, 20_000, 200, 8
FIRST_DAY = datetime.date(2026, 11, 1)
CHUNK_ROWS = 1 << 16
"""Rows generated at once by `write_synthetic` (bounds its memory; a multiple of the row group size is used)."""
STATS_FILE = "stats.json"


def _zipf_ranks(rng: np.random.Generator, n: int, vocab: int, exponent: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.power(np.arange(1, vocab + 1), exponent)
    return rng.choice(vocab, size=n, p=weights / weights.sum())


def _raw_ids(ranks: np.ndarray, salt: int, id_space: int) -> np.ndarray:
    """Scatter ranks over [0, id_space) deterministically (distinct ranks stay distinct w.h.p.)."""
    return hash_ids(ranks * 1_000_003 + salt, id_space)


def domain_names(domains: int) -> list[str]:
    return [f"d{d}" for d in range(domains)]


def synthetic_schema(domains: int) -> Schema:
    return Schema(
        sparse=[
            SparseFeature("user_id", 2 * N_USERS),
            SparseFeature("item_id", 2 * N_ITEMS),
            SparseFeature("tags", 4 * N_TAGS, multi_hot=True),
        ],
        domains=domain_names(domains),
        dense=["dense_0", "dense_1"],
    )


@dataclass(frozen=True)
class ClickModel:
    """The fixed part of the data, shared by every row: latent vectors and each domain's click model.

    Small (about 0.5 MiB) whatever the number of rows, so every chunk of a large write uses the same one.
    """

    user: np.ndarray  # [N_USERS, LATENT]
    item: np.ndarray  # [N_ITEMS, LATENT]
    mix: np.ndarray  # [domains, LATENT, LATENT]: I + shift * R_d
    bias: np.ndarray  # [domains]

    @classmethod
    def draw(cls, rng: np.random.Generator, domains: int, shift: float) -> ClickModel:
        user = rng.normal(0, 0.6, (N_USERS, LATENT))
        item = rng.normal(0, 0.6, (N_ITEMS, LATENT))
        mix = np.eye(LATENT)[None] + shift * rng.normal(0, 0.5, (domains, LATENT, LATENT))
        bias = shift * rng.normal(0, 0.5, domains) - 1.0
        return cls(user, item, mix, bias)


@dataclass(frozen=True)
class Keys:
    """Who saw what where: the domain, user rank and item rank of each row."""

    domain: np.ndarray
    user: np.ndarray
    item: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: int, domains: int) -> Keys:
        sizes = np.power(10.0, -np.linspace(0, 1, domains)) if domains > 1 else np.ones(1)
        domain = rng.choice(domains, size=rows, p=sizes / sizes.sum())
        return cls(domain, _zipf_ranks(rng, rows, N_USERS), _zipf_ranks(rng, rows, N_ITEMS))


def impressions(rng: np.random.Generator, keys: Keys, model: ClickModel, id_space: int) -> pa.Table:
    """The rows of `keys`: dense features, click and conversion labels drawn from `model`, tags.

    Vectorised throughout (about a million rows a second per core); memory grows with the rows
    passed (a few hundred bytes each), so callers bound it by passing chunks.
    """
    n = len(keys.domain)
    logit = np.empty(n)
    for s in range(0, n, 1 << 14):  # in slices: the gathered [n, LATENT, LATENT] mixes take 512 B a row
        rows = slice(s, s + (1 << 14))
        logit[rows] = np.einsum("nl,nlm,nm->n", model.user[keys.user[rows]], model.mix[keys.domain[rows]],
                                model.item[keys.item[rows]])
    logit += model.bias[keys.domain]
    dense = rng.normal(0, 1, (n, 2)).astype(np.float32)
    logit += 0.3 * dense[:, 0]
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    convert = click & (rng.random(n) < 1 / (1 + np.exp(-(0.5 * logit + 0.3 * dense[:, 1]))))
    n_tags = rng.integers(1, 4, size=n)
    tag_ranks = _zipf_ranks(rng, int(n_tags.sum()), N_TAGS)
    offsets = np.concatenate([[0], np.cumsum(n_tags)]).astype(np.int32)
    names = pa.array(domain_names(len(model.bias)), pa.string())
    return pa.table({
        "label_click": pa.array(click.astype(np.int8)),
        "label_conversion": pa.array(convert.astype(np.int8)),
        "domain": pa.DictionaryArray.from_arrays(pa.array(keys.domain.astype(np.int32)), names).cast(pa.string()),
        "user_id": pa.array(_raw_ids(keys.user, 1, id_space)),
        "item_id": pa.array(_raw_ids(keys.item, 2, id_space)),
        "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tag_ranks.astype(np.int64))),
        "dense_0": pa.array(dense[:, 0]),
        "dense_1": pa.array(dense[:, 1]),
    })


def build_synthetic(cfg: DataConfig) -> tuple[pa.Table, Schema]:
    """`cfg.synth_rows` impressions as one in-memory table (small data: tests, `data prepare`)."""
    rng = np.random.default_rng(cfg.seed)
    keys = Keys.draw(rng, cfg.synth_rows, cfg.synth_domains)
    model = ClickModel.draw(rng, cfg.synth_domains, cfg.synth_domain_shift)
    return impressions(rng, keys, model, cfg.synth_id_space), synthetic_schema(cfg.synth_domains)


def prepare_synthetic(cfg: DataConfig, out_dir: str | Path) -> dict:
    from iak_dist.data.splits import write_splits  # imports torch: not needed by write_synthetic

    table, schema = build_synthetic(cfg)
    return write_splits(table, schema, cfg, Path(out_dir), time_column=None)


@dataclass(frozen=True)
class FilePlan:
    """One Parquet file of a `write_synthetic` data set."""

    index: int  # global file number: its seed and its name
    split: str
    day: datetime.date
    rows: int

    @property
    def path(self) -> str:
        return f"{self.split}/dt={self.day.isoformat()}/part-{self.index:05d}.parquet"


def plan_files(rows: int, files: int, files_per_day: int, fractions: list[float]) -> list[FilePlan]:
    """Files of equal rows (the first ones take the remainder), given to the splits in proportion to
    `fractions` (largest remainder, at least one each), `files_per_day` to a day, each split starting
    on a day of its own: later days are later splits, as with time-ordered real data."""
    if files < len(SPLITS):
        raise UserError(f"data synth: --files {files}: need at least {len(SPLITS)} (one per split)")
    if rows < files:
        raise UserError(f"data synth: --rows {rows} is fewer than --files {files}")
    if files_per_day < 1:
        raise UserError(f"data synth: --files-per-day {files_per_day}: must be >= 1")
    share = np.asarray(fractions, dtype=float) / sum(fractions) * (files - len(SPLITS))
    per_split = np.floor(share).astype(int) + 1
    for s in np.argsort(-(share - np.floor(share)), kind="stable")[: files - per_split.sum()]:
        per_split[s] += 1
    plans, index, day = [], 0, 0
    for split, count in zip(SPLITS, per_split.tolist(), strict=True):
        for k in range(count):
            plans.append(FilePlan(index, split, FIRST_DAY + datetime.timedelta(days=day + k // files_per_day),
                                  rows // files + (index < rows % files)))
            index += 1
        day += -(-count // files_per_day)
    return plans


def _write_file(plan: FilePlan, out_dir: Path, cfg: DataConfig, model: ClickModel,
                schema: Schema) -> tuple[np.ndarray, int]:
    """Write one file chunk by chunk; returns its rows per domain and its clicks."""
    chunk = max(1, CHUNK_ROWS // cfg.row_group_size) * cfg.row_group_size
    per_domain = np.zeros(len(schema.domains), dtype=np.int64)
    clicks = 0
    with atomic_path(out_dir / plan.path) as tmp:
        writer = None
        try:
            for c, start in enumerate(range(0, plan.rows, chunk)):
                rng = np.random.default_rng([cfg.seed, 2, plan.index, c])
                keys = Keys.draw(rng, min(chunk, plan.rows - start), cfg.synth_domains)
                table = impressions(rng, keys, model, cfg.synth_id_space)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table, row_group_size=cfg.row_group_size)
                per_domain += np.bincount(keys.domain, minlength=len(per_domain))
                clicks += int(np.count_nonzero(table.column("label_click").to_numpy()))
        finally:
            if writer is not None:
                writer.close()
    return per_domain, clicks


def _parameters(cfg: DataConfig, files: int, files_per_day: int) -> dict:
    keys = ("seed", "synth_rows", "synth_domains", "synth_domain_shift", "synth_id_space", "row_group_size",
            "split_fractions")
    return {**{k: getattr(cfg, k) for k in keys}, "files": files, "files_per_day": files_per_day}


def write_synthetic(cfg: DataConfig, out_dir: str | Path, files: int, files_per_day: int = 4,
                    show_progress: bool = True) -> dict:
    """Write `cfg.synth_rows` impressions as `files` Parquet files in day partitions, plus schema.yaml.

    The same generator as `prepare_synthetic` (its click model, domain sizes and ID scattering; the
    draws differ, being seeded per file and chunk), laid out for streaming:
    `<split>/dt=<day>/part-<n>.parquet` with row groups of `cfg.row_group_size`, schema.yaml's
    `splits` naming each split's folder, and `stats.json` with per-split, per-domain row counts.
    Memory stays at a few hundred MiB for any number of rows.

    `out_dir` must be empty or absent; a folder this function finished with the same parameters is
    kept as it is (benchmarks reuse it). Returns the stats.

    Example::

        write_synthetic(DataConfig(synth_rows=1_000_000), "data/synth-1m", files=64)
    """
    from tqdm import tqdm

    out = Path(out_dir)
    params = _parameters(cfg, files, files_per_day)
    stats_path = out / STATS_FILE
    if stats_path.is_file() and json.loads(stats_path.read_text()).get("synth") == params:
        return json.loads(stats_path.read_text())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: not an empty folder; data synth writes a new data set (choose another folder)")
    plans = plan_files(cfg.synth_rows, files, files_per_day, cfg.split_fractions)
    schema = synthetic_schema(cfg.synth_domains)
    model = ClickModel.draw(np.random.default_rng([cfg.seed, 1]), cfg.synth_domains, cfg.synth_domain_shift)
    per_split = {s: {"rows": 0, "clicks": 0, "files": 0, "per_domain": np.zeros(cfg.synth_domains, np.int64)}
                 for s in SPLITS}
    bar = tqdm(total=cfg.synth_rows, unit="row", unit_scale=True, desc="data synth", disable=not show_progress)
    for plan in plans:
        per_domain, clicks = _write_file(plan, out, cfg, model, schema)
        acc = per_split[plan.split]
        acc["rows"] += plan.rows
        acc["clicks"] += clicks
        acc["files"] += 1
        acc["per_domain"] += per_domain
        bar.update(plan.rows)
    bar.close()
    stats: dict = {"domains": schema.domains, "splits": {}, "synth": params}
    for split, acc in per_split.items():
        days = sorted({p.day for p in plans if p.split == split})
        stats["splits"][split] = {
            "rows": acc["rows"], "files": acc["files"], "days": [days[0].isoformat(), days[-1].isoformat()],
            "click_rate": acc["clicks"] / max(acc["rows"], 1),
            "rows_per_domain": dict(zip(schema.domains, acc["per_domain"].tolist(), strict=True)),
        }
    layout = schema.as_dict()
    layout["splits"] = {s: s for s in SPLITS}  # each split is the folder of its day partitions
    atomic_write_text(out / "schema.yaml", yaml.safe_dump(layout, sort_keys=False))
    atomic_write_json(stats_path, stats)  # last: its presence marks a finished data set
    return stats
