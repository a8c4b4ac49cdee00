"""DenseEngine: the dense update DeepSpeed would make, whichever side does the clipping."""

import dataclasses

import pytest
import torch

from iak_dist.config import ZeroConfig
from iak_dist.distributed.zero import DenseEngine


def train(zero: ZeroConfig, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    engine = DenseEngine({"mlp": mlp}, lr=0.05, weight_decay=0.01, cfg=zero, micro_batch=64, world_size=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen) * 30  # gradients far above the clipping norm
        engine.backward(((mlp(x) - 5.0) ** 2).mean())
        engine.step()
    return [p.detach().clone() for p in mlp.parameters()]


@pytest.mark.parametrize("fused", [True, False])
def test_stage0_clipping_matches_deepspeeds_own(ctx, fused):
    """Stage 0 clips with PyTorch's foreach kernel; ZeRO-1 clips inside DeepSpeed: same update."""
    ours = train(ZeroConfig(stage=0, gradient_clipping=0.5, fused_optimizer=fused))
    theirs = train(ZeroConfig(stage=1, gradient_clipping=0.5, fused_optimizer=fused))
    unclipped = train(ZeroConfig(stage=0, gradient_clipping=0.0, fused_optimizer=fused))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(ours, unclipped, strict=True))


def test_clipping_passed_through_to_deepspeed_wins(ctx):
    """A `gradient_clipping` in the pass-through DeepSpeed section overrides ours, as documented."""
    zero = ZeroConfig(stage=0, gradient_clipping=1.0, deepspeed={"gradient_clipping": 0.0})
    for a, b in zip(train(zero), train(dataclasses.replace(zero, deepspeed={}, gradient_clipping=0.0)),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("zero, where", [
    (ZeroConfig(bf16=True), "distributed.zero.bf16"),
    (ZeroConfig(deepspeed={"bf16": {"enabled": True}}), "distributed.zero.deepspeed.bf16"),
    (ZeroConfig(stage=2, deepspeed={"fp16": {"enabled": True}}), "distributed.zero.deepspeed.fp16"),
])
def test_mixed_precision_is_refused_in_one_line_before_deepspeed_starts(ctx, zero, where):
    """bf16 dense weights fed the float32 activations of the embeddings failed at the first step with
    "Float and BFloat16": refused at engine build, naming the key."""
    from iak_dist.errors import UserError

    with pytest.raises(UserError, match=f"^{where}: mixed precision of the dense part is not supported") as err:
        DenseEngine({"mlp": torch.nn.Linear(4, 1)}, 0.1, 0.0, zero, micro_batch=8, world_size=1)
    assert "\n" not in str(err.value)


def test_pretrain_with_bf16_is_a_one_line_error(synth_dir, tmp_path, capsys):
    from iak_dist.cli import main

    code = main(["pretrain", "configs/movielens_age.yaml", "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "data.source=parquet", "--set", f"data.dir={synth_dir}",
                 "--set", "distributed.zero.bf16=true"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: --set distributed.zero.bf16=true: key distributed.zero.bf16: mixed precision")
    assert not (tmp_path / "run").exists()  # refused at load, before anything is written


def test_deepspeed_accelerator_must_be_the_models_device(ctx, monkeypatch):
    """With DS_ACCELERATOR=cpu on a CUDA machine, DeepSpeed would move the dense modules to the CPU while the
    tables sit on the GPU: a mismatch between its accelerator and the modules' device is refused."""
    import deepspeed.accelerator

    from iak_dist.errors import UserError

    class Cuda:
        def device_name(self, index=None):
            return "cuda"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Cuda())
    with pytest.raises(UserError, match="DeepSpeed's accelerator is cuda .* but the model is on cpu"):
        DenseEngine({"mlp": torch.nn.Linear(4, 1)}, 0.1, 0.0, ZeroConfig(), micro_batch=8, world_size=1)


@pytest.mark.parametrize("devices, hidden, expected", [
    ((), None, "cpu"),                          # no NVIDIA device node: tell DeepSpeed (no probing, no warning)
    (("/dev/nvidiactl", "/dev/nvidia0"), None, None),  # a GPU: DeepSpeed detects CUDA itself
    (("/dev/nvidiactl", "/dev/nvidia0"), "", "cpu"),   # GPUs hidden with CUDA_VISIBLE_DEVICES=""
])
def test_ds_accelerator_follows_the_machine(monkeypatch, devices, hidden, expected):
    import os

    from iak_dist import runtime

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if hidden is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    real_exists = os.path.exists
    monkeypatch.setattr(runtime.os.path, "exists",
                        lambda p: p in devices or (not str(p).startswith("/dev/nvidia") and real_exists(p)))
    runtime.configure_environment()
    assert os.environ.get("DS_ACCELERATOR") == expected


def test_a_stale_deepspeed_extension_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A process killed while DeepSpeed loads its shm comm op leaves a lock every later run waits on forever."""
    import os
    import time

    from iak_dist.distributed.zero import STALE_LOCK_S, clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py312_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    old = time.time() - STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    assert clear_stale_extension_locks() == [stale]
    assert not stale.exists() and fresh.exists()  # a build in progress keeps its lock
