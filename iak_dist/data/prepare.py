"""`data prepare`: build a data folder (schema.yaml + splits) from a named source."""

from __future__ import annotations

from pathlib import Path

from iak_dist.config import DataConfig
from iak_dist.data.schema import Schema
from iak_dist.data.source import SPLITS, split_locations
from iak_dist.errors import UserError

ITEM_TEXT_FILE = "item_text.parquet"
"""Each item's text embedding, beside the splits (iak_dist/data/item_text.py; named here so that
`is_prepared` does not import torch)."""
COLD_ITEMS_FILE = "cold_items.json"
"""The items `data.cold_items` left out of the pre-train split (iak_dist/data/splits.py)."""


def missing_splits(data_dir: str | Path) -> list[str] | None:
    """The splits of `SPLITS` the data folder lacks (None: no schema.yaml at all).

    A split is there when schema.yaml's `splits:` lists it or, without that mapping, when
    `<split>.parquet` lies beside schema.yaml. A listed location is not looked at (it may be a remote
    store): opening the split checks it.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "schema.yaml").is_file():
        return None
    listed = split_locations(data_dir / "schema.yaml")
    if listed is not None:
        return [s for s in SPLITS if s not in listed]
    return [s for s in SPLITS if not (data_dir / f"{s}.parquet").is_file()]


def is_prepared(data_dir: str | Path, cfg: DataConfig | None = None) -> bool:
    """schema.yaml is there and every split of `SPLITS` with it (a folder of an older layout, e.g.
    without `valid`, is not: movielens and synth folders are then prepared again).

    With `cfg` (a source that `prepare` writes), a complete folder prepared with another
    `history_length` or `cold_items`, or with item text when `cfg.item_text` is false (or the reverse), is
    refused with one line rather than reused or overwritten: other runs may be reading it, and preparing it
    again would change their data under them.
    """
    if missing_splits(data_dir) != []:
        return False
    if cfg is not None and cfg.source != "parquet":
        _refuse_other_history(Path(data_dir), cfg)
        _refuse_other_item_text(Path(data_dir), cfg)
        _refuse_other_cold_items(Path(data_dir), cfg)
    return True


def _refuse_other_cold_items(data_dir: Path, cfg: DataConfig) -> None:
    """UserError when the folder's cold items (cold_items.json, or none: 0) are not `cfg.cold_items`'."""
    from iak_dist.data.splits import read_cold_record

    path = data_dir / COLD_ITEMS_FILE
    record = read_cold_record(path) if path.is_file() else {"fraction": 0.0, "seed": cfg.seed}
    had = float(record["fraction"])
    if had and record["seed"] != cfg.seed:  # another draw of the cold items
        raise UserError(f"{data_dir}: its cold items were drawn with data.seed {record['seed']}, the config has "
                        f"{cfg.seed}; set data.dir to another folder, or prepare this one again if no run reads it")
    if had != cfg.cold_items:
        raise UserError(f"{data_dir}: prepared with data.cold_items {had:g}, the config asks {cfg.cold_items:g}; set "
                        f"data.dir to another folder (e.g. {data_dir}-cold{cfg.cold_items:g}), or prepare this one "
                        f"again (iak-dist data prepare {cfg.source} --out {data_dir} --set "
                        f"cold_items={cfg.cold_items:g}) if no run reads it")


def _refuse_other_history(data_dir: Path, cfg: DataConfig) -> None:
    """UserError when the folder's sequence features are not those `cfg.history_length` prepares."""
    sequences = Schema.load(data_dir / "schema.yaml").sequence_features
    had = max((f.max_length or 0 for f in sequences), default=0)
    asked = cfg.history_length
    if had != asked:
        example = f" (e.g. {data_dir}-hist{asked})" if asked else ""
        raise UserError(f"{data_dir}: prepared with data.history_length {had}, the config asks {asked}; set "
                        f"data.dir to another folder{example}, or prepare this one again (iak-dist data prepare "
                        f"{cfg.source} --out {data_dir} --set history_length={asked}) if no run reads it")


def _refuse_other_item_text(data_dir: Path, cfg: DataConfig) -> None:
    """UserError when the folder's item text (item_text.parquet, or none) is not what `cfg.item_text` asks."""
    had = (data_dir / ITEM_TEXT_FILE).is_file()
    if had != cfg.item_text:
        example = f" (e.g. {data_dir}-text)" if cfg.item_text else ""
        raise UserError(f"{data_dir}: prepared with data.item_text {str(had).lower()}, the config asks "
                        f"{str(cfg.item_text).lower()}; set data.dir to another folder{example}, or prepare this "
                        f"one again (iak-dist data prepare {cfg.source} --out {data_dir} --set "
                        f"item_text={str(cfg.item_text).lower()}) if no run reads it")


def prepare(cfg: DataConfig, out_dir: str | Path | None = None) -> Path:
    """Write the data of `cfg.source` into `out_dir` (default `cfg.dir`); returns the folder."""
    out = Path(out_dir or cfg.dir)
    if cfg.source == "movielens-100k":
        from iak_dist.data.movielens import prepare_movielens

        prepare_movielens(cfg, out)
    elif cfg.source == "synth":
        from iak_dist.data.synth import prepare_synthetic

        prepare_synthetic(cfg, out)
    else:
        _check_parquet_folder(out)
    return out


def _check_parquet_folder(data_dir: Path) -> None:
    """A parquet source must already hold schema.yaml and every split: else one line saying what to add."""
    missing = missing_splits(data_dir)
    if missing is None:
        raise UserError(f"{data_dir / 'schema.yaml'}: data.source is parquet but there is no schema.yaml; write it "
                        f"(docs/data.md) with {', '.join(s + '.parquet' for s in SPLITS)} beside it or a `splits:` "
                        f"mapping naming each of {', '.join(SPLITS)}")
    if not missing:
        return
    why = (" (valid: the impressions between fine-tune and test in time, read by early stopping and model choice "
           "so that test is read only for the final report)" if "valid" in missing else "")
    if split_locations(data_dir / "schema.yaml") is not None:
        add = ", ".join(f"`{s}: <file, folder, glob or URI>`" for s in missing)
        raise UserError(f"{data_dir / 'schema.yaml'}: data.source is parquet but its `splits:` lists no "
                        f"{', '.join(missing)}; add {add} under splits{why}")
    raise UserError(f"{data_dir}: data.source is parquet but {', '.join(s + '.parquet' for s in missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} missing; write {'it' if len(missing) == 1 else 'them'} "
                    f"beside schema.yaml, or name every split under schema.yaml's `splits:`{why}")

