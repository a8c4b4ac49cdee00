#!/usr/bin/env bash
# Reproduces every number of docs/results.md (about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
IAK=".venv/bin/iak-dist"
$IAK pipeline run configs/movielens_age.yaml
$IAK pipeline run configs/movielens_zip.yaml
# IAK ablations on the age split: each sweep pre-trains its seeds' backbones once (same seeds as
# the age run, so the same backbones), then every grid point only fine-tunes.
$IAK sweep configs/movielens_age.yaml --set run_dir=runs/ablation-beta --strategies iak \
  --grid finetune.iak.beta_matching=0,0.001,0.01,0.1,1
$IAK sweep configs/movielens_age.yaml --set run_dir=runs/ablation-width --strategies iak \
  --grid finetune.iak.width=2,4,8,16,32
$IAK sweep configs/movielens_age.yaml --set run_dir=runs/ablation-shape --strategies iak \
  --grid finetune.iak.insertion=output,every_layer --grid finetune.iak.form=residual,bottleneck
$IAK sweep configs/movielens_age.yaml --set run_dir=runs/ablation-schedule --strategies iak \
  --grid finetune.iak.compression_fraction=0,0.3,0.6 --grid finetune.iak.decoder_in_compression=false,true
$IAK sweep configs/movielens_age.yaml --set run_dir=runs/ablation-sampler --strategies iak,lora \
  --grid finetune.sampler_alpha=0,0.5,1
