"""Fine-tuning's per-domain streams: each rank's share, p_d from global counts, bounded memory, exact resume."""

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
def test_ranks_read_disjoint_shares_and_each_domain_cycles_through_its_rows(tmp_path, files, row_group_size,
                                                                           by_domain):
    split = write_split(tmp_path / "ft", files, row_group_size, by_domain)
    shares = [count_share(split, SCHEMA, rank, 2, seed=4) for rank in range(2)]
    counts = sum(s.rows_per_domain for s in shares)
    assert counts.tolist() == list(ROWS.values())  # the global n_d: what p_d and rows_per_domain use
    rows_of = {}
    for rank, share in enumerate(shares):
        streams = DomainStreams(split, SCHEMA, share, counts, 32, 0.5, seed=4, rank=rank, buffer_rows=40)
        for d, stream in streams.streams.items():
            n = int(share.rows_per_domain[d])
            if by_domain:  # a stream reads only the parts holding its domain (here: its own folder)
                assert all(f"domain={SCHEMA.domains[d]}/" in part.path for part in stream.parts)
            first, second = ids(stream.take(n)), ids(stream.take(n))
            assert len(set(first)) == n and set(second) == set(first)  # an epoch: each row once
            assert first != second  # the next epoch is another order
            rows_of[rank, d] = set(first)
    for d, name in enumerate(SCHEMA.domains):
        mine = [rows_of.get((rank, d), set()) for rank in range(2)]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == ROWS[name]


def test_a_domain_missing_from_a_share_is_never_picked_there(tmp_path):
    split = write_split(tmp_path / "ft", 3, 50)
    shares = [count_share(split, SCHEMA, rank, 2, seed=0) for rank in range(2)]
    counts = sum(s.rows_per_domain for s in shares)
    without_c = next(r for r in range(2) if shares[r].rows_per_domain[2] == 0)
    other = 1 - without_c
    streams = [DomainStreams(split, SCHEMA, shares[r], counts, 64, 1.0, seed=0, rank=r) for r in range(2)]
    assert streams[without_c].missing == ["c"] and streams[other].missing == []
    np.testing.assert_allclose(streams[other].picks.probs, domain_probabilities(counts, 1.0))
    want = domain_probabilities(np.array([counts[0], counts[1], 0]), 1.0)
    np.testing.assert_allclose(streams[without_c].picks.probs, want)
    drawn = np.concatenate([streams[without_c].next_batch().column("domain").to_numpy(zero_copy_only=False)
                            for _ in range(30)])  # returns: nothing waits for c's rows
    assert "c" not in set(drawn) and len(drawn) == 30 * 64


def test_state_before_a_batch_regenerates_the_stream_and_memory_stays_bounded(tmp_path):
    split = write_split(tmp_path / "ft", 3, 50)
    share = count_share(split, SCHEMA, 0, 1, seed=2)

    def streams():
        return DomainStreams(split, SCHEMA, share, share.rows_per_domain, 48, 0.0, seed=2, buffer_rows=60)

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


def test_two_ranks_agree_on_global_counts_and_steps(tmp_path):
    """Real processes (gloo): the counts all-reduced are the split's on every rank; steps take the min."""
    split_dir = tmp_path / "ft"
    write_split(split_dir, 3, 50)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(split_dir), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["counts"] == got[1]["counts"] == list(ROWS.values())
    assert got[0]["steps"] == got[1]["steps"] == min(-(-r["local_rows"] // 32) for r in got)
    assert "domains without rows in some ranks' shares, trained by the other ranks: c (1 of 2)" in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(split_dir: str, out: str) -> None:
    import torch.distributed as dist

    from iak_dist.config import OptimConfig
    from iak_dist.phases.finetune import global_rows_per_domain
    from iak_dist.phases.pretrain import steps_for

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    share = count_share(Split.at(split_dir, SCHEMA), SCHEMA, rank, 2, seed=0)
    counts = global_rows_per_domain(share, SCHEMA, rank)
    local_rows = int(share.rows_per_domain.sum())
    steps = steps_for(OptimConfig(epochs=1, batch_size=32), local_rows)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"counts": counts.tolist(), "steps": steps, "local_rows": local_rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
