"""Fine-tuning's per-domain streams: 1/W of every domain per rank, global p_d, bounded memory, exact resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iak_dist.data.domain_streams import DomainStreams, count_share
from iak_dist.data.sampler import domain_probabilities
from iak_dist.data.schema import Schema, SparseFeature
from iak_dist.data.source import Split
from iak_dist.distributed.context import sum_over_ranks
from iak_dist.errors import UserError
from iak_dist.phases.finetune import restore_position, resume_step, say_thin_domains

SCHEMA = Schema(sparse=[SparseFeature("user_id", 64)], domains=["a", "b", "c"])
ROWS = {"a": 400, "b": 190, "c": 10}  # c: a small domain, all in one row group of one file


def write_split(root: Path, files: int, row_group_size: int, by_domain: bool = False) -> Split:
    """600 rows with `user_id` = row number; c's rows come first (first row group of the first file).

    `by_domain`: Hive folders `domain=<d>/` hold each domain's rows (the column comes from the folder).
    """
    domain = np.array(["c"] * ROWS["c"] + ["a", "b"] * 190 + ["a"] * 210)
    n = len(domain)
    table = pa.table({"label_click": np.arange(n) % 2, "label_conversion": np.zeros(n, dtype=np.int64),
                      "domain": domain, "user_id": np.arange(n, dtype=np.int64)})
    root.mkdir(parents=True)
    if by_domain:
        for d in ROWS:
            (root / f"domain={d}").mkdir()
            rows = np.flatnonzero(domain == d)
            pq.write_table(table.take(rows).drop_columns(["domain"]), root / f"domain={d}" / "part.parquet",
                           row_group_size=row_group_size)
        return Split.at(root, SCHEMA, "finetune")
    for i, rows in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(table.take(rows), root / f"part-{i:03d}.parquet", row_group_size=row_group_size)
    return Split.at(root if files > 1 else root / "part-000.parquet", SCHEMA, "finetune")


def ids(table: pa.Table) -> list[int]:
    return table.column("user_id").to_pylist()


@pytest.mark.parametrize("files,row_group_size,by_domain", [(3, 50, False), (1, 1000, False), (3, 50, True)],
                         ids=["directory", "one-row-group", "hive-folder-per-domain"])
def test_every_rank_reads_1_over_w_of_every_domain_and_each_domain_cycles_through_its_rows(
        tmp_path, files, row_group_size, by_domain):
    split = write_split(tmp_path / "ft", files, row_group_size, by_domain)
    shares = [count_share(split, SCHEMA, rank, 2, seed=4) for rank in range(2)]  # one process plays both ranks
    counts = shares[0].global_rows_per_domain
    assert counts.tolist() == list(ROWS.values())  # the global n_d: what p_d and rows_per_domain use
    rows_of = {}
    for rank, share in enumerate(shares):
        assert share.rows_per_domain.tolist() == [200, 95, 5]  # half of every domain, whatever the files
        streams = DomainStreams(split, SCHEMA, share, 32, 0.5, seed=4, buffer_rows=40)
        for d, stream in streams.streams.items():
            n = int(share.rows_per_domain[d])
            if by_domain:  # a stream reads only the parts holding its domain (here: its own folder)
                assert all(f"domain={SCHEMA.domains[d]}/" in part.path for part in stream.parts)
            first, second = ids(stream.take(n)), ids(stream.take(n))
            assert len(set(first)) == n and set(second) == set(first)  # an epoch: each row once
            assert first != second  # the next epoch is another order
            rows_of[rank, d] = set(first)
    for d, name in enumerate(SCHEMA.domains):
        mine = [rows_of[rank, d] for rank in range(2)]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == ROWS[name]  # the union: each row once


def test_domain_partitioned_files_give_every_rank_the_global_mix(tmp_path):
    """A 90% / B 10% in one folder each: by files alone rank 0 would hold only A; alpha 0 must still pick 50/50."""
    root, n = tmp_path / "ft", {"a": 540, "b": 60}
    for name, rows in n.items():
        (root / f"domain={name}").mkdir(parents=True)
        pq.write_table(pa.table({"label_click": np.zeros(rows, dtype=np.int64),
                                 "label_conversion": np.zeros(rows, dtype=np.int64),
                                 "user_id": np.arange(rows, dtype=np.int64)}),
                       root / f"domain={name}" / "part.parquet", row_group_size=60)
    schema = Schema(sparse=[SparseFeature("user_id", 64)], domains=["a", "b"])
    split = Split.at(root, schema, "finetune")
    for rank in range(2):
        share = count_share(split, schema, rank, 2, seed=0)
        assert share.rows_per_domain.tolist() == [270, 30]
        streams = DomainStreams(split, schema, share, 64, 0.0, seed=0)
        assert streams.missing == []
        np.testing.assert_allclose(streams.picks.probs, [0.5, 0.5])
        drawn = np.concatenate([streams.next_batch().column("domain").to_numpy(zero_copy_only=False)
                                for _ in range(50)])
        assert abs(np.mean(drawn == "b") - 0.5) < 0.03  # 3200 picks: 4.5 standard deviations


def test_a_domain_with_fewer_rows_than_ranks_is_never_picked_by_the_ranks_without_any(tmp_path, capsys):
    split = write_split(tmp_path / "ft", 3, 50)
    world = 16  # c has 10 rows: 6 ranks hold none of it
    shares = [count_share(split, SCHEMA, rank, world, seed=0) for rank in range(world)]
    assert sum(s.rows_per_domain for s in shares).tolist() == list(ROWS.values())
    without_c = [r for r in range(world) if shares[r].rows_per_domain[2] == 0]
    assert len(without_c) == world - ROWS["c"]
    say_thin_domains(shares[0], SCHEMA, 0)
    assert ("domains with fewer rows than ranks, not picked by the ranks without any: c (6 of 16)"
            in capsys.readouterr().err)
    counts = shares[0].global_rows_per_domain
    for rank in (without_c[0], next(r for r in range(world) if r not in without_c)):
        streams = DomainStreams(split, SCHEMA, shares[rank], 64, 1.0, seed=0)
        if rank in without_c:
            assert streams.missing == ["c"]
            np.testing.assert_allclose(streams.picks.probs, domain_probabilities(np.array([*counts[:2], 0]), 1.0))
            drawn = np.concatenate([streams.next_batch().column("domain").to_numpy(zero_copy_only=False)
                                    for _ in range(5)])  # returns: nothing waits for c's rows
            assert "c" not in set(drawn) and len(drawn) == 5 * 64
        else:
            assert streams.missing == []
            np.testing.assert_allclose(streams.picks.probs, domain_probabilities(counts, 1.0))


def test_a_split_with_fewer_rows_than_ranks_is_a_user_error_on_every_rank(tmp_path):
    tiny = Split.at(_write_rows(tmp_path / "tiny.parquet", 3), SCHEMA, "finetune")
    for rank in range(4):
        with pytest.raises(UserError, match=r"^finetune split at .*tiny\.parquet: 3 rows with a known domain for 4 "
                                            r"ranks, rank \d would get none: use fewer ranks or more data$"):
            count_share(tiny, SCHEMA, rank, 4, seed=0)
    assert [count_share(tiny, SCHEMA, r, 3, seed=0).rows_per_domain.sum() for r in range(3)] == [1, 1, 1]


def _write_rows(path: Path, rows: int) -> Path:
    pq.write_table(pa.table({"label_click": np.zeros(rows, dtype=np.int64),
                             "label_conversion": np.zeros(rows, dtype=np.int64),
                             "domain": ["a"] * rows, "user_id": np.arange(rows, dtype=np.int64)}), path)
    return path


def test_state_before_a_batch_regenerates_the_stream_and_memory_stays_bounded(tmp_path):
    split = write_split(tmp_path / "ft", 3, 50)
    share = count_share(split, SCHEMA, 0, 1, seed=2)

    def streams():
        return DomainStreams(split, SCHEMA, share, 48, 0.0, seed=2, buffer_rows=60)

    run = streams()
    states, batches, held = [], [], 0
    for _ in range(40):  # 40 x 48 rows, alpha 0: ~640 rows a domain (a: 400, c: 10)
        states.append(run.state_dict())
        batches.append(run.next_batch())
        held = max(held, max(s.held_rows for s in run.streams.values()))
    assert held <= 60 + 50  # the buffer and the rest of its last part, whatever the split's size
    assert min(s.epoch for s in run.streams.values()) >= 1  # every stream wrapped to a new epoch
    for step in (1, 17, 33):
        resumed = streams()
        resumed.load_state_dict(states[step])
        for want in batches[step:step + 7]:
            assert resumed.next_batch().equals(want)


def test_resume_carries_the_fraction_done_to_another_world_size():
    assert resume_step(30, 100, 50) == 15  # 2 ranks -> 4: half the steps, the same fraction done
    assert resume_step(10, 30, 60) == 20
    assert resume_step(1, 3, 2) == 1  # round(0.67)
    assert resume_step(40, 40, 40) == 40 and resume_step(7, 40, 40) == 7


def test_restore_positions_the_streams_only_for_the_same_data_batch_size_and_world(tmp_path):
    split = write_split(tmp_path / "ft", 3, 50)
    share = count_share(split, SCHEMA, 0, 1, seed=2)
    run = DomainStreams(split, SCHEMA, share, 48, 0.5, seed=2, buffer_rows=60)
    for _ in range(5):
        run.next_batch()
    saved, want = run.state_dict(), run.next_batch()
    state = {"step": 5, "total": 20, "world_size": 1, "sampler": saved}
    notes: list[str] = []

    def fresh(split_now: Split = split, batch_size: int = 48) -> DomainStreams:
        return DomainStreams(split_now, SCHEMA, count_share(split_now, SCHEMA, 0, 1, seed=2), batch_size, 0.5,
                             seed=2, buffer_rows=60)

    same = fresh()
    assert restore_position(state, same, 20, 1, notes.append) == 5 and notes == []
    assert same.next_batch().equals(want)  # exact: the batch after the saved state

    other_world = fresh()
    assert restore_position({**state, "world_size": 2, "sampler": {**saved, "world_size": 2}},
                            other_world, 10, 1, notes.append) == 2  # round(5 / 20 * 10)
    assert notes.pop() == ("checkpoint at step 5 of 20 on 2 ranks, now step 2 of 10 on 1: "
                           "the data streams start afresh (world_size 2 -> 1)")

    other_batch = fresh(batch_size=64)
    assert restore_position(state, other_batch, 20, 1, notes.append) == 5
    assert notes.pop().endswith("the data streams start afresh (batch_size 48 -> 64)")
    assert other_batch.next_batch().equals(fresh(batch_size=64).next_batch())  # afresh: as a new run

    changed = write_split(tmp_path / "ft2", 2, 50)  # the same rows in other files: another fingerprint
    other_data = fresh(changed)
    assert restore_position(state, other_data, 20, 1, notes.append) == 5
    assert notes.pop().endswith(f"the data streams start afresh (fingerprint {split.fingerprint()} -> "
                                f"{changed.fingerprint()})")
    assert other_data.next_batch().equals(fresh(changed).next_batch())
    with pytest.raises(ValueError, match="fingerprint"):
        other_data.load_state_dict(saved)  # never old offsets on other data


def test_two_ranks_agree_on_the_counted_split_and_steps(tmp_path):
    """Real processes (gloo): every rank sums the same counts, takes 1/W of each domain; steps take the min;
    a split with fewer rows than ranks is the same UserError on every rank."""
    split_dir = tmp_path / "ft"
    write_split(split_dir, 3, 50)
    tiny = _write_rows(tmp_path / "tiny.parquet", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(split_dir), str(tiny), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["counts"] == got[1]["counts"] == list(ROWS.values())
    assert got[0]["matrix"] == got[1]["matrix"]
    assert [g["local"] for g in got] == [[200, 95, 5], [200, 95, 5]]
    assert got[0]["steps"] == got[1]["steps"] == -(-300 // 32)
    assert got[0]["error"] == got[1]["error"] != ""
    assert got[0]["error"].endswith("1 rows with a known domain for 2 ranks, rank 0 would get none: "
                                    "use fewer ranks or more data")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(split_dir: str, tiny: str, out: str) -> None:
    import torch.distributed as dist

    from iak_dist.config import OptimConfig
    from iak_dist.phases.pretrain import steps_for

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    share = count_share(Split.at(split_dir, SCHEMA), SCHEMA, rank, 2, seed=0, all_reduce=sum_over_ranks)
    steps = steps_for(OptimConfig(epochs=1, batch_size=32), int(share.rows_per_domain.sum()))
    try:
        count_share(Split.at(tiny, SCHEMA), SCHEMA, rank, 2, seed=0, all_reduce=sum_over_ranks)
        error = ""
    except UserError as exc:
        error = str(exc)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"counts": share.global_rows_per_domain.tolist(), "matrix": share.counts.tolist(),
         "local": share.rows_per_domain.tolist(), "steps": steps, "error": error}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], sys.argv[3])


def test_domain_indices_read_a_dictionary_of_the_domains_by_its_indices():
    """The prefix cache's domain column is a dictionary of the schema's domains: its indices are the answer
    (nulls -1); any other dictionary or a plain column is mapped through the names, with the same result."""
    import pyarrow as pa

    from iak_dist.data.batch import domain_indices

    domains = ["a", "b", "c"]
    own = pa.DictionaryArray.from_arrays(pa.array([0, 2, None, 1], pa.int32()), pa.array(domains))
    other = pa.DictionaryArray.from_arrays(pa.array([1, 0, None, 2], pa.int32()), pa.array(["c", "a", "b"]))
    want = [0, 2, -1, 1]
    assert domain_indices(own, domains).tolist() == want
    assert domain_indices(pa.chunked_array([own, own]), domains).tolist() == want * 2
    assert domain_indices(other, domains).tolist() == [0, 2, -1, 1]
    assert domain_indices(pa.array(["a", "c", None, "b", "x"]), domains).tolist() == [*want, -1]
    assert domain_indices(own, ["b", "a"]).tolist() == [1, -1, -1, 0]
    unsigned = pa.DictionaryArray.from_arrays(pa.array([0, 2, None, 1], pa.uint8()), pa.array(domains))
    assert domain_indices(unsigned, domains).tolist() == want
