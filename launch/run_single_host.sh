#!/usr/bin/env bash
# Run a config on one host with all its local accelerators (GPUs or a single TPU VM host).
#
#   launch/run_single_host.sh CONFIG WORKDIR [--dry-run] [extra --config.x=y flags...]
#
# Sets the persistent XLA compilation cache beside the workdir so a rerun after preemption
# resumes without recompiling, then runs the CLI. --dry-run prints the command only.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--dry-run] [--config.x=y ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
dry_run=0
extra=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then dry_run=1; else extra+=("$a"); fi
done
cmd=(env "JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$workdir/xla_cache}"
     python -m kdprune_jax.main "--config=$config" "--workdir=$workdir" "${extra[@]}")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
