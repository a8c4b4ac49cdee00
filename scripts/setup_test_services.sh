#!/usr/bin/env bash
# Installs what the launcher tests run against: Debian's SLURM (slurmctld, slurmd, client) and munge.
# Needs root and apt; elsewhere it says so and the SLURM tests skip with that reason.
set -uo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "[setup] SLURM not installed and cannot install it here (needs root + apt): SLURM tests will skip" >&2
  exit 0
fi
echo "[setup] installing slurm-wlm and munge from Debian (a few seconds)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
  || echo "[setup] apt-get could not install slurm-wlm/munge: SLURM tests will skip" >&2
