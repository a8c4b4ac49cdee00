"""The Parquet schema of multi-domain impressions, and the schema file that names its columns.

One row per impression:

| column             | Parquet type           | meaning                                             |
|--------------------|------------------------|-----------------------------------------------------|
| `label_click`      | int/bool/float, 0 or 1 | the impression was clicked (CTR label)              |
| `label_conversion` | int/bool/float, 0 or 1 | optional; clicked *and* converted (CTCVR label)     |
| `domain`           | string or int          | period / region / scene the impression belongs to   |
| sparse ID columns  | int64, or list<int64>  | raw IDs (any int64; hashed into the table's size)   |
| dense columns      | float or int           | numeric features, no NaN                            |

The schema file (`schema.yaml` beside the data) names the columns, the size of each feature's
embedding table, and the known domains in a fixed order (a domain's index is its position):

```yaml
click: label_click
conversion: label_conversion    # or null when the data has no conversion label
domain: domain
user: user_id                   # column that groups impressions for GAUC (null: no GAUC)
sparse:
  - {name: user_id, table_size: 4096}
  - {name: item_id, table_size: 16384}
  - {name: genres, table_size: 64, multi_hot: true}
  - {name: hist_items, table_size: 16384, multi_hot: true, sequence: true, pooling: mean,
     shares_table: item_id, max_length: 20}   # the user's earlier items, most recent last (optional)
dense: [user_age]
domains: ["<18", "18-24", "25-34"]
splits:                         # optional: where each split is (default: <split>.parquet beside this file)
  pretrain: pretrain/           #   a file, a folder (recursive, Hive dt=.../ folders), a glob or a URI
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from iak_dist.config import from_dict, to_dict
from iak_dist.errors import UserError


@dataclass
class SparseFeature:
    """One sparse ID feature and its embedding table."""

    name: str
    """Parquet column (int64 for single-hot, list<int64> for multi-hot)."""
    table_size: int
    """Rows of the feature's embedding table; raw IDs are hashed into [0, table_size)."""
    multi_hot: bool = False
    """True when the column is a list of IDs (pooled: `pooling`)."""
    sequence: bool = False
    """A time-ordered list, most recent last: a sequence encoder reads the order, pooling ignores it
    (needs `multi_hot: true`)."""
    pooling: Literal["sum", "mean"] = "sum"
    """What the backbone's bag does with a multi-hot list (an empty list pools to zeros either way)."""
    shares_table: str | None = None
    """The name of another feature whose embedding table this one looks up (the same ID space: a
    history of item IDs shares item_id's table, so a history item and the target item have one
    embedding). The named feature must exist, not share itself, and have the same `table_size`
    (IDs are hashed into the same range)."""
    max_length: int | None = None
    """The longest list the column holds (a sequence encoder's positions; `data prepare` writes
    `data.history_length`); None: not bounded. Longer lists are refused as values are checked."""


def position_key(feature: str, position: int) -> str:
    """The lookup key of position `position` of sequence feature `feature` (0: the oldest kept)."""
    return f"{feature}#{position}"  # not `@`: TorchRec names its own shared features `name@table`


# Keys of a sparse feature that came after `multi_hot`: left out of `Schema.as_dict` at their defaults, so
# schema files and backbone identities of data without sequences are what they were before these existed.
_LATER_KEYS = {"sequence": False, "pooling": "sum", "shares_table": None, "max_length": None}


