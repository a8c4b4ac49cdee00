#!/usr/bin/env bash
# A domain that arrives later: MovieLens-100K with month domains. IAK is fine-tuned on the months before
# NEXT, then NEXT "arrives" and is added to that adapter (`finetune --add-domain`: only its kernel
# trains), and compared with IAK fine-tuned on all those months together, on the test split.
#
#   scripts/add_domain_month.sh                        # seed 0, adds 1998-04 to 1997-09 .. 1998-03
#   SEEDS="0 1 2" NEXT=1998-02 scripts/add_domain_month.sh --set finetune.optim.epochs=1
#   BACKBONES=runs/movielens-100k-month scripts/add_domain_month.sh   # reuse that run's backbones
#
# Every argument is passed to every command (config overrides). WORK: where everything goes (default
# runs/add-domain-month); BACKBONES: a run folder whose seed<N>/backbone is reused (else pre-trained here).
# `iak-dist data prepare` has no domain filter: the data of "the months so far" is the prepared month
# data with the later months' rows dropped from every split and from the schema (done below with pyarrow).
set -euo pipefail
cd "$(dirname "$0")/.."
IAK=".venv/bin/iak-dist"
PY=".venv/bin/python"
CONFIG=configs/movielens_month.yaml
WORK=${WORK:-runs/add-domain-month}
NEXT=${NEXT:-1998-04}
SEEDS=${SEEDS:-0}
DATA=$($PY -c "from iak_dist.config import load_config; print(load_config('$CONFIG', []).data.dir)")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[[ -f $DATA/schema.yaml ]] || $IAK data prepare movielens-100k --domain month --out "$DATA"

# data/{first,next}: the months before NEXT, and those months with NEXT
$PY - "$DATA" "$WORK" "$NEXT" <<'EOF'
import dataclasses, sys
from pathlib import Path
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
from iak_dist.data.schema import Schema

data, work, nxt = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
schema = Schema.load(data / "schema.yaml")
if nxt not in schema.domains or schema.domains.index(nxt) == 0:
    sys.exit(f"NEXT={nxt}: must be a month of {schema.domains} after the first")
months = schema.domains[:schema.domains.index(nxt) + 1]
for name, kept in (("first", months[:-1]), ("next", months)):
    out = work / "data" / name
    if (out / "schema.yaml").is_file():
        continue
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(data.glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.is_in(table.column("domain"), pa.array(kept))), out / path.name)
    dataclasses.replace(schema, domains=kept).save(out / "schema.yaml")
EOF

for seed in $SEEDS; do
  # one backbone per seed, shared by the three runs (first, its grown adapter, joint)
  backbone="$WORK/pretrain/seed$seed/backbone"
  if [[ ! -f $backbone/backbone.json ]]; then
    if [[ -n ${BACKBONES:-} && -f ${BACKBONES}/seed$seed/backbone/backbone.json ]]; then
      mkdir -p "$(dirname "$backbone")" && cp -r "${BACKBONES}/seed$seed/backbone" "$backbone"
    else
      $IAK pretrain "$CONFIG" --seed "$seed" --set "run_dir=$WORK/pretrain" "$@"
    fi
  fi
  for stage in first joint; do
    mkdir -p "$WORK/$stage/seed$seed"
    ln -sfn "$(realpath "$backbone")" "$WORK/$stage/seed$seed/backbone"
  done
  first="$WORK/first/seed$seed/adapters/iak"
  [[ -f $first/adapter_config.json ]] || $IAK finetune "$CONFIG" --strategy iak --seed "$seed" \
    --set "run_dir=$WORK/first" --set "data.dir=$WORK/data/first" "$@"
  [[ -f $first+$NEXT/adapter_config.json ]] || $IAK finetune "$CONFIG" --strategy iak --seed "$seed" \
    --add-domain "$NEXT" --from "$first" --set "run_dir=$WORK/first" --set "data.dir=$WORK/data/next" "$@"
  # a folder of its own: fine-tuning keeps checkpoints in <out>/../.checkpoints/<strategy>.<domain>
  b64="$WORK/first/seed$seed/batch64/iak+$NEXT"
  [[ -f $b64/adapter_config.json ]] || $IAK finetune "$CONFIG" --strategy iak --seed "$seed" \
    --add-domain "$NEXT" --from "$first" --out "$b64" --set "run_dir=$WORK/first" \
    --set "data.dir=$WORK/data/next" "$@" --set finetune.optim.batch_size=64
  [[ -f $WORK/joint/seed$seed/adapters/iak/adapter_config.json ]] || $IAK finetune "$CONFIG" --strategy iak \
    --seed "$seed" --set "run_dir=$WORK/joint" --set "data.dir=$WORK/data/next" "$@"
done

# test-split metrics of the backbone alone, the grown adapter and the joint one, by month; a table
$PY - "$WORK" "$NEXT" $SEEDS <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from iak_dist.distributed.context import close_distributed, init_distributed
from iak_dist.phases.evaluate import evaluate

work, nxt, seeds = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
ctx = init_distributed()
runs = {"backbone": None, "first months": "first/seed{}/adapters/iak", "added": "first/seed{}/adapters/iak+" + nxt,
        "added, batch 64": "first/seed{}/batch64/iak+" + nxt, "joint": "joint/seed{}/adapters/iak"}
results = {}
try:
    for seed in seeds:
        backbone = work / "pretrain" / f"seed{seed}" / "backbone"
        for name, adapter in runs.items():
            path = None if adapter is None else work / adapter.format(seed)
            data = work / "data" / ("first" if name == "first months" else "next")
            metrics = evaluate(data, backbone, path, ctx)
            summary = {} if path is None else json.loads((path / "train_summary.json").read_text())
            results.setdefault(name, {})[seed] = {"metrics": metrics, "seconds": summary.get("train/seconds", 0.0),
                                                  "steps": summary.get("train/steps", 0.0)}
finally:
    close_distributed(ctx)
(work / "results.json").write_text(json.dumps(results, indent=1))
months = [m for m in results["backbone"][seeds[0]]["metrics"] if m not in ("overall", nxt)]


def mean(name, metric, domains):
    if any(d not in results[name][seeds[0]]["metrics"] for d in domains):
        return float("nan")  # the first months' adapter does not know NEXT
    return np.mean([np.mean([results[name][s]["metrics"][d][metric] for d in domains]) for s in seeds])


print(f"| model ({len(seeds)} seed(s)) | {nxt} CTR-AUC | {nxt} LogLoss | earlier months CTR-AUC (mean) "
      f"| earlier months LogLoss (mean) | fine-tune steps | fine-tune s |")
print("|---|---|---|---|---|---|---|")
for name in runs:
    steps = np.mean([results[name][s]["steps"] for s in seeds])
    secs = np.mean([results[name][s]["seconds"] for s in seeds])
    print(f"| {name} | {mean(name, 'ctr_auc', [nxt]):.4f} | {mean(name, 'logloss', [nxt]):.4f} "
          f"| {mean(name, 'ctr_auc', months):.4f} | {mean(name, 'logloss', months):.4f} | {steps:.0f} | {secs:.1f} |")
EOF
