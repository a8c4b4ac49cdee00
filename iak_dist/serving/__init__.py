"""Serving: the artefact (`artefact.export_artefact`), the `Predictor` that scores raw rows with it, batch
scoring (`score.score_parquet`) and the pipeline's export phase (`export.export_run`).

`Predictor` and `RequestError` are imported on first use (`iak_dist.serving.Predictor`): importing the
package stays light (no torch) for the CLI's `--help`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "RequestError"):
        from iak_dist.serving import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'iak_dist.serving' has no attribute {name!r}")


__all__ = ["Predictor", "RequestError"]