@dataclass
class Schema:
    """Column names and tables of one data set (see the module docstring for the file format)."""

    sparse: list[SparseFeature]
    domains: list[str]
    dense: list[str] = field(default_factory=list)
    click: str = "label_click"
    conversion: str | None = "label_conversion"
    domain: str = "domain"
    user: str | None = "user_id"

    def __post_init__(self) -> None:
        if not self.sparse:
            raise UserError("schema: key sparse: list at least one sparse feature")
        if not self.domains:
            raise UserError("schema: key domains: list the known domains, e.g. domains: [a, b]")
        self.domains = [str(d) for d in self.domains]
        by_name = {f.name: f for f in self.sparse}
        for f in self.sparse:
            if f.table_size <= 0:
                raise UserError(f"schema: sparse feature {f.name}: table_size must be > 0")
            if f.sequence and not f.multi_hot:
                raise UserError(f"schema: sparse feature {f.name}: sequence: true needs multi_hot: true "
                                f"(a sequence is a list of IDs)")
            if f.sequence and f.max_length is None:
                raise UserError(f"schema: sparse feature {f.name}: sequence: true needs max_length (its "
                                f"positions: the batch carries one lookup per position)")
            if f.max_length is not None and (not f.multi_hot or f.max_length <= 0):
                raise UserError(f"schema: sparse feature {f.name}: max_length must be > 0 on a multi_hot "
                                f"feature, got {f.max_length!r}")
            if f.shares_table is not None:
                owner = by_name.get(f.shares_table)
                if owner is None or owner is f:
                    others = ", ".join(n for n in by_name if n != f.name)
                    raise UserError(f"schema: sparse feature {f.name}: shares_table names no other sparse feature: "
                                    f"{f.shares_table!r}; features: {others}")
                if owner.sequence:
                    raise UserError(f"schema: sparse feature {f.name}: shares_table: {owner.name} is a sequence "
                                    f"(looked up by position); share the table of the feature it holds IDs of")
                if owner.shares_table is not None:
                    raise UserError(f"schema: sparse feature {f.name}: shares_table: {owner.name} itself looks up "
                                    f"{owner.shares_table}'s table; name the table's owner, {owner.shares_table}")
                if owner.table_size != f.table_size:
                    raise UserError(f"schema: sparse feature {f.name}: table_size {f.table_size} differs from "
                                    f"{owner.name}'s {owner.table_size}; a shared table needs the same size "
                                    f"(IDs are hashed into it)")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def label_columns(self) -> list[str]:
        return [self.click] + ([self.conversion] if self.conversion else [])

    def columns(self) -> list[str]:
        """Every column the reader needs, in a stable order."""
        cols = [*self.label_columns, self.domain, *self.feature_names, *self.dense]
        if self.user and self.user not in cols:
            cols.append(self.user)
        return cols

    def domain_index(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.domains)}

    @property
    def lookup_keys(self) -> list[str]:
        """The batch's `KeyedJaggedTensor` keys, in order: each feature's name, but a sequence feature gives
        one key per position (`position_key`), each a bag of one item or none, most recent item last (the
        lists are right-aligned): a sequence encoder reads every item's embedding through the same
        sharded embedding-bag tables (TorchRec's bag and sequence collections cannot share a table)."""
        return [key for f in self.sparse for key in self.keys_of(f)]

    def keys_of(self, feature: SparseFeature) -> list[str]:
        """The lookup keys of one feature (see `lookup_keys`)."""
        if not feature.sequence:
            return [feature.name]
        return [position_key(feature.name, p) for p in range(feature.max_length or 0)]

    def table_owner(self, feature: str) -> str:
        """The feature whose embedding table `feature` looks up (itself, unless it `shares_table`)."""
        return next(f.shares_table or f.name for f in self.sparse if f.name == feature)

    @property
    def table_owners(self) -> list[SparseFeature]:
        """The features that own an embedding table (every feature but those that share one), in order."""
        return [f for f in self.sparse if f.shares_table is None]

    @property
    def sequence_features(self) -> list[SparseFeature]:
        """The features whose lists are time-ordered (most recent last)."""
        return [f for f in self.sparse if f.sequence]

    def as_dict(self) -> dict:
        """The schema as plain data, each sparse feature without the keys that came later at their defaults.

        What schema.yaml holds and what a backbone's identity should hash: a schema without sequence
        features gives exactly the layout it had before they existed.
        """
        data = to_dict(self)
        data["sparse"] = [{k: v for k, v in f.items() if k not in _LATER_KEYS or v != _LATER_KEYS[k]}
                          for f in data["sparse"]]
        return data

    def save(self, path: str | Path) -> None:
        """Write the schema; a `splits` mapping already in the file is kept (it is not part of `Schema`)."""
        from iak_dist.io import atomic_write_text

        path = Path(path)
        data = self.as_dict()
        if path.is_file():
            splits = (yaml.safe_load(path.read_text()) or {}).get("splits")
            if splits is not None:
                data["splits"] = splits
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

    @staticmethod
    def load(path: str | Path) -> Schema:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no schema file; write one (see iak_dist/data/schema.py) or run data prepare")
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            # where the splits are is not part of a schema (a backbone's identity hashes the schema);
            # iak_dist.data.source.split_locations reads it
            data = {k: v for k, v in data.items() if k != "splits"}
        return from_dict(Schema, data, str(path))


def hash_ids(ids: np.ndarray, table_size: int) -> np.ndarray:
    """Hash raw int64 IDs into [0, table_size) with MurmurHash3's 64-bit finaliser.

    The mix spreads IDs from any part of the int64 range (sequential, negative, huge) evenly
    over the table, so sparse huge ID spaces and small dense ones behave alike.
    """
    x = ids.astype(np.int64, copy=False).view(np.uint64).copy()
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return (x % np.uint64(table_size)).astype(np.int64)
