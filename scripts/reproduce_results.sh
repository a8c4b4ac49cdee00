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
# IAK ablations on the age split (the table of docs/iak.md, "On the AUC-stopped, calibrated backbones"):
# each sweep pre-trains its seeds' backbones once (same seeds as the age run, so the same backbones),
# then every grid point only fine-tunes (from the prefix cache). Their tables hold the valid split's
# metrics: the split choices are made on. Each grid varies one thing from `prev`, the defaults before
# that study (linear encoder, kernels on the tower input and after every layer).
sweep() {
  local name=$1
  shift
  $IAK sweep configs/movielens_age.yaml --set "run_dir=${RUNS}/ablation-${name}" "$@"
}
PREV=(--set finetune.iak.encoder=linear --set finetune.iak.insertion=input+every_layer)
sweep lr --strategies iak,lora "${PREV[@]}" --grid finetune.optim.lr_dense=0.001,0.004,0.008 "$@"
sweep width --strategies iak "${PREV[@]}" --grid finetune.iak.width=2,8 "$@"
sweep insertion --strategies iak "${PREV[@]}" --grid finetune.iak.insertion=every_layer,input "$@"
sweep encoder --strategies iak "${PREV[@]}" --grid finetune.iak.encoder=mlp,mlp_shared --set finetune.iak.encoder_hidden=32 "$@"
sweep beta --strategies iak "${PREV[@]}" --grid finetune.iak.beta_matching=0,0.01 "$@"
sweep beta-size --strategies iak "${PREV[@]}" --grid finetune.iak.beta_size_gamma=0,1 "$@"
sweep mlp-hidden --strategies iak --set finetune.iak.insertion=input+every_layer \
  --grid finetune.iak.encoder_hidden=4,8,12,16 "$@"
sweep mlp16-insertion --strategies iak --grid finetune.iak.insertion=input,input+output "$@"
