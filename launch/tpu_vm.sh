#!/usr/bin/env bash
# bigtrain on a Cloud TPU VM (one host or a multi-host slice), driven by gcloud from your machine.
#
#   launch/tpu_vm.sh create --name NAME --zone ZONE [--accelerator v5p-8] [--version V] [--project P]
#   launch/tpu_vm.sh run    --name NAME --zone ZONE [--project P] -- --config configs/x.py --workdir DIR
#   launch/tpu_vm.sh logs   --name NAME --zone ZONE [--project P] [--worker 0]
#   launch/tpu_vm.sh delete --name NAME --zone ZONE [--project P]
#
# --dry-run prints every command exactly as it would run (one per line) and runs nothing.
#
# `run` copies this working tree (tracked files plus untracked ones git does not ignore, so
# uncommitted edits travel and no repository credentials are needed on the VM) to every worker,
# installs it with the TPU build of the pinned jax into ~/venv (Python 3.11 via uv: the base
# images ship 3.10), and starts `python -m bigtrain.main ARGS` under nohup on all workers at once
# with BIGTRAIN_DISTRIBUTED=jax, so each worker calls jax.distributed.initialize() and JAX reads
# the slice's topology from the TPU metadata. Output goes to ~/bigtrain.log on each worker; `logs`
# follows worker 0's (only process 0 writes metrics and progress). On a multi-host slice every
# worker writes its part of each checkpoint, so --workdir must be a directory all workers share
# (e.g. a gcsfuse or Filestore mount). Re-running `run` resumes from the workdir's checkpoints.
set -euo pipefail

usage() {
  cat >&2 << 'EOF'
usage: launch/tpu_vm.sh create --name NAME --zone ZONE [--accelerator v5p-8] [--version V]
                               [--project P] [--dry-run]
       launch/tpu_vm.sh run    --name NAME --zone ZONE [--project P] [--dry-run] -- BIGTRAIN_ARGS
       launch/tpu_vm.sh logs   --name NAME --zone ZONE [--project P] [--worker 0] [--dry-run]
       launch/tpu_vm.sh delete --name NAME --zone ZONE [--project P] [--dry-run]
EOF
  exit 2
}

quote() {  # one argument, quoted like Python's shlex.quote
  if [[ -z $1 ]]; then
    printf "''"
  elif [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

join() {  # the arguments as one shell line
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}

run() {  # prints the command under --dry-run, else runs it
  if ((DRY_RUN)); then join "$@"; echo; else "$@"; fi
}

run_shell() {  # the same for a pipeline, given as one string
  if ((DRY_RUN)); then echo "$1"; else bash -o pipefail -c "$1"; fi
}

[[ $# -ge 1 ]] || usage
ACTION=$1
shift
case $ACTION in create | run | logs | delete) ;; -h | --help) usage ;; *) usage ;; esac

NAME="" ZONE="" PROJECT="" ACCELERATOR=v5p-8 VERSION=tpu-ubuntu2204-base WORKER=0 DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --accelerator) ACCELERATOR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --worker) WORKER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; ARGS=("$@"); break ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[[ -n $NAME && -n $ZONE ]] || { echo "--name and --zone are required" >&2; usage; }
if [[ $ACTION == run && ${#ARGS[@]} -eq 0 ]]; then
  echo "run needs bigtrain's arguments after --, e.g. -- --config configs/x.py --workdir DIR" >&2
  usage
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHERE=(--zone="$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
JAX_VERSION=$(sed -n 's/.*"jax\[cpu\]==\([^"]*\)".*/\1/p' "$REPO/pyproject.toml")
TARBALL=/tmp/bigtrain-$NAME.tar.gz

case $ACTION in
  create)
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION"
    ;;
  run)
    run_shell "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard \
| tar -czf $(quote "$TARBALL") -C $(quote "$REPO") --null -T -"
    run "${TPU[@]}" scp "$TARBALL" "$NAME:bigtrain.tar.gz" --worker=all "${WHERE[@]}"
    REMOTE="set -e; if test -f ~/bigtrain.pid && kill -0 \$(cat ~/bigtrain.pid) 2> /dev/null; then"
    REMOTE+=" echo \"bigtrain is still running on \$(hostname)\"; exit 1; fi; rm -rf ~/bigtrain; mkdir -p ~/bigtrain; tar -xzf ~/bigtrain.tar.gz -C ~/bigtrain"
    REMOTE+="; cd ~/bigtrain; test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
    REMOTE+="; test -x ~/venv/bin/python || ~/.local/bin/uv venv -q --python 3.11 ~/venv"
    REMOTE+="; ~/.local/bin/uv pip install -q --python ~/venv/bin/python -e . 'jax[tpu]==$JAX_VERSION'"
    REMOTE+="; BIGTRAIN_DISTRIBUTED=jax nohup ~/venv/bin/python -m bigtrain.main $(join "${ARGS[@]}")"
    REMOTE+=" > ~/bigtrain.log 2>&1 < /dev/null & echo \$! > ~/bigtrain.pid"
    run "${TPU[@]}" ssh "$NAME" --worker=all "${WHERE[@]}" --command="$REMOTE"
    ;;
  logs)
    run "${TPU[@]}" ssh "$NAME" --worker="$WORKER" "${WHERE[@]}" \
      --command="tail -n 200 -F ~/bigtrain.log"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
