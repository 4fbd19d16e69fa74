#!/usr/bin/env bash
# Run a config on one host with all its local accelerators: several GPUs or a single-host TPU VM.
#
#   launch/run_single_host.sh --config=CONFIG --workdir=DIR [--gpus=0,1,...] [--cache-dir=DIR]
#                             [--dry-run] [--config.x=y ...]
#   launch/run_single_host.sh CONFIG WORKDIR [options]     (the older positional form)
#
# One process drives every local device (the batch is sharded over a ("data",) mesh of them),
# so no distributed runtime is involved. --gpus restricts the run to some GPUs
# (CUDA_VISIBLE_DEVICES). The persistent XLA compilation cache defaults to DIR/xla_cache (or
# $JAX_COMPILATION_CACHE_DIR), so a rerun or a resume after preemption does not recompile.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/run_single_host.sh --config=CONFIG --workdir=DIR [--gpus=0,1,...] [--cache-dir=DIR]
                                 [--dry-run] [--config.x=y ...]
       launch/run_single_host.sh CONFIG WORKDIR [same options]
--dry-run prints the command and runs nothing.
EOF
}

config='' workdir='' gpus='' cache_dir=${JAX_COMPILATION_CACHE_DIR:-}
overrides=()
# The older positional form: CONFIG WORKDIR first.
if (($# >= 2)) && [[ $1 != -* && $2 != -* ]]; then
  config=$1 workdir=$2
  shift 2
fi
while (($#)); do
  arg=$1
  shift
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --config=*) config=${arg#*=} ;;
    --workdir=*) workdir=${arg#*=} ;;
    --gpus=*) gpus=${arg#*=} ;;
    --cache-dir=*) cache_dir=${arg#*=} ;;
    --config.*=*) overrides+=("$arg") ;;
    --config.*) usage_error "override '$arg' needs a value: $arg=VALUE" ;;
    *) usage_error "unknown argument '$arg'" ;;
  esac
done
require "$config" --config
require "$workdir" --workdir
[[ $workdir != gs://* ]] ||
  usage_error "--workdir='$workdir' is invalid: the program takes POSIX paths only, not gs:// URLs; mount the bucket (gcsfuse) and pass a path on the mount"
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  usage_error "--gpus='$gpus' is invalid; allowed: comma-separated GPU indices, e.g. 0,1"

env_vars=("JAX_COMPILATION_CACHE_DIR=${cache_dir:-${workdir%/}/xla_cache}")
if [[ -n $gpus ]]; then env_vars+=("CUDA_VISIBLE_DEVICES=$gpus"); fi
cmd=(env "${env_vars[@]}" python -m kdprune_jax.main "--config=$config" "--workdir=$workdir"
     "${overrides[@]}")
if ((DRY_RUN)); then
  quote "${cmd[@]}"
  exit 0
fi
printf '+ %s\n' "$(quote "${cmd[@]}")" >&2
# exec: the run replaces this shell, so a signal (Ctrl-C, a scheduler's SIGTERM) reaches it.
exec "${cmd[@]}"
