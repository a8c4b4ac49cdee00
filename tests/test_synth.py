"""`write_synthetic`: many Parquet files in day partitions, streamed chunk by chunk, deterministic per seed."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from iak_dist.config import DataConfig
from iak_dist.data.schema import Schema
from iak_dist.data.source import SPLITS, Split
from iak_dist.data.synth import write_synthetic
from iak_dist.errors import UserError

ROWS, FILES = 9_000, 8
PART = re.compile(r"(pretrain|finetune|valid|test)/dt=(\d{4}-\d\d-\d\d)/part-(\d{5})\.parquet")


def small(seed: int = 0) -> DataConfig:
    return DataConfig(synth_rows=ROWS, synth_domains=3, row_group_size=500, seed=seed)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, write_synthetic(small(), out, files=FILES, files_per_day=2, show_progress=False)


def test_files_rows_and_day_partitions(written):
    out, stats = written
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    matches = [PART.fullmatch(f) for f in files]
    assert len(files) == FILES and all(matches)
    rows = {f: pq.read_metadata(out / f).num_rows for f in files}
    assert sum(rows.values()) == ROWS
    assert max(rows.values()) - min(rows.values()) <= 1
    assert all(pq.read_metadata(out / f).row_group(0).num_rows == 500 for f in files)  # streamable row groups
    days = {s: sorted(m.group(2) for m in matches if m.group(1) == s) for s in SPLITS}
    assert all(days[s] for s in SPLITS)  # every split has files, valid (the smallest fraction) too
    for earlier, later in zip(SPLITS, SPLITS[1:], strict=False):  # later days are later splits
        assert days[earlier][-1] < days[later][0]
    assert max(len([m for m in matches if m.group(2) == d]) for d in sum(days.values(), [])) == 2  # files per day
    for split, counts in stats["splits"].items():
        assert counts["rows"] == sum(n for f, n in rows.items() if f.startswith(split + "/"))
        assert sum(counts["rows_per_domain"].values()) == counts["rows"]
    assert json.loads((out / "stats.json").read_text()) == stats


def test_schema_names_the_split_folders_and_loads(written):
    out, _ = written
    schema = Schema.load(out / "schema.yaml")
    assert schema.domains == ["d0", "d1", "d2"]
    assert schema.feature_names == ["user_id", "item_id", "tags"]


def test_split_open_reads_every_row(written):
    out, stats = written
    for name, counts in stats["splits"].items():
        split = Split.open(out, name)
        assert split.num_rows == counts["rows"]
        assert split.read(split.parts[0]).num_rows == 500  # values pass the streaming checks


def test_same_seed_same_bytes_other_seed_other_data(written, tmp_path):
    out, _ = written
    again, other = tmp_path / "again", tmp_path / "other"
    write_synthetic(small(), again, files=FILES, files_per_day=2, show_progress=False)
    write_synthetic(small(seed=1), other, files=FILES, files_per_day=2, show_progress=False)
    for f in out.rglob("*.parquet"):
        relative = f.relative_to(out)
        assert (again / relative).read_bytes() == f.read_bytes()
        assert not pq.read_table(other / relative).equals(pq.read_table(f))


def test_finished_folder_is_reused_and_any_other_is_refused(written, tmp_path):
    out, stats = written
    assert write_synthetic(small(), out, files=FILES, files_per_day=2, show_progress=False) == stats
    with pytest.raises(UserError, match=rf"^{re.escape(str(out))}: not an empty folder"):
        write_synthetic(small(seed=1), out, files=FILES, show_progress=False)
    with pytest.raises(UserError, match=r"--files 3: need at least 4 \(one per split\)"):
        write_synthetic(small(), tmp_path / "few", files=3, show_progress=False)


def test_cli_verb_writes_the_requested_rows_and_files(tmp_path, capsys):
    from iak_dist.cli import main

    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--rows", "3e3", "--files", "4", "--domains", "2",
                 "--set", "row_group_size=500"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: 3,000 rows in 4 files"
    assert len(list(out.rglob("*.parquet"))) == 4
    assert sum(Split.open(out, name).num_rows for name in SPLITS) == 3_000
    assert Schema.load(out / "schema.yaml").domains == ["d0", "d1"]
