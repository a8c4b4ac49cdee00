"""CUDA paths: NCCL, row-wise and table-row-wise sharding, FBGEMM CUDA kernels. Run on a GPU machine."""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs (NCCL, row_wise / table_row_wise sharding, FBGEMM CUDA kernels); "
           f"this machine has {torch.cuda.device_count()}",
)


@pytest.mark.parametrize("kind", ["row_wise", "table_row_wise", "table_wise"])
def test_two_gpus_train_like_one(kind, synth_dir, tmp_path):
    from test_distributed import COMMON, assert_same_backbone, plan_for, torchrun

    runs = []
    for name, procs, batch in (("two", 2, 64), ("one", 1, 128)):
        out = tmp_path / name
        spec = {"scenarios": [{"kind": "pretrain", "data": str(synth_dir), "out": str(out),
                               "overrides": COMMON + [f"pretrain.batch_size={batch}"] + plan_for(kind)}]}
        result = torchrun(spec, tmp_path, name=name, nproc=procs)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(out)
    assert_same_backbone(runs[0] / "backbone", runs[1] / "backbone")
    assert kind in (runs[0] / "backbone" / "plan.txt").read_text()
