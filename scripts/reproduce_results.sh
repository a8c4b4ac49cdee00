#!/usr/bin/env bash
# Reproduces every number of docs/results.md: MovieLens-100K with age, zip and month (period) domains,
# 3 seeds, every strategy of the configs, then the IAK ablations; `scripts/results_tables.py` turns the
# runs into the tables.
#
#   scripts/reproduce_results.sh                          # the full runs, into runs/
#   RUNS=/tmp/r ABLATIONS=0 scripts/reproduce_results.sh --set pretrain.epochs=0.2 \
#     --set finetune.optim.steps=5 --set 'seeds=[0]'     # a quick check of the whole chain
#
# Every argument is passed to every command (config overrides). RUNS: where the runs go (default
# runs); ABLATIONS=0 skips the sweeps. Each pipeline reuses its prepared data and finished phases.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
IAK=".venv/bin/iak-dist"
RUNS=${RUNS:-runs}
for domain in age zip month; do
  $IAK pipeline run "configs/movielens_${domain}.yaml" --set "run_dir=${RUNS}/movielens-100k-${domain}" "$@"
done
[[ ${ABLATIONS:-1} == 0 ]] && exit 0
# IAK ablations on the age split: each sweep pre-trains its seeds' backbones once (same seeds as
# the age run, so the same backbones), then every grid point only fine-tunes. Their tables hold the
# valid split's metrics: the split choices are made on.
sweep() {
  local name=$1
  shift
  $IAK sweep configs/movielens_age.yaml --set "run_dir=${RUNS}/ablation-${name}" "$@"
}
# Each grid varies one thing from the defaults (iak_dist/model/strategies/iak.py), as in docs/iak.md.
sweep beta --strategies iak --grid finetune.iak.beta_matching=0,0.001,0.01,0.1 "$@"
sweep width --strategies iak --grid finetune.iak.width=2,4,8 "$@"
sweep insertion --strategies iak --grid finetune.iak.insertion=every_layer,input,input+every_layer "$@"
sweep encoder --strategies iak --grid finetune.iak.encoder=linear,mlp,mlp_shared "$@"
sweep start --strategies iak --grid finetune.iak.init_std=0.01,0.1 --grid finetune.iak.logvar_init=0,-3 "$@"
sweep beta-size --strategies iak --grid finetune.iak.beta_size_gamma=0,0.5,1 "$@"
sweep compression --strategies iak \
  --grid finetune.iak.compression_fraction=0,0.3 --grid finetune.iak.decoder_in_compression=false,true "$@"
sweep sampler --strategies iak,lora --grid finetune.sampler_alpha=0,0.5,1 "$@"
