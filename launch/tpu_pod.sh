#!/usr/bin/env bash
# Runs a sentijax job on every worker of a Cloud TPU pod slice (one process per host).
#
# Usage:
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh [--config.key=value ...]
#   DRY_RUN=1 TPU_NAME=... ZONE=... launch/tpu_pod.sh ...   # print the gcloud command, run nothing
#
# Example (KnowDist, Llama-3.2-1B student, params + optimizer state sharded over all chips):
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/runs/knowdist-1b \
#     launch/tpu_pod.sh --config.model.init=/models/Llama-3.2-1B-Instruct \
#       --config.data.corpus=/data/knowdist.jsonl --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Every worker runs the same command; `jax.distributed.initialize()` finds the coordinator,
# process count and process id from the TPU metadata server. Rerunning the same command after a
# preemption resumes from the latest checkpoint in WORKDIR (see launch/README.md).
#
# Environment:
#   TPU_NAME   (required) name of the TPU VM slice (`gcloud compute tpus tpu-vm list`)
#   ZONE       (required) its zone, e.g. us-east5-a
#   PROJECT    GCP project (default: gcloud's configured project)
#   CONFIG     job config file (default: configs/knowdist.py)
#   WORKDIR    run directory: ONE shared filesystem path seen by every worker (Filestore/NFS or a
#              gcsfuse-mounted bucket; gs:// URLs are not supported). Orbax checkpoints of a
#              multi-host run are written by all workers into it. (default: runs/<config name>,
#              which is only right for a single-host slice)
#   CACHE_DIR  per-worker local directory for the tokenised data cache (default:
#              /tmp/sentijax_data; every worker builds the same deterministic cache)
#   REPO_URL   git URL cloned into REPO_DIR on each worker when REPO_DIR does not exist
#              (default: none; then the repo must already be on every worker, e.g. via `scp`)
#   REPO_DIR   checkout directory on the workers (default: ~/sentijax)
#   BRANCH     git branch/tag/commit to check out (default: main)
#   SKIP_INSTALL=1  skip `pip install -e '.[tpu]'` (faster reruns)
#   LOG_DIR    per-worker log directory on the workers (default: $REPO_DIR/logs)
#   INIT_TIMEOUT  seconds each worker waits for all others in jax.distributed.initialize
#              (default: 900; large slices boot and install at different speeds)
#   LIBTPU_INIT_ARGS  XLA TPU compiler flags exported on the workers (default: none; see
#              launch/README.md for the async-collective flags worth trying)
#   EXTRA_ENV  extra `KEY=VALUE ...` exported on the workers before the job
#   DRY_RUN=1  print every command instead of running it
#
# Paths in the job's flags (--config.model.init, --config.data.corpus) must exist on every worker
# (copy them there, or put them on the shared filesystem).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

# DRY_RUN=1: print each command on one line after "+ " (arguments shell-quoted where needed, so
# the line can be pasted back into a shell) instead of running it.
run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    local arg line="+"
    for arg in "$@"; do
      if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" ${arg}"; else line+=" ${arg@Q}"; fi
    done
    printf '%s\n' "${line}"
  else
    "$@"
  fi
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi
if [[ -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "error: TPU_NAME and ZONE must be set" >&2
  echo >&2
  usage >&2
  exit 2
fi

CONFIG="${CONFIG:-configs/knowdist.py}"
config_name="$(basename "${CONFIG}" .py)"
WORKDIR="${WORKDIR:-runs/${config_name}}"
REPO_DIR="${REPO_DIR:-~/sentijax}"
BRANCH="${BRANCH:-main}"
LOG_DIR="${LOG_DIR:-${REPO_DIR}/logs}"
CACHE_DIR="${CACHE_DIR:-/tmp/sentijax_data}"
INIT_TIMEOUT="${INIT_TIMEOUT:-900}"

# Extra args ("$@") are quoted once here so they survive the remote shell unchanged.
extra_args=""
if (($# > 0)); then
  extra_args="$(printf ' %q' "$@")"
fi

remote="set -euo pipefail"
if [[ -n "${REPO_URL:-}" ]]; then
  remote+="; if [ ! -d ${REPO_DIR} ]; then git clone $(printf '%q' "${REPO_URL}") ${REPO_DIR}; fi"
  remote+="; cd ${REPO_DIR} && git fetch --all --quiet"
  remote+=" && git checkout --quiet $(printf '%q' "${BRANCH}")"
  remote+=" && (git pull --quiet --ff-only || true)"
fi
remote+="; cd ${REPO_DIR}"
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  remote+="; python3 -m pip install --quiet -e '.[tpu]'"
fi
remote+="; mkdir -p ${LOG_DIR}"
if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then
  remote+="; export LIBTPU_INIT_ARGS=$(printf '%q' "${LIBTPU_INIT_ARGS}")"
fi
if [[ -n "${EXTRA_ENV:-}" ]]; then
  remote+="; export ${EXTRA_ENV}"
fi
# One log per worker; stdout of worker 0 also streams back through ssh.
remote+="; python3 -m sentijax.main --config=$(printf '%q' "${CONFIG}")"
remote+=" --config.distributed.enabled=True"
remote+=" --config.distributed.initialization_timeout=$(printf '%q' "${INIT_TIMEOUT}")"
remote+=" --config.workdir=$(printf '%q' "${WORKDIR}")"
remote+=" --config.data.cache_dir=$(printf '%q' "${CACHE_DIR}")"
remote+="${extra_args} 2>&1 | tee ${LOG_DIR}/\$(hostname).log"

project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="${PROJECT}")
fi

echo "launching on ${TPU_NAME} (${ZONE}), all workers:" >&2
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
  ${project_flag[@]+"${project_flag[@]}"} --worker=all --command="${remote}"
