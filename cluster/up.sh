#!/usr/bin/env bash
# Bring up the local/dev stack: S3-compatible endpoint (moto_server) with a bucket, an
# MLflow tracking server (SQLite store, artifacts in that bucket) and a Ray head with the
# dashboard / Jobs API on 127.0.0.1. Then write $SSCQ_STACK_DIR/env.sh; source it and use
#   ray job submit --working-dir . -- python jobs/train.py --config configs/digits.yaml
#
# Idempotent: services already running and healthy are left alone, a second call is a
# no-op that exits 0. Settings (env vars, defaults in cluster/lib.sh):
#   SSCQ_STACK_DIR (.cluster)  VENV (.venv)  SSCQ_RAY_PORT (6379)
#   SSCQ_RAY_DASHBOARD_PORT (8265)  SSCQ_RAY_CLIENT_PORT (10001)  SSCQ_RAY_AGENT_PORT (52365)
#   SSCQ_RAY_NUM_CPUS (4)  SSCQ_RAY_AUTH (token|disabled)  SSCQ_S3_PORT (9000)
#   SSCQ_MLFLOW_PORT (5000)  SSCQ_BUCKET (sscq-dev)  SSCQ_REGION (us-east-1)
#   SSCQ_START_TIMEOUT (120 s)  SSCQ_DEV_AWS_ACCESS_KEY_ID / SSCQ_DEV_AWS_SECRET_ACCESS_KEY
#   (dev-only keys for the local endpoint; generated when unset, never your real ones)
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
sscq_settings
if [[ -f $SSCQ_STACK_ENV ]]; then
  sscq_log "using the settings recorded in $SSCQ_STACK_ENV (cluster/down.sh first to change them)"
fi
sscq_load_recorded
sscq_require_venv

case $SSCQ_RAY_AUTH in
  token | disabled) ;;
  *) sscq_die "SSCQ_RAY_AUTH must be 'token' or 'disabled', got '$SSCQ_RAY_AUTH'" ;;
esac

umask 077  # every file and dir written below (token, credentials, env.sh) is owner-only
mkdir -p "$SSCQ_STACK_DIR" "$SSCQ_PID_DIR" "$SSCQ_LOG_DIR" "$SSCQ_RAY_TMP"
chmod 700 "$SSCQ_STACK_DIR"

# Refuse a port that something other than our own service is listening on.
check_port_free() {
  local name=$1 port=$2 var=$3
  if sscq_port_open "$port" || ! sscq_port_bindable "$port"; then
    sscq_die "port $port needed by $name is in use by another process; set $var to a free port"
  fi
}

