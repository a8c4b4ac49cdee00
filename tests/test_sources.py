"""Splits as files, folders, globs and URIs; footer-only opening; streamed value checks; rank shares; resume."""

import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from iak_dist.data.parquet import DataPosition, ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import SPLITS, Split, assign, validate
from iak_dist.errors import UserError


def write_hive(table, root, write=None, files_per_domain=2):
    """Write `table` as domain=<d>/part-<k>.parquet files without a domain column (it is in the folders).

    `write(table, path, row_group_size)`: default a local file.
    """
    domains = table.column("domain")
    for d in sorted(set(domains.to_pylist())):
        rows = table.filter(pc.equal(domains, d)).drop_columns(["domain"])
        step = -(-rows.num_rows // files_per_domain)
        for k in range(files_per_domain):
            folder = f"{root}/domain={d}"
            if write is None:
                os.makedirs(folder, exist_ok=True)
            (write or pq.write_table)(rows.slice(k * step, step), f"{folder}/part-{k}.parquet", row_group_size=250)
    return root


@pytest.fixture()
def pretrain_table(synth_dir):
    return pq.read_table(synth_dir / "pretrain.parquet")


@pytest.fixture()
def schema(synth_dir):
    return Schema.load(synth_dir / "schema.yaml")


def read_all(split):
    return pa.concat_tables([split.read(p) for p in split.parts])


def same_rows(got, want):
    """Same multiset of (user, item, domain) rows, whatever the order."""
    key = ["user_id", "item_id", "domain"]
    return got.select(key).sort_by([(k, "ascending") for k in key]).equals(
        want.select(key).sort_by([(k, "ascending") for k in key]))


@pytest.mark.parametrize("form", ["folder", "glob", "file_uri", "memory_uri"])
def test_a_split_is_a_folder_glob_or_uri_with_hive_folders_as_columns(form, pretrain_table, schema, tmp_path):
    if form == "memory_uri":
        import fsspec

        memory = fsspec.filesystem("memory")

        def write(table, path, row_group_size):
            with memory.open(path, "wb") as f:
                pq.write_table(table, f, row_group_size=row_group_size)

        write_hive(pretrain_table, f"/{tmp_path.name}", write=write)
        location = f"memory:///{tmp_path.name}"
    else:
        root = tmp_path / "pretrain"
        write_hive(pretrain_table, str(root))
        location = {"folder": str(root), "glob": f"{root}/domain=*/part-*.parquet",
                    "file_uri": f"file://{root}"}[form]
    split = Split.at(location, schema)
    assert len(split.files) == 2 * len(schema.domains)
    assert split.num_rows == pretrain_table.num_rows
    assert same_rows(read_all(split), pretrain_table)
    if form == "memory_uri":
        assert split.where(split.parts[0].path).startswith("memory://")


def test_schema_yaml_says_where_each_split_is_and_a_missing_one_is_named(synth_dir, tmp_path, pretrain_table):
    from iak_dist.config import DataConfig
    from iak_dist.data.prepare import is_prepared, prepare

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(synth_dir / "schema.yaml", data)
    write_hive(pretrain_table, str(data / "pre"))
    shutil.copy(synth_dir / "finetune.parquet", data / "ft.parquet")
    spec = yaml.safe_load((data / "schema.yaml").read_text())
    spec["splits"] = {"pretrain": "pre", "finetune": "ft.parquet"}
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    assert Split.open(data, "pretrain").num_rows == pretrain_table.num_rows
    assert Split.open(data, "finetune").files == [str(data / "ft.parquet")]
    assert not is_prepared(data)
    with pytest.raises(UserError, match=rf"^{data / 'schema.yaml'}: splits lists no 'test' split"):
        Split.open(data, "test")
    spec["splits"]["test"] = str(synth_dir / "test.parquet")  # an absolute path
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    assert not is_prepared(data)  # no valid split yet: a one-line error saying how to add it
    with pytest.raises(UserError) as missing:
        prepare(DataConfig(source="parquet", dir=str(data)))
    assert str(missing.value) == (
        f"{data / 'schema.yaml'}: data.source is parquet but its `splits:` lists no valid; add "
        f"`valid: <file, folder, glob or URI>` under splits{VALID_WHY}")
    spec["splits"]["valid"] = str(synth_dir / "valid.parquet")
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    assert is_prepared(data) and prepare(DataConfig(source="parquet", dir=str(data))) == data
    assert Split.open(data, "test").num_rows == pq.read_metadata(synth_dir / "test.parquet").num_rows
    schema = Schema.load(data / "schema.yaml")  # `splits` is not part of the schema ...
    schema.save(data / "schema.yaml")
    assert yaml.safe_load((data / "schema.yaml").read_text())["splits"] == spec["splits"]  # ... and saving keeps it


VALID_WHY = (" (valid: the impressions between fine-tune and test in time, read by early stopping and model choice "
             "so that test is read only for the final report)")


def test_a_parquet_folder_of_three_files_names_the_missing_valid_split(synth_dir, tmp_path):
    from iak_dist.config import DataConfig
    from iak_dist.data.prepare import prepare

    data = tmp_path / "data"
    data.mkdir()
    for name in ("schema.yaml", "pretrain.parquet", "finetune.parquet", "test.parquet"):  # the layout before valid
        shutil.copy(synth_dir / name, data)
    with pytest.raises(UserError) as missing:
        prepare(DataConfig(source="parquet", dir=str(data)))
    assert str(missing.value) == (
        f"{data}: data.source is parquet but valid.parquet is missing; write it beside schema.yaml, or name "
        f"every split under schema.yaml's `splits:`{VALID_WHY}")


def test_opening_reads_footers_only_and_a_bad_value_names_file_and_row_when_read(pretrain_table, schema, tmp_path,
                                                                                monkeypatch):
    path = tmp_path / "f.parquet"
    labels = np.zeros(pretrain_table.num_rows)
    labels[260] = np.nan  # in the second row group (250 rows each)
    pq.write_table(pretrain_table.set_column(0, "label_click", pa.array(labels)), path, row_group_size=250)

    def no_data(*args, **kwargs):
        raise AssertionError("data was read while opening")

    with monkeypatch.context() as m:
        for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
            m.setattr(pq.ParquetFile, name, no_data)
        split = Split.at(path, schema)
    assert [p.rows for p in split.parts[:2]] == [250, 250] and split.parts[1].first_row == 250
    split.read(split.parts[0])
    with pytest.raises(UserError, match=rf"^{path}: column 'label_click' row 260: label is NaN \(1 NaN labels\)"):
        split.read(split.parts[1])


def test_files_whose_schemas_differ_name_both_files(pretrain_table, schema, tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pretrain_table.slice(0, 100), tmp_path / "d" / "a.parquet")
    other = pretrain_table.slice(100, 100)
    other = other.set_column(other.schema.get_field_index("item_id"), "item_id",
                             pc.cast(other.column("item_id"), pa.int32(), safe=False))
    pq.write_table(other, tmp_path / "d" / "b.parquet")
    with pytest.raises(UserError, match=rf"^{tmp_path}/d/b.parquet: column 'item_id' has type int32 but int64 in "
                                        rf"{tmp_path}/d/a.parquet; files of a split must agree"):
        Split.at(tmp_path / "d", schema)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_assign_gives_ranks_equal_disjoint_shares_covering_every_row(synth_dir, schema, world_size):
    split = Split.at(synth_dir / "pretrain.parquet", schema)
    rows_of = {}
    for rank in range(world_size):
        mine = assign(split.parts, rank, world_size, seed=1, epoch=2, shuffle=True)
        assert mine == assign(split.parts, rank, world_size, seed=1, epoch=2, shuffle=True)
        rows_of[rank] = {(p.path, p.first_row + i) for p in mine for i in range(p.rows)}
        assert len(rows_of[rank]) == sum(p.rows for p in mine)
    sizes = [len(r) for r in rows_of.values()]
    assert max(sizes) - min(sizes) <= 1
    every = set().union(*rows_of.values())
    assert len(every) == sum(sizes) == split.num_rows
    assert assign(split.parts, 0, 1, 1, 2, True) != assign(split.parts, 0, 1, 1, 3, True)  # a new order each epoch


def users(batches):
    return [b.user.numpy().copy() for b in batches]


def test_batch_slices_of_two_ranks_are_the_batches_of_one_rank_with_twice_the_batch(synth_dir, schema):
    split = Split.at(synth_dir / "pretrain.parquet", schema)
    ranks = [users(ParquetReader(split, schema, 64, rank=r, world_size=2, shuffle=True, seed=2, drop_last=True,
                                 split_mode="batch_slices").epoch(1)) for r in range(2)]
    one = users(ParquetReader(split, schema, 128, shuffle=True, seed=2, drop_last=True).epoch(1))
    assert len(one) == split.num_rows // 128
    assert all((np.concatenate(pair) == b).all() for pair, b in zip(zip(*ranks, strict=True), one, strict=True))


def test_resume_at_another_world_size_goes_on_at_the_next_epoch(synth_dir, schema):
    split = Split.at(synth_dir / "pretrain.parquet", schema)
    two = [ParquetReader(split, schema, 64, rank=r, world_size=2, shuffle=True, seed=4, drop_last=True)
           for r in range(2)]
    one = ParquetReader(split, schema, 64, shuffle=True, seed=4, drop_last=True)
    saved = two[0].resume_position(None, 0).advanced(10, two[0].batches_per_epoch()).state_dict()
    assert saved == {"epoch": 0, "batches": 10, "world_size": 2, "fingerprint": split.fingerprint(), "batch_size": 64,
                     "split_mode": "row_groups"}
    position = one.resume_position(saved, step=10)
    assert (position.epoch, position.batches) == (1, 0)  # epoch 0's read rows are not read again
    from itertools import islice

    got = users(islice(one.batches(position), 3))
    want = users(islice(one.epoch(1), 3))
    assert all((a == b).all() for a, b in zip(got, want, strict=True))
    same = two[1].resume_position(saved, step=10)
    assert (same.epoch, same.batches) == (0, 10)  # same world size: the exact batch
    after = users(islice(two[1].batches(same), 2))
    assert all((a == b).all() for a, b in zip(after, users(two[1].epoch(0))[10:12], strict=True))


def test_a_file_that_vanishes_or_is_truncated_mid_run_is_named(pretrain_table, schema, tmp_path):
    root = write_hive(pretrain_table, str(tmp_path / "d"))
    split = Split.at(root, schema)
    reader = ParquetReader(split, schema, 128, shuffle=True, seed=0, drop_last=True)
    assert len(users(reader.epoch(0))) == reader.batches_per_epoch()
    victim = split.files[3]
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"^{victim}: row group \d could not be read .*restore it and re-run"):
        users(reader.epoch(1))
    os.remove(victim)
    with pytest.raises(UserError, match=rf"^{victim}: row group \d could not be read"):
        users(reader.epoch(2))


