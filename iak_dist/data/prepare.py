"""`data prepare`: build a data folder (schema.yaml + splits) from a named source."""

from __future__ import annotations

from pathlib import Path

from iak_dist.config import DataConfig
from iak_dist.data.source import SPLITS, split_locations
from iak_dist.errors import UserError


def is_prepared(data_dir: str | Path) -> bool:
    """schema.yaml is there and says where every split is (its `splits:`), or `<split>.parquet` are there.

    A listed location is not looked at (it may be a remote store): opening the split checks it.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "schema.yaml").is_file():
        return False
    listed = split_locations(data_dir / "schema.yaml")
    if listed is not None:
        return all(s in listed for s in SPLITS)
    return all((data_dir / f"{s}.parquet").is_file() for s in SPLITS)


def prepare(cfg: DataConfig, out_dir: str | Path | None = None) -> Path:
    """Write the data of `cfg.source` into `out_dir` (default `cfg.dir`); returns the folder."""
    out = Path(out_dir or cfg.dir)
    if cfg.source == "movielens-100k":
        from iak_dist.data.movielens import prepare_movielens

        prepare_movielens(cfg, out)
    elif cfg.source == "synth":
        from iak_dist.data.synth import prepare_synthetic

        prepare_synthetic(cfg, out)
    elif not is_prepared(out):
        raise UserError(f"{out}: data.source is parquet but schema.yaml or a split is missing "
                        f"({', '.join(s + '.parquet' for s in SPLITS)} beside it, or all of "
                        f"{', '.join(SPLITS)} under its `splits:`)")
    return out