# --- secrets (files only, never printed) -------------------------------------------------
if [[ ! -s $SSCQ_CRED_FILE ]]; then
  key_id=${SSCQ_DEV_AWS_ACCESS_KEY_ID:-sscqdev$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  secret=${SSCQ_DEV_AWS_SECRET_ACCESS_KEY:-$(head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n')}
  printf 'DEV_KEY_ID=%q\nDEV_SECRET=%q\n' "$key_id" "$secret" >"$SSCQ_CRED_FILE"
  unset key_id secret
  sscq_log "generated dev-only S3 credentials in $SSCQ_CRED_FILE"
fi
# shellcheck disable=SC1090
source "$SSCQ_CRED_FILE"
if [[ $SSCQ_RAY_AUTH == token && ! -s $SSCQ_TOKEN_FILE ]]; then
  # 256 bits, the same strength `ray get-auth-token --generate` uses.
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SSCQ_TOKEN_FILE"
  sscq_log "generated Ray auth token in $SSCQ_TOKEN_FILE"
fi

s3_url=http://$SSCQ_HOST:$SSCQ_S3_PORT
mlflow_url=http://$SSCQ_HOST:$SSCQ_MLFLOW_PORT
ray_url=http://$SSCQ_HOST:$SSCQ_RAY_DASHBOARD_PORT

# Environment shared by the MLflow server and every Ray process (so jobs, train workers and
# Ray Data tasks reach the same endpoint and tracking server).
export_stack_env() {
  export AWS_ACCESS_KEY_ID=$DEV_KEY_ID AWS_SECRET_ACCESS_KEY=$DEV_SECRET
  export AWS_DEFAULT_REGION=$SSCQ_REGION AWS_ENDPOINT_URL=$s3_url MLFLOW_S3_ENDPOINT_URL=$s3_url
  export MLFLOW_TRACKING_URI=$mlflow_url
  # Job entrypoints say `python ...`: it must be the venv's interpreter (with Ray and the
  # package), whatever the caller's PATH.
  export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
  unset AWS_PROFILE AWS_SESSION_TOKEN RAY_ADDRESS PYTHONHOME
}

started=()
sscq_record_settings

# --- S3 endpoint -----------------------------------------------------------------------
moto_log=$SSCQ_LOG_DIR/moto.log
if sscq_service_alive moto; then
  sscq_log "s3 endpoint already running ($s3_url)"
else
  check_port_free "s3 endpoint" "$SSCQ_S3_PORT" SSCQ_S3_PORT
  sscq_log "starting s3 endpoint (moto_server) on $s3_url"
  (exec setsid "$VENV/bin/moto_server" -H "$SSCQ_HOST" -p "$SSCQ_S3_PORT") >"$moto_log" 2>&1 </dev/null &
  echo $! >"$SSCQ_PID_DIR/moto.pgid"
  started+=(moto)
fi

# --- MLflow (starts while Ray boots; it does not touch S3 until an artifact is logged) --
mlflow_log=$SSCQ_LOG_DIR/mlflow.log
if sscq_service_alive mlflow; then
  sscq_log "mlflow already running ($mlflow_url)"
else
  check_port_free mlflow "$SSCQ_MLFLOW_PORT" SSCQ_MLFLOW_PORT
  sscq_log "starting mlflow server on $mlflow_url (artifacts: s3://$SSCQ_BUCKET/mlflow)"
  (
    export_stack_env
    # Tracking and the registry only: MLflow's job runner (GenAI evaluation jobs, a runner and
    # ~7 worker processes) has no work here.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    exec setsid "$VENV/bin/mlflow" server \
      --backend-store-uri "sqlite:///$SSCQ_STACK_DIR/mlflow.db" \
      --artifacts-destination "s3://$SSCQ_BUCKET/mlflow" --serve-artifacts \
      --host "$SSCQ_HOST" --port "$SSCQ_MLFLOW_PORT" --workers "$SSCQ_MLFLOW_WORKERS"
  ) >"$mlflow_log" 2>&1 </dev/null &
  echo $! >"$SSCQ_PID_DIR/mlflow.pgid"
  started+=(mlflow)
fi

# --- Ray head --------------------------------------------------------------------------
ray_log=$SSCQ_LOG_DIR/ray-start.log
if sscq_service_alive ray; then
  sscq_log "ray head already running ($ray_url)"
else
  for spec in "GCS:$SSCQ_RAY_PORT:SSCQ_RAY_PORT" "dashboard:$SSCQ_RAY_DASHBOARD_PORT:SSCQ_RAY_DASHBOARD_PORT" \
    "ray client:$SSCQ_RAY_CLIENT_PORT:SSCQ_RAY_CLIENT_PORT" "dashboard agent:$SSCQ_RAY_AGENT_PORT:SSCQ_RAY_AGENT_PORT"; do
    IFS=: read -r what port var <<<"$spec"
    check_port_free "ray $what" "$port" "$var"
  done
  sscq_log "starting ray head (num_cpus=$SSCQ_RAY_NUM_CPUS, auth=$SSCQ_RAY_AUTH, dashboard $ray_url)"
  (
    export_stack_env
    export RAY_AUTH_MODE=$SSCQ_RAY_AUTH RAY_USAGE_STATS_ENABLED=0
    # One machine, no network between the controller and its workers: Ray Train polls them
    # every 0.5 s (default 2 s), so a submitted run's checkpoints and end are seen sooner.
    export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}
    if [[ $SSCQ_RAY_AUTH == token ]]; then
      export RAY_AUTH_TOKEN_PATH=$SSCQ_TOKEN_FILE
    fi
    unset RAY_AUTH_TOKEN
    # `ray start` daemonises its processes and exits; setsid gives them one process group
    # of their own, which down.sh stops without touching any other Ray on this machine.
    exec setsid "$VENV/bin/ray" start --head \
      --node-ip-address "$SSCQ_HOST" --port "$SSCQ_RAY_PORT" \
      --num-cpus "$SSCQ_RAY_NUM_CPUS" \
      --dashboard-host "$SSCQ_HOST" --dashboard-port "$SSCQ_RAY_DASHBOARD_PORT" \
      --ray-client-server-port "$SSCQ_RAY_CLIENT_PORT" \
      --dashboard-agent-listen-port "$SSCQ_RAY_AGENT_PORT" \
      --temp-dir "$SSCQ_RAY_TMP" --disable-usage-stats
  ) >"$ray_log" 2>&1 </dev/null &
  ray_pid=$!
  echo "$ray_pid" >"$SSCQ_PID_DIR/ray.pgid"
  started+=(ray)
  if ! wait "$ray_pid"; then
    tail -n 20 "$ray_log" >&2 || true
    sscq_die "ray start failed (log: $ray_log)"
  fi
fi

# --- wait for health, create the bucket --------------------------------------------------
sscq_log "waiting for services to become healthy (timeout ${SSCQ_START_TIMEOUT}s each)"
sscq_wait_until moto "$moto_log" sscq_s3_healthy
if ! sscq_bucket_exists; then
  (
    export_stack_env
    "$VENV/bin/python" - "$SSCQ_BUCKET" <<'PY'
import sys

import boto3

# Region and endpoint come from AWS_DEFAULT_REGION / AWS_ENDPOINT_URL set by up.sh.
boto3.client("s3").create_bucket(Bucket=sys.argv[1])
PY
  ) >>"$moto_log" 2>&1 || sscq_die "could not create bucket $SSCQ_BUCKET (log: $moto_log)"
  sscq_log "created bucket s3://$SSCQ_BUCKET"
fi
sscq_wait_until mlflow "$mlflow_log" sscq_mlflow_healthy
sscq_wait_until ray "$ray_log" sscq_ray_healthy

# --- env.sh for clients --------------------------------------------------------------------
{
  echo "# Written by cluster/up.sh: 'source $SSCQ_ENV_SH' to use the dev stack."
  echo "# Dev-only credentials for the local S3 endpoint; keep this file private (mode 600)."
  printf 'export SSCQ_STACK_DIR=%q\n' "$SSCQ_STACK_DIR"
  printf 'export SSCQ_BUCKET=%q\n' "$SSCQ_BUCKET"
  printf 'export RAY_ADDRESS=%q\n' "$ray_url"
  printf 'export RAY_AUTH_MODE=%q\n' "$SSCQ_RAY_AUTH"
  if [[ $SSCQ_RAY_AUTH == token ]]; then
    echo "# ray job submit / the Ray SDK read the bearer token from this file."
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$SSCQ_TOKEN_FILE"
  fi
  printf 'export MLFLOW_TRACKING_URI=%q\n' "$mlflow_url"
  printf 'export AWS_ENDPOINT_URL=%q\n' "$s3_url"
  printf 'export MLFLOW_S3_ENDPOINT_URL=%q\n' "$s3_url"
  printf 'export AWS_DEFAULT_REGION=%q\n' "$SSCQ_REGION"
  printf 'export AWS_ACCESS_KEY_ID=%q\n' "$DEV_KEY_ID"
  printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$DEV_SECRET"
} >"$SSCQ_ENV_SH.tmp"
mv "$SSCQ_ENV_SH.tmp" "$SSCQ_ENV_SH"

if ((${#started[@]} == 0)); then
  sscq_log "stack already up; nothing to do"
else
  sscq_log "started: ${started[*]}"
fi
sscq_log "ray dashboard / jobs API: $ray_url (auth: $SSCQ_RAY_AUTH)"
sscq_log "mlflow tracking server:   $mlflow_url"
sscq_log "s3 endpoint:              $s3_url (bucket s3://$SSCQ_BUCKET)"
sscq_log "logs: $SSCQ_LOG_DIR   ray session logs: $SSCQ_RAY_TMP"
sscq_log "next: source $SSCQ_ENV_SH"