def fake_train_loop(seen, on_step=None):
    """A train_loop that records the batches it is given instead of training (data position tests)."""

    def loop(model, dense, batches, total, optim, start_step=0, on_step_end=None, **kwargs):
        it = iter(batches)
        for step in range(start_step, total):
            seen.append((step, next(it).user.numpy().copy()))
            if on_step_end is not None:
                on_step_end(step + 1)
            if on_step is not None:
                on_step(step + 1)
        # as train_loop's summary: the steps it ran to, and the loss pretrain stores in its last checkpoint
        return {"train/losses": [], "train/steps": float(total), "train/loss_ema": 0.0}

    return loop


def test_pretrain_resumes_exactly_after_a_file_vanished_and_was_restored(synth_dir, small_cfg, ctx, tmp_path,
                                                                         monkeypatch, pretrain_table):
    """An interrupted run, resumed, sees exactly the batches of an uninterrupted one (1 rank)."""
    import dataclasses

    from iak_dist.phases import pretrain as phase

    data = tmp_path / "data"
    data.mkdir()
    spec = yaml.safe_load((synth_dir / "schema.yaml").read_text())
    spec["splits"] = {"pretrain": "pre"}
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    write_hive(pretrain_table, str(data / "pre"))
    dist_cfg = dataclasses.replace(small_cfg.distributed, checkpoint_every=10)
    optim = small_cfg.pretrain  # 40 steps of 256 rows: 16 batches per epoch

    def run(out, on_step=None):
        seen = []
        monkeypatch.setattr(phase, "train_loop", fake_train_loop(seen, on_step))
        phase.pretrain(data, small_cfg.model, optim, dist_cfg, 0, out, ctx, show_progress=False)
        return seen

    reference = run(tmp_path / "ref")
    assert [s for s, _ in reference] == list(range(40))
    victim = sorted((data / "pre").rglob("*.parquet"))[2]
    kept = victim.read_bytes()
    first = []
    monkeypatch.setattr(phase, "train_loop", fake_train_loop(first, lambda step: step == 12 and victim.unlink()))
    with pytest.raises(UserError, match=f"^{victim}: row group"):
        phase.pretrain(data, small_cfg.model, optim, dist_cfg, 0, tmp_path / "run", ctx, show_progress=False)
    assert 16 <= len(first) < 32  # the next epoch opened the vanished file
    victim.write_bytes(kept)
    resumed = run(tmp_path / "run")
    assert [s for s, _ in resumed] == list(range(10, 40))  # from the checkpoint of step 10
    assert all((a == b).all() for (_, a), (_, b) in zip(first, reference, strict=False))
    assert all((a == b).all() for (_, a), (_, b) in zip(resumed, reference[10:], strict=True))
    import torch

    state = torch.load(tmp_path / "run" / "checkpoints" / "pretrain" / "step_00000030" / "train_state_rank0.pt",
                       weights_only=False)
    assert {k: state["data"][k] for k in ("epoch", "batches", "world_size", "batch_size", "split_mode")} == {
        "epoch": 1, "batches": 14, "world_size": 1, "batch_size": 256, "split_mode": "row_groups"}
    assert state["data"]["fingerprint"] == Split.open(data, "pretrain").fingerprint()


