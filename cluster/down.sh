#!/usr/bin/env bash
# Stop the dev stack started by cluster/up.sh: MLflow, the Ray head, the S3 endpoint.
#
# Only the process groups recorded under $SSCQ_STACK_DIR/pids are signalled (never
# `ray stop`, which would kill every Ray instance on the machine). Idempotent: when the
# stack is already down it says so and exits 0.
#
#   cluster/down.sh           stop; keep state (mlflow.db, logs, credentials, token)
#   cluster/down.sh --purge   stop and delete the state dir (the S3 endpoint keeps its
#                             objects in memory, so they are gone after any stop)
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
sscq_settings
sscq_load_recorded

purge=0
for arg in "$@"; do
  case $arg in
    --purge) purge=1 ;;
    -h | --help)
      sed -n '2,11p' "$0"
      exit 0
      ;;
    *) sscq_die "unknown argument '$arg' (use --purge or --help)" ;;
  esac
done

stopped=()
# Reverse start order: clients of the endpoint first.
if sscq_stop_service mlflow; then stopped+=(mlflow); fi
if sscq_stop_service ray /raylet/raylet /gcs/gcs_server; then stopped+=(ray); fi
if sscq_stop_service moto; then stopped+=(moto); fi

# A stopped stack must not leave an env.sh that points clients at dead ports.
rm -f "$SSCQ_ENV_SH" "$SSCQ_STACK_ENV"

if ((${#stopped[@]} == 0)); then
  sscq_log "stack already down ($SSCQ_STACK_DIR)"
else
  sscq_log "stopped: ${stopped[*]}"
fi

if ((purge)); then
  # Only remove what up.sh creates; refuse anything that does not look like a stack dir.
  if [[ -d $SSCQ_STACK_DIR && -d $SSCQ_STACK_DIR/pids ]]; then
    rm -rf "$SSCQ_STACK_DIR"
    sscq_log "removed $SSCQ_STACK_DIR"
  fi
  if [[ $SSCQ_RAY_TMP == /tmp/sscq-ray-* && -d $SSCQ_RAY_TMP ]]; then
    rm -rf "$SSCQ_RAY_TMP"
  fi
fi
