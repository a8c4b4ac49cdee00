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
