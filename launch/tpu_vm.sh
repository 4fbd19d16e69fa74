#!/usr/bin/env bash
# Cloud TPU VM lifecycle for kdprune_jax, one subcommand per step:
#
#   launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE --project=PROJECT [options] [--dry-run]
#
#   create  make the TPU VM (with --queued: a queued resource that becomes it when capacity frees)
#   status  describe it (a queued resource is usable once its state is ACTIVE)
#   setup   install gcsfuse, mount the bucket (--bucket), put the code on every worker and
#           install it with jax[tpu] in a virtualenv
#   run     (re)mount the bucket, start the same `python -m kdprune_jax.main` on every worker,
#           in the background
#   logs    follow the run's log on worker 0 (or --worker=N, or all workers)
#   stop    stop the run on every worker: SIGTERM, then wait up to --grace seconds (default
#           300) for it to save the step it finished and exit (kdprune_jax/preemption.py),
#           report the step saved; SIGKILL only after the grace period
#   ssh     a shell on a worker, or `-- COMMAND` on --worker=N|all
#   delete  delete the TPU VM (with --queued: the queued resource and the VM with it)
#
# Where the code comes from (setup): by default the HEAD commit of the checkout this script is
# in (`git archive`, copied to the workers with scp), so it needs no public repository and runs
# exactly a committed version; uncommitted changes are NOT shipped. --git-url=URL [--git-ref=REF]
# clones on the workers instead. Either way the workers get a source tree, not only the wheel,
# because the configs (configs/*.py) are not part of the installed package.
#
# Layout on each worker, relative to the ssh user's home (where gcloud ssh starts):
#   kdprune_jax/   the source tree; runs start here so --config=configs/... resolves
#   kdprune_venv/  virtualenv: the package (editable) + jax[tpu]
#   kdprune.log    the run's stdout and stderr      kdprune.pid  the run's process group id
#
# Storage: the program reads and writes POSIX paths only (open(), np.memmap, os.replace,
# orbax on a local path); it does not accept gs:// URLs. The bucket is mounted on every worker
# with gcsfuse (Cloud Storage FUSE) at /gcs/BUCKET, and the run gets --workdir=/gcs/BUCKET/...
# (and typically TFDS_DATA_DIR=/gcs/BUCKET/tensorflow_datasets): one directory every worker
# sees, as multi-host checkpoints need, that outlives the VM (a worker's disk goes with
# `delete`). The XLA compilation cache stays on each worker's local disk: each worker compiles
# its own program, and a cache on FUSE would be slow.
#
# A run on a multi-host slice is the same command on every worker: the program joins JAX's
# distributed runtime (--distributed=on; on TPU VMs JAX finds the other workers itself).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE --project=PROJECT [options] [--dry-run]
  create --accelerator-type=TYPE --runtime-version=VERSION [--queued] [--spot]
  status [--queued]
  setup  [--bucket=NAME] [--git-url=URL [--git-ref=REF]] [--jax=PIP_SPEC (default jax[tpu])]
  run    --config=CONFIG --workdir=/gcs/NAME/... [--bucket=NAME] [--tfds-data-dir=DIR]
         [--cache-dir=DIR] [--env=KEY=VALUE ...] [--config.x=y ...]
  logs   [--worker=N|all (default 0)]
  stop   [--grace=SECONDS (default 300)]
  ssh    [--worker=N|all (default 0)] [-- COMMAND ...]
  delete [--queued]
setup/run/logs/stop/ssh also take --ssh-flag=FLAG (repeatable, passed to gcloud ssh/scp,
e.g. --ssh-flag=--tunnel-through-iap). --dry-run prints the commands and runs nothing.
--bucket=NAME (no gs://) is mounted with gcsfuse at /gcs/NAME on every worker; the program
takes POSIX paths only, so --workdir and --tfds-data-dir are paths on that mount.
EOF
}

