"""Calibration of the pre-trained heads: the fit against a direct minimiser, and the exported heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iak_dist.phases.calibration import LOGITS, esmm_loss_sum, fit
from iak_dist.phases.evaluate import Spill


def spilled_rows(tmp_path, rows: int = 5000, seed: int = 0) -> Spill:
    """Over-confident logits: the labels follow sigmoid(0.4 l - 0.3) and sigmoid(0.6 m + 0.2)."""
    rng = np.random.default_rng(seed)
    records = np.empty(rows, dtype=LOGITS)
    records["ctr"], records["cvr"] = rng.normal(0, 3, rows), rng.normal(0, 2, rows)
    click = rng.random(rows) < 1 / (1 + np.exp(-(0.4 * records["ctr"] - 0.3)))
    convert = rng.random(rows) < 1 / (1 + np.exp(-(0.6 * records["cvr"] + 0.2)))
    records["click"], records["conversion"] = click, click & convert
    spill = Spill(tmp_path / "logits.bin", LOGITS)
    spill.append(records)
    return spill


@pytest.mark.parametrize("with_conversion", [True, False])
def test_the_fit_is_the_minimum_a_direct_minimiser_finds(tmp_path, monkeypatch, with_conversion):
    """Newton over chunks of the spill (small chunks: the sums across them) reaches the minimum L-BFGS
    finds on all rows at once, and lowers the mean ESMM loss; without a conversion label the CVR pair
    stays the identity."""
    import iak_dist.phases.evaluate as evaluate

    spill = spilled_rows(tmp_path)
    monkeypatch.setattr(evaluate, "READ_ROWS", 700)
    result = fit(spill, with_conversion)
    rows = np.concatenate(list(spill.chunks()))

    theta = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                              line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = esmm_loss_sum(theta, rows, with_conversion) / len(rows)
        loss.backward()
        return loss

    lbfgs.step(closure)
    reference = theta.detach().numpy()
    fitted = np.array([result.ctr_scale, result.ctr_bias, result.cvr_scale, result.cvr_bias])
    free = 4 if with_conversion else 2
    np.testing.assert_allclose(fitted[:free], reference[:free], atol=1e-5)
    assert 0.3 < result.ctr_scale < 0.5  # the labels' own slope, roughly
    if not with_conversion:
        assert (result.cvr_scale, result.cvr_bias) == (1.0, 0.0)
    assert result.valid_loss_after == pytest.approx(float(closure()), rel=1e-9)
    assert result.valid_loss_after < result.valid_loss_before
    assert fit(Spill(tmp_path / "empty.bin", LOGITS), with_conversion) is None


def test_the_calibrated_export_is_the_plain_one_with_the_fit_folded_into_the_heads(tmp_path, synth_dir, ctx):
    """Same seed, same steps: every exported tensor equals the uncalibrated run's, but the heads, which
    are a W and a b + c for the fitted (a, c); the summary carries the fit."""
    from iak_dist.config import load_config
    from iak_dist.distributed.checkpoint import load_backbone_weights
    from iak_dist.phases.pretrain import pretrain

    base = ["model.tower=[32, 16]", "model.embedding_dim=8", "pretrain.steps=40", "pretrain.batch_size=64",
            "pretrain.lr_dense=0.03"]
    summaries = {}
    for name, calibrate in (("plain", "false"), ("calibrated", "true")):
        cfg = load_config(None, [*base, f"pretrain.calibrate={calibrate}"])
        summaries[name] = pretrain(synth_dir, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path / name, ctx,
                                   show_progress=False)
    plain = load_backbone_weights(tmp_path / "plain" / "backbone")
    calibrated = load_backbone_weights(tmp_path / "calibrated" / "backbone")
    heads = {f"{head}.{p}" for head in ("ctr_head", "cvr_head") for p in ("weight", "bias")}
    assert plain.keys() == calibrated.keys()
    assert all(torch.equal(plain[k], calibrated[k]) for k in plain if k not in heads)
    summary = summaries["calibrated"]
    assert "calibration/ctr_scale" not in summaries["plain"]
    for head in ("ctr", "cvr"):
        scale, bias = summary[f"calibration/{head}_scale"], summary[f"calibration/{head}_bias"]
        assert torch.equal(calibrated[f"{head}_head.weight"], plain[f"{head}_head.weight"] * scale)
        assert torch.equal(calibrated[f"{head}_head.bias"], plain[f"{head}_head.bias"] * scale + bias)


def test_calibration_without_a_valid_split_is_refused_before_training(tmp_path, synth_dir, ctx):
    import shutil

    from iak_dist.config import load_config
    from iak_dist.errors import UserError
    from iak_dist.phases.pretrain import pretrain

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "valid.parquet").unlink()
    cfg = load_config(None, ["pretrain.steps=5", "pretrain.calibrate=true"])
    with pytest.raises(UserError, match="valid"):
        pretrain(data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path / "run", ctx, show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
