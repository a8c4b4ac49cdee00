"""The over-fitting curve of docs/results.md, "Generative pre-training": a pipeline run in this process
whose pre-training also scores the TEST split at every validation pass (for that report only: every
choice still reads the valid split). A measurement, not a product path: it wraps
`EarlyStopping.validate` rather than adding a test-reading option to the trainer.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/pretrain_test_curve.py CONFIG [--set k=v ...]
writes <run_dir>/seed<s>/test_passes.json: [[step, {"ctr_auc", "logloss", "valid_ctr_auc"}], ...]
"""
import functools
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from iak_dist.config import load_config  # noqa: E402
from iak_dist.data.parquet import ParquetReader  # noqa: E402
from iak_dist.data.source import Split  # noqa: E402
from iak_dist.distributed.context import on_every_rank, on_main  # noqa: E402
from iak_dist.orchestration.driver import run_pipeline  # noqa: E402
from iak_dist.phases import validation  # noqa: E402
from iak_dist.phases.evaluate import Spill, first_row, row_dtype, score, spill_folder, stream_metrics  # noqa: E402

path, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]
cfg = load_config(path, overrides)
original = validation.EarlyStopping.validate
passes: dict[str, list] = {}


def validate_and_test(self, step, writer=None):
    stop = original(self, step, writer)
    if self.best_root.parent.name != "pretrain":  # fine-tuning's passes: as they are
        return stop
    data_dir = Path(cfg.data.dir)
    split = Split.open(data_dir, "test", self.schema)
    source = validation.lookup_input(ParquetReader(split, self.schema, validation.VALID_BATCH, self.ctx.rank,
                                                   self.ctx.world_size), self.ctx,
                                     functools.partial(first_row, split, self.schema), self.model)
    was = source.model.training
    try:
        with spill_folder() as folder:
            spill = Spill(folder / "scored.bin", row_dtype(len(self.schema.domains)))
            on_every_rank(score, source.model, source.pairs(), spill, self.ctx.device)
            metrics = stream_metrics(spill, self.schema.domains, self.ctx, folder, has_conversion=False,
                                     has_user=False)
    finally:
        source.model.train(was)
    overall = on_main(self.ctx, lambda: metrics, share=True)["overall"]
    key = str(self.best_root)
    passes.setdefault(key, []).append([step, {"ctr_auc": overall["ctr_auc"], "logloss": overall["logloss"],
                                              "valid_ctr_auc": self.record.values[-1][1]}])
    seed_dir = self.best_root.parent.parent.parent  # <seed>/checkpoints/pretrain/best
    if self.ctx.is_main:
        (seed_dir / "test_passes.json").write_text(json.dumps(passes[key]))
    print(f"[measure] step {step}: valid AUC {self.record.values[-1][1]:.4f} test AUC {overall['ctr_auc']:.4f} "
          f"test LogLoss {overall['logloss']:.4f}", file=sys.stderr, flush=True)
    return stop


validation.EarlyStopping.validate = validate_and_test
run_pipeline(cfg, use_ray=False)