# Files on the workers (see the header).
SRC=kdprune_jax VENV=kdprune_venv LOG=kdprune.log PIDFILE=kdprune.pid
TARBALL=kdprune_jax-src.tar.gz
# Remote shell test: is a run started by `run` still alive on this worker? Checks the command
# line too, so a stale pid file (after a reboot) never makes `stop` signal an unrelated process.
ALIVE="[ -e $PIDFILE ] && ps -o args= -p \"\$(cat $PIDFILE)\" 2>/dev/null | grep -q kdprune_jax.main"
# Refuse to start or reinstall under a live run: the TPU chips can be held by one process only,
# and a second run would fail obscurely ("TPU in use") or have its code replaced under it.
REFUSE_IF_RUNNING="if $ALIVE; then echo \"a run is still going on \$(hostname); use stop\" >&2; exit 1; fi"
# apt-get on the workers. DPkg::Lock::Timeout: on a fresh VM unattended-upgrades may hold the
# dpkg lock for a few minutes; wait for it instead of failing.
APT="sudo apt-get -qq -o DPkg::Lock::Timeout=300"

# --- gcsfuse (Cloud Storage FUSE) on the workers -------------------------------------------
# Installed by `setup` when missing, from Google's apt repository, as documented in
# https://cloud.google.com/storage/docs/cloud-storage-fuse/install : the repository for this
# Ubuntu release (gcsfuse-jammy, ...), signed by Google's key stored where the source names it.
KEYRING=/usr/share/keyrings/cloud.google.asc
# shellcheck disable=SC2016  # $(lsb_release ...) is expanded on the worker, not here
GCSFUSE_SOURCE='deb [signed-by='$KEYRING'] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main'
install_steps=(
  "echo \"$GCSFUSE_SOURCE\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
  "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $KEYRING > /dev/null"
  "$APT update"
  "$APT install -y gcsfuse"
)
printf -v INSTALL_GCSFUSE '%s && ' "${install_steps[@]}"
INSTALL_GCSFUSE="{ command -v gcsfuse > /dev/null || { ${INSTALL_GCSFUSE% && }; }; }"
# Buckets are mounted at /gcs/NAME, the same path on every worker.
MOUNT_ROOT=/gcs

# mount_bucket NAME: remote shell line that mounts gs://NAME at /gcs/NAME unless it already is
# mounted (so it is safe to repeat, and `run` remounts after a worker reboot). The mount point
# is owned by the ssh user, who runs gcsfuse and the program. --implicit-dirs: directories that
# exist only as object-name prefixes (e.g. data uploaded with gcloud storage cp) are visible.
# --rename-dir-limit: gcsfuse renames a directory (copy + delete of each object) only up to
# this many objects, and the program renames small directories: stale checkpoints are moved
# aside, orbax commits a checkpoint by renaming its temporary directory.
mount_bucket() {
  local dir=$MOUNT_ROOT/$1
  printf '%s' "{ mountpoint -q $dir || { sudo mkdir -p $dir && sudo chown \"\$(id -un)\" $dir" \
    " && gcsfuse --implicit-dirs --rename-dir-limit=200000 $1 $dir; }; }"
}