def two_files_that_disagree(folder, table):
    folder.mkdir()
    pq.write_table(table.slice(0, 100), folder / "a.parquet")
    pq.write_table(table.slice(100, 100).drop_columns(["dense_1"]), folder / "b.parquet")


BAD_SPLITS = {
    "empty folder": (lambda d, t: (d / "pre").mkdir(), "pre", "{d}/pre: the folder holds no Parquet files"),
    "glob matching nothing": (lambda d, t: None, "pre/*.parquet", "{d}/pre/*.parquet: the glob matches no file"),
    "missing split": (lambda d, t: None, None, "{d}/schema.yaml: splits lists no 'pretrain' split"),
    "schemas differ": (lambda d, t: two_files_that_disagree(d / "pre", t), "pre",
                       "{d}/pre/b.parquet: column 'dense_1' is missing but {d}/pre/a.parquet has it"),
}


@pytest.mark.parametrize("case", list(BAD_SPLITS))
def test_a_bad_split_location_is_one_line_naming_it_and_exit_2(case, synth_dir, tmp_path, capsys, pretrain_table):
    from iak_dist.cli import main

    make, location, message = BAD_SPLITS[case]
    data = tmp_path / "data"
    data.mkdir()
    spec = yaml.safe_load((synth_dir / "schema.yaml").read_text())
    spec["splits"] = {"finetune": "ft"} if location is None else {"pretrain": location}
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    make(data, pretrain_table)
    code = main(["pretrain", "configs/movielens_age.yaml", "--set", f"data.dir={data}", "--set", "data.source=parquet",
                 "--set", f"run_dir={tmp_path / 'run'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: " + message.format(d=data)), errors


def test_data_validate_streams_a_folder_and_prints_every_problem(pretrain_table, synth_dir, tmp_path, capsys):
    from iak_dist.cli import main

    root = tmp_path / "d"
    write_hive(pretrain_table, str(root))
    shutil.copy(synth_dir / "schema.yaml", tmp_path)
    files = sorted(root.rglob("*.parquet"))
    big = max(files[1:], key=lambda f: pq.read_metadata(f).num_rows)
    for victim, row in ((files[0], 3), (big, 260)):
        t = pq.read_table(victim)
        dense = t.column("dense_0").to_numpy().copy()
        dense[row] = np.inf
        pq.write_table(t.set_column(t.schema.get_field_index("dense_0"), "dense_0", pa.array(dense)), victim,
                       row_group_size=250)
    schema = Schema.load(tmp_path / "schema.yaml")
    assert len(validate(root, schema)[1]) == 2
    for location in (str(root), f"{root}/*/*.parquet", f"file://{root}"):
        code = main(["data", "validate", location, "--schema", str(tmp_path / "schema.yaml")])
        out, err = capsys.readouterr()
        assert code == 1
        assert out.splitlines() == [f"{files[0]}: column 'dense_0' row 3: value inf is not finite; impute it",
                                    f"{big}: column 'dense_0' row 260: value inf is not finite; impute it"]
        assert err.splitlines()[-1] == f"{len(files)} file(s), {pretrain_table.num_rows} row(s), 2 problem(s)"
    assert main(["data", "validate", str(synth_dir)]) == 0  # a data folder: every split
    rows = sum(pq.read_metadata(synth_dir / f"{s}.parquet").num_rows for s in SPLITS)
    assert capsys.readouterr().err.splitlines()[-1] == f"{len(SPLITS)} file(s), {rows} row(s), 0 problem(s)"


def test_pretrain_resumed_at_another_world_size_goes_on_at_the_next_epoch(synth_dir, small_cfg, ctx, tmp_path,
                                                                         monkeypatch):
    """2 ranks (torchrun) checkpoint mid-epoch; 1 rank resumes: no crash, and it reads the next epoch."""
    import dataclasses

    from test_distributed import torchrun

    from iak_dist.config import load_config
    from iak_dist.phases import pretrain as phase

    overrides = ["model.tower=[16]", "model.embedding_dim=4", "pretrain.steps=12", "pretrain.batch_size=64",
                 "distributed.checkpoint_every=6"]
    spec = {"scenarios": [{"kind": "pretrain", "data": str(synth_dir), "out": str(tmp_path / "run"),
                           "overrides": overrides}]}
    result = torchrun(spec, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(None, overrides)
    seen = []
    monkeypatch.setattr(phase, "train_loop", fake_train_loop(seen))
    optim = dataclasses.replace(cfg.pretrain, steps=20)
    phase.pretrain(synth_dir, cfg.model, optim, cfg.distributed, 0, tmp_path / "run", ctx, show_progress=False)
    assert [s for s, _ in seen] == list(range(12, 20))  # from the 2-rank checkpoint of step 12 (epoch 0, batch 12)
    reader = ParquetReader(Split.open(synth_dir, "pretrain"), Schema.load(synth_dir / "schema.yaml"), 64,
                           shuffle=True, seed=0, drop_last=True)
    want = users(batch for batch, _ in zip(reader.epoch(1), range(8), strict=False))
    assert all((a == b).all() for (_, a), b in zip(seen, want, strict=True))


def test_a_resume_at_another_world_size_counts_its_steps_in_the_new_world(synth_dir, schema):
    """epochs=2: the epoch in progress ends; the new world's steps go on from the next epoch's first."""
    from iak_dist.phases.pretrain import resume_step

    split = Split.at(synth_dir / "pretrain.parquet", schema)
    readers = {w: ParquetReader(split, schema, 64, world_size=w, shuffle=True, drop_last=True) for w in (1, 2)}
    per = {w: r.batches_per_epoch() for w, r in readers.items()}
    total = {w: 2 * per[w] for w in per}

    def resumed(old, new, step, by_epochs=True):
        saved = readers[old].position(0, 0).advanced(step, per[old]).state_dict()
        position = readers[new].resume_position(saved, step)
        return resume_step(step, position, per[new], readers[new].resume_note(saved) is None, by_epochs), position

    assert resumed(2, 1, 3) == (per[1], readers[1].position(1, 0))  # mid epoch 0 -> epoch 1 at 1 rank
    assert resumed(2, 1, per[2] + 1)[0] == total[1]  # mid epoch 1: done, not 2 * per[1] - per[2] - 1 more steps
    assert resumed(1, 2, per[1] + 2)[0] == total[2]  # was past the new total: done
    assert resumed(1, 2, per[1])[0] == per[2]  # at an epoch boundary: that epoch, at the new world size
    assert resumed(2, 2, per[2] + 1)[0] == per[2] + 1  # same world size: exact
    assert resumed(2, 1, 3, by_epochs=False)[0] == 3  # a fixed number of steps keeps its count
    with pytest.raises(ValueError, match="cannot go back"):
        DataPosition(1, 2, 2).advanced(-2, per[2])


def test_a_resume_after_a_file_was_added_goes_on_at_the_next_epoch(synth_dir, small_cfg, ctx, tmp_path,
                                                                 monkeypatch, pretrain_table, capsys):
    import dataclasses

    from iak_dist.phases import pretrain as phase

    data = tmp_path / "data"
    data.mkdir()
    spec = yaml.safe_load((synth_dir / "schema.yaml").read_text())
    spec["splits"] = {"pretrain": "pre"}
    (data / "schema.yaml").write_text(yaml.safe_dump(spec))
    write_hive(pretrain_table, str(data / "pre"))
    dist_cfg = dataclasses.replace(small_cfg.distributed, checkpoint_every=10)

    def stop(step):
        if step == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(phase, "train_loop", fake_train_loop([], stop))
    with pytest.raises(KeyboardInterrupt):
        phase.pretrain(data, small_cfg.model, small_cfg.pretrain, dist_cfg, 0, tmp_path / "run", ctx,
                       show_progress=False)
    first = sorted((data / "pre").rglob("*.parquet"))[0]
    new = first.parent / "dt=2026-11-02"  # a new day's file
    new.mkdir()
    pq.write_table(pq.read_table(first, partitioning=None), new / "part-0.parquet", row_group_size=250)
    capsys.readouterr()
    seen = []
    monkeypatch.setattr(phase, "train_loop", fake_train_loop(seen))
    phase.pretrain(data, small_cfg.model, small_cfg.pretrain, dist_cfg, 0, tmp_path / "run", ctx, show_progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "split fingerprint" in line]
    assert len(notes) == 1 and "epoch 0 ends there and reading goes on at epoch 1" in notes[0], notes
    assert [s for s, _ in seen][:1] == [10]
    reader = ParquetReader(Split.open(data, "pretrain"), schema_of(data), small_cfg.pretrain.batch_size,
                           shuffle=True, seed=0, drop_last=True)
    want = users(batch for batch, _ in zip(reader.epoch(1), range(3), strict=False))
    assert all((a == b).all() for (_, a), b in zip(seen, want, strict=False))


def schema_of(data):
    return Schema.load(data / "schema.yaml")


def test_a_glob_matches_per_folder_and_keeps_parquet_files_only(pretrain_table, schema, tmp_path):
    small = pretrain_table.slice(0, 50)
    (tmp_path / "test_holdout").mkdir()
    pq.write_table(small, tmp_path / "test_a.parquet")
    pq.write_table(small, tmp_path / "test_holdout" / "x.parquet")
    (tmp_path / "test_notes.txt").write_text("not data")
    assert Split.at(f"{tmp_path}/test*.parquet", schema).files == [f"{tmp_path}/test_a.parquet"]
    assert Split.at(f"{tmp_path}/test*", schema).files == [f"{tmp_path}/test_a.parquet"]
    assert Split.at(f"{tmp_path}/**/*.parquet", schema).files == [f"{tmp_path}/test_a.parquet",
                                                                  f"{tmp_path}/test_holdout/x.parquet"]
    assert Split.at(f"{tmp_path}/*/x.parquet", schema).files == [f"{tmp_path}/test_holdout/x.parquet"]


@pytest.mark.parametrize("tail, message", [("empty", "the folder holds no Parquet files"),
                                           ("nothing", "no such file or folder"),
                                           ("empty/*.parquet", "the glob matches no file")])
def test_an_error_about_a_uri_names_it_as_written(tail, message, schema, tmp_path):
    import fsspec

    fsspec.filesystem("memory").mkdir(f"/{tmp_path.name}/empty")
    location = f"memory://{tmp_path.name}/{tail}"
    with pytest.raises(UserError, match="^" + re.escape(f"{location}: {message}")):
        Split.at(location, schema)


def test_split_closes_the_files_it_opened(pretrain_table, schema, tmp_path):
    pq.write_table(pretrain_table.slice(0, 100), tmp_path / "a.parquet")
    pq.write_table(pretrain_table.slice(100, 100), tmp_path / "b.parquet")
    split = Split.at(tmp_path, schema)
    streams = []

    class Recording:
        def open_input_file(self, path):
            streams.append(split_fs.open_input_file(path))
            return streams[-1]

    split_fs, split.filesystem = split.filesystem, Recording()
    read_all(split)
    split.close()
    assert len(streams) == 2 and all(s.closed for s in streams)
    with open(tmp_path / "b.parquet", "ab") as f:
        f.write(b"0")
    with pytest.raises(UserError, match="now has"):
        read_all(split)
    assert len(streams) == 4 and streams[3].closed  # b.parquet, refused for its new size, is closed