# check_bucket NAME FLAG: the characters GCS allows in a bucket name (which also keeps the
# remote command line safe; a name GCS rejects otherwise fails when gcsfuse mounts it).
BUCKET_NAME='^[a-z0-9]([-_.a-z0-9]*[a-z0-9])?$'
check_bucket() {
  [[ $1 != gs://* ]] || usage_error "$2='$1' is invalid; give the bucket name without gs://"
  [[ $1 =~ $BUCKET_NAME ]] ||
    usage_error "$2='$1' is invalid; allowed: a bucket name (lowercase letters, digits, '-', '_', '.')"
}

# check_path VALUE FLAG: an absolute POSIX path on the workers; a gs:// URL is refused with the
# way to reach the bucket instead.
check_path() {
  [[ $1 != gs://* ]] ||
    usage_error "$2='$1' is invalid: the program takes POSIX paths only, not gs:// URLs; mount the bucket with --bucket=NAME and pass $2=$MOUNT_ROOT/NAME/..."
  [[ $1 == /* ]] ||
    usage_error "$2='$1' is invalid; allowed: an absolute path on the workers (e.g. $MOUNT_ROOT/BUCKET/...)"
}

# bucket_of PATH: the bucket NAME when PATH is under /gcs/NAME (its mount point), else nothing.
bucket_of() {
  if [[ $1 =~ ^$MOUNT_ROOT/([^/]+)(/|$) ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}

cmd=${1:-}
if [[ -z $cmd || ($cmd == -* && $cmd != -h && $cmd != --help) ]]; then
  usage_error "missing COMMAND, the first argument (create, status, setup, run, logs, stop, ssh, delete)"
fi
shift
case $cmd in
  create) allowed="--accelerator-type --runtime-version --queued --spot" ;;
  status | delete) allowed="--queued" ;;
  setup) allowed="--bucket --git-url --git-ref --jax --ssh-flag" ;;
  run) allowed="--config --workdir --bucket --tfds-data-dir --cache-dir --env --ssh-flag" ;;
  logs | ssh) allowed="--worker --ssh-flag" ;;
  stop) allowed="--grace --ssh-flag" ;;
  -h | --help) usage; exit 0 ;;
  *) usage_error "unknown COMMAND '$cmd' (create, status, setup, run, logs, stop, ssh, delete)" ;;
esac

name='' zone='' project='' accel='' runtime='' queued=0 spot=0 git_url='' git_ref=''
jax_spec='jax[tpu]' config='' workdir='' bucket='' tfds_dir='' cache_dir='' worker=0 grace=300
envs=() overrides=() ssh_flags=() user_cmd=()
while (($#)); do
  arg=$1
  shift
  key=${arg%%=*}
  if [[ $cmd == run && $arg == --config.* ]]; then
    [[ $arg == *=* ]] || usage_error "override '$arg' needs a value: $arg=VALUE"
    overrides+=("$arg")
    continue
  fi
  if [[ $cmd == ssh && $arg == -- ]]; then
    user_cmd=("$@")
    break
  fi
  [[ " --name --zone --project --dry-run $allowed " == *" $key "* ]] ||
    usage_error "unknown argument '$arg' for $cmd"
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --name=*) name=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --project=*) project=${arg#*=} ;;
    --accelerator-type=*) accel=${arg#*=} ;;
    --runtime-version=*) runtime=${arg#*=} ;;
    --git-url=*) git_url=${arg#*=} ;;
    --git-ref=*) git_ref=${arg#*=} ;;
    --jax=*) jax_spec=${arg#*=} ;;
    --config=*) config=${arg#*=} ;;
    --workdir=*) workdir=${arg#*=} ;;
    --bucket=*) bucket=${arg#*=} ;;
    --tfds-data-dir=*) tfds_dir=${arg#*=} ;;
    --cache-dir=*) cache_dir=${arg#*=} ;;
    --worker=*) worker=${arg#*=} ;;
    --grace=*) grace=${arg#*=} ;;
    --env=*) envs+=("${arg#*=}") ;;
    --ssh-flag=*) ssh_flags+=("${arg#*=}") ;;
    *=*) usage_error "$key takes no value" ;;
    *) usage_error "$key needs a value: $key=VALUE" ;;
  esac
done

require "$name" --name
require "$zone" --zone
require "$project" --project
# GCP resource names: lowercase letters, digits and hyphens, starting with a letter. Checked
# here so a typo fails before any gcloud call.
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name='$name' is invalid; allowed: lowercase letters, digits, '-', starting with a letter"
[[ $worker =~ ^([0-9]+|all)$ ]] || usage_error "--worker='$worker' is invalid; allowed: a number or all"
[[ $grace =~ ^[0-9]+$ ]] || usage_error "--grace='$grace' is invalid; allowed: a whole number of seconds"

tpu=(gcloud compute tpus tpu-vm)
queue=(gcloud compute tpus queued-resources)
where=("--project=$project" "--zone=$zone")

# on_workers WORKER REMOTE_COMMAND: run a shell command line on one or all workers. In a
# dry-run the command line is also shown unescaped on stderr: the %q form is hard to read.
on_workers() {
  if ((DRY_RUN)); then printf '# on worker %s: %s\n' "$1" "$2" >&2; fi
  run "${tpu[@]}" ssh "$name" "${where[@]}" "--worker=$1" "${ssh_flags[@]}" "--command=$2"
}

case $cmd in
  create)
    require "$accel" --accelerator-type
    require "$runtime" --runtime-version
    opt=()
    if ((spot)); then opt+=(--spot); fi
    if ((queued)); then
      # The queued resource has the same id as the node it creates, so one --name serves both.
      run "${queue[@]}" create "$name" "--node-id=$name" "${where[@]}" \
        "--accelerator-type=$accel" "--runtime-version=$runtime" "${opt[@]}"
    else
      run "${tpu[@]}" create "$name" "${where[@]}" \
        "--accelerator-type=$accel" "--version=$runtime" "${opt[@]}"
    fi
    ;;
  status)
    if ((queued)); then run "${queue[@]}" describe "$name" "${where[@]}"
    else run "${tpu[@]}" describe "$name" "${where[@]}"; fi
    ;;
  setup)
    [[ -n $git_url || -z $git_ref ]] || usage_error "--git-ref needs --git-url"
    prepare=$INSTALL_GCSFUSE
    if [[ -n $bucket ]]; then
      check_bucket "$bucket" --bucket
      prepare+=" && $(mount_bucket "$bucket")"
    fi
    if [[ -n $git_url ]]; then
      fetch="git clone -q $(quote "$git_url") $SRC"
      if [[ -n $git_ref ]]; then fetch+=" && git -C $SRC checkout -q $(quote "$git_ref")"; fi
    else
      local_tar=${TMPDIR:-/tmp}/$TARBALL
      if ((!DRY_RUN)) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
        echo "warning: uncommitted changes in $REPO_ROOT are not shipped (setup sends HEAD)" >&2
      fi
      run git -C "$REPO_ROOT" archive --format=tar.gz "--prefix=$SRC/" "--output=$local_tar" HEAD
      run "${tpu[@]}" scp "$local_tar" "$name:$TARBALL" "${where[@]}" --worker=all "${ssh_flags[@]}"
      fetch="tar -xzf $TARBALL && rm $TARBALL"
    fi
    # Some images lack python3-venv (ensurepip): install it only when creating the venv fails.
    venv="{ python3 -m venv $VENV || { $APT update && $APT install -y python3-venv && python3 -m venv $VENV; }; }"
    pip="$VENV/bin/python -m pip install -q"
    # One pip call for the package and jax[tpu], so the resolver picks matching jax/libtpu.
    # gcsfuse and the mount first: a bucket the VM's service account cannot read fails fast.
    on_workers all "$REFUSE_IF_RUNNING; $prepare && rm -rf $SRC && $fetch && $venv && $pip --upgrade pip && $pip -e ./$SRC $(quote "$jax_spec")"
    ;;
  run)
    require "$config" --config
    require "$workdir" --workdir
    check_path "$workdir" --workdir
    if [[ -n $tfds_dir ]]; then check_path "$tfds_dir" --tfds-data-dir; fi
    if [[ -n $cache_dir ]]; then check_path "$cache_dir" --cache-dir; fi
    for kv in "${envs[@]}"; do
      [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env='$kv' is invalid; allowed: KEY=VALUE"
    done
    # The buckets to (re)mount before starting, so a worker rebooted since setup (its mount
    # gone) still runs: --bucket, and any bucket the workdir or the TFDS data is under.
    buckets=()
    if [[ -n $bucket ]]; then check_bucket "$bucket" --bucket; buckets+=("$bucket"); fi
    for flag in --workdir --tfds-data-dir; do
      if [[ $flag == --workdir ]]; then path=$workdir; else path=$tfds_dir; fi
      b=$(bucket_of "$path")
      [[ -z $b || $b =~ $BUCKET_NAME ]] ||
        usage_error "$flag='$path' is invalid: '$b' (under $MOUNT_ROOT/) is not a bucket name"
      if [[ -n $b && " ${buckets[*]} " != *" $b "* ]]; then buckets+=("$b"); fi
    done
    if [[ -z $(bucket_of "$workdir") ]]; then
      echo "warning: --workdir='$workdir' is not under a bucket mount ($MOUNT_ROOT/BUCKET/...): every worker must see the same directory, and a worker's disk goes with \`delete\`" >&2
    fi
    prepare=''
    for b in "${buckets[@]}"; do prepare+="$(mount_bucket "$b") && "; done
    # The persistent compilation cache (a rerun or a resume after preemption skips
    # recompiling) on each worker's own disk by default: each worker compiles its own program,
    # and a cache on FUSE would be slow. PYTHONUNBUFFERED so `logs` shows lines as printed.
    if [[ -n $cache_dir ]]; then cache=$(quote "JAX_COMPILATION_CACHE_DIR=$cache_dir")
    else cache="JAX_COMPILATION_CACHE_DIR=\"\$HOME\"/kdprune_xla_cache"; fi
    exports=(PYTHONUNBUFFERED=1)
    if [[ -n $tfds_dir ]]; then exports+=("TFDS_DATA_DIR=$tfds_dir"); fi
    exports+=("${envs[@]}")
    # --distributed=on: every worker joins JAX's distributed runtime (the program would detect
    # a multi-host TPU VM by itself; explicit here, as this always is a TPU VM).
    main=$(quote python -m kdprune_jax.main "--config=$config" "--workdir=$workdir" \
      --distributed=on "${overrides[@]}")
    # setsid: the run gets its own process group (id saved in kdprune.pid), so `stop` ends it
    # and its data-loading children together; nohup + redirects: it outlives this ssh session.
    on_workers all "$REFUSE_IF_RUNNING; ${prepare}cd $SRC && . ../$VENV/bin/activate && export $cache $(quote "${exports[@]}") && { setsid nohup $main > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PIDFILE; }"
    ;;
  logs)
    follow="tail -n 100 -F $LOG"
    # From all workers the lines interleave: prefix each with its worker's hostname.
    if [[ $worker == all ]]; then follow+=" | sed -u \"s/^/[\$(hostname)] /\""; fi
    on_workers "$worker" "$follow"
    ;;
  stop)
    # SIGTERM asks the run to save the step it finished and exit (one line in the log:
    # "... checkpoint of step N saved in DIR ..."); SIGKILL only if it is still alive after
    # the grace period (the last committed checkpoint is intact either way).
    saved="grep -o 'checkpoint of step [0-9]* saved in [^;]*' $LOG | tail -n 1"
    on_workers all "if $ALIVE; then g=\$(cat $PIDFILE); kill -TERM -- -\$g; i=0; while [ \$i -lt $grace ] && $ALIVE; do sleep 1; i=\$((i + 1)); done; if $ALIVE; then kill -KILL -- -\$g; echo \"the run on \$(hostname) did not stop within ${grace} s: killed (SIGKILL); a rerun resumes from its last committed checkpoint\"; else s=\$($saved); echo \"stopped the run on \$(hostname)\${s:+: \$s}\"; fi; else echo \"no run going on \$(hostname)\"; fi"
    ;;
  ssh)
    if ((${#user_cmd[@]})); then
      # Like ssh(1): the words after -- form one command line for the remote shell.
      on_workers "$worker" "${user_cmd[*]}"
    else
      [[ $worker != all ]] || usage_error "--worker=all needs a command: ssh --worker=all -- COMMAND"
      run "${tpu[@]}" ssh "$name" "${where[@]}" "--worker=$worker" "${ssh_flags[@]}"
    fi
    ;;
  delete)
    # --quiet: no interactive confirmation, so the command also works from scripts.
    if ((queued)); then
      # --force deletes the TPU VM the queued resource created along with the request.
      run "${queue[@]}" delete "$name" "${where[@]}" --force --quiet
    else
      run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    fi
    ;;
esac
