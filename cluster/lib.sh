# shellcheck shell=bash
# Variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034
# Shared settings and helpers for cluster/up.sh, down.sh and status.sh (sourced, not run).
#
# The dev stack is three real processes bound to 127.0.0.1 only:
#   Ray head (dashboard + Jobs API), an S3-compatible endpoint (moto_server) and an
#   MLflow tracking server (SQLite backend store, artifacts in the S3 endpoint).
#
# Every setting is an environment variable with a default (listed in sscq_settings).
# up.sh records the values it used in $SSCQ_STACK_DIR/stack.env; down.sh and status.sh
# read that file, so they act on the stack that is running whatever the caller's env says.
# Nothing here prints a credential: tokens and keys live in mode-600 files only.

SSCQ_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Keys written to stack.env (non-secret settings only).
SSCQ_RECORDED_KEYS=(
  VENV SSCQ_RAY_PORT SSCQ_RAY_DASHBOARD_PORT SSCQ_RAY_CLIENT_PORT SSCQ_RAY_AGENT_PORT
  SSCQ_RAY_NUM_CPUS SSCQ_RAY_AUTH SSCQ_RAY_TMP SSCQ_S3_PORT SSCQ_MLFLOW_PORT
  SSCQ_MLFLOW_WORKERS SSCQ_BUCKET SSCQ_REGION
)

sscq_log() { printf '[sscq-stack] %s\n' "$*"; }
sscq_die() { printf '[sscq-stack] error: %s\n' "$*" >&2; exit 1; }

# Absolute path without resolving symlinks (the venv's bin/python is usually a link, and
# process command lines show the path as invoked).
sscq_abspath() {
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$(pwd)" "${1#./}" ;;
  esac
}

sscq_settings() {
  SSCQ_STACK_DIR=$(sscq_abspath "${SSCQ_STACK_DIR:-$SSCQ_REPO_ROOT/.cluster}")
  VENV=$(sscq_abspath "${VENV:-$SSCQ_REPO_ROOT/.venv}")
  SSCQ_HOST=127.0.0.1  # loopback only: nothing in the dev stack is reachable from outside
  SSCQ_RAY_PORT=${SSCQ_RAY_PORT:-6379}
  SSCQ_RAY_DASHBOARD_PORT=${SSCQ_RAY_DASHBOARD_PORT:-8265}
  SSCQ_RAY_CLIENT_PORT=${SSCQ_RAY_CLIENT_PORT:-10001}
  SSCQ_RAY_AGENT_PORT=${SSCQ_RAY_AGENT_PORT:-52365}
  # 4 logical CPUs by default: 2 training workers plus room for Ray Data tasks beside them.
  SSCQ_RAY_NUM_CPUS=${SSCQ_RAY_NUM_CPUS:-4}
  SSCQ_RAY_AUTH=${SSCQ_RAY_AUTH:-token}
  SSCQ_S3_PORT=${SSCQ_S3_PORT:-9000}
  SSCQ_MLFLOW_PORT=${SSCQ_MLFLOW_PORT:-5000}
  # One worker: the SQLite backend store does not like concurrent writers.
  SSCQ_MLFLOW_WORKERS=${SSCQ_MLFLOW_WORKERS:-1}
  SSCQ_BUCKET=${SSCQ_BUCKET:-sscq-dev}
  SSCQ_REGION=${SSCQ_REGION:-us-east-1}
  SSCQ_START_TIMEOUT=${SSCQ_START_TIMEOUT:-120}
  SSCQ_STOP_GRACE=${SSCQ_STOP_GRACE:-10}
  # Ray puts unix sockets under its temp dir and socket paths are limited to 107 bytes,
  # so a deep state dir gets a short, stable stand-in under /tmp.
  if [[ -z ${SSCQ_RAY_TMP:-} ]]; then
    SSCQ_RAY_TMP=$SSCQ_STACK_DIR/ray
    # session_<date>_<pid> (~48) + /sockets/dash_MetricsHead (25) leave ~30 bytes for the root.
    if (( ${#SSCQ_RAY_TMP} > 30 )); then
      SSCQ_RAY_TMP=/tmp/sscq-ray-$(printf '%s' "$SSCQ_STACK_DIR" | cksum | cut -d' ' -f1)
    fi
  fi

  # Derived paths.
  SSCQ_PID_DIR=$SSCQ_STACK_DIR/pids
  SSCQ_LOG_DIR=$SSCQ_STACK_DIR/logs
  SSCQ_STACK_ENV=$SSCQ_STACK_DIR/stack.env
  SSCQ_ENV_SH=$SSCQ_STACK_DIR/env.sh
  SSCQ_CRED_FILE=$SSCQ_STACK_DIR/dev-credentials
  SSCQ_TOKEN_FILE=$SSCQ_STACK_DIR/ray_auth_token
}

# Load the settings recorded by up.sh; they describe the stack that is actually running.
sscq_load_recorded() {
  if [[ -f $SSCQ_STACK_ENV ]]; then
    # shellcheck disable=SC1090
    source "$SSCQ_STACK_ENV"
  fi
}

sscq_record_settings() {
  local key tmp=$SSCQ_STACK_ENV.tmp
  {
    echo "# Written by cluster/up.sh: settings of the running dev stack (no secrets)."
    for key in "${SSCQ_RECORDED_KEYS[@]}"; do
      printf '%s=%q\n' "$key" "${!key}"
    done
  } >"$tmp"
  mv "$tmp" "$SSCQ_STACK_ENV"
}

sscq_require_venv() {
  local bin
  for bin in python ray mlflow moto_server; do
    [[ -x $VENV/bin/$bin ]] || sscq_die "$VENV/bin/$bin not found (set VENV to the project's virtualenv)"
  done
  command -v curl >/dev/null || sscq_die "curl is required for the health checks"
  command -v setsid >/dev/null || sscq_die "setsid (util-linux) is required"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
sscq_port_open() {
  (: <"/dev/tcp/$SSCQ_HOST/$1") 2>/dev/null
}

# True when a server could bind port $1 on all interfaces right now (as Ray's GCS does).
# Stricter than a connect test: it also sees a port held by another socket (an outgoing
# connection, or a listener on one specific address).
sscq_port_bindable() {
  "$VENV/bin/python" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(1)
' "$1"
}

# Process-group id recorded for a service, or empty.
sscq_pgid_of() {
  local f=$SSCQ_PID_DIR/$1.pgid
  [[ -f $f ]] && tr -dc '0-9' <"$f"
  return 0
}

# A command-line fragment only this stack's process of a service has (guards against a
# stale pid file whose number now belongs to an unrelated process group).
sscq_service_mark() {
  case $1 in
    moto) printf '%s\n' "moto_server -H $SSCQ_HOST -p $SSCQ_S3_PORT" ;;
    mlflow) printf '%s\n' "sqlite:///$SSCQ_STACK_DIR/mlflow.db" ;;
    ray) printf '%s\n' "$SSCQ_RAY_TMP/" ;;
  esac
}

# True when process group $1 has a member whose command line contains $2. The caller's
# own group never counts (a recycled pid file must not make a script signal itself), and
# the mark reaches awk through the environment so awk's own command line cannot match.
sscq_group_alive() {
  local pgid=$1 mark=$2 own
  [[ -n $pgid && -n $mark ]] || return 1
  own=$(ps -o pgid= -p $$ | tr -d ' ')
  [[ $pgid != "$own" ]] || return 1
  ps -eo pgid=,args= | SSCQ_MARK=$mark awk -v g="$pgid" \
    '$1 == g && index($0, ENVIRON["SSCQ_MARK"]) > 0 { found = 1 } END { exit !found }'
}

sscq_service_alive() {
  sscq_group_alive "$(sscq_pgid_of "$1")" "$(sscq_service_mark "$1")"
}

# Members of process group $1 plus all their descendants (Ray workers set their own
# process group but stay children of the raylet).
sscq_group_tree() {
  local pgid=$1
  ps -eo pid=,ppid=,pgid= | awk -v g="$pgid" '
    { parent[$1] = $2; if ($3 == g) keep[$1] = 1; seen[$1] = 1 }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (p in seen) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
      }
      for (p in keep) print p
    }'
}

# Milliseconds on the wall clock (bash 5's EPOCHREALTIME; no subprocess).
sscq_now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  SSCQ_NOW_MS=$((t / 1000))
}

# SIGTERM the given pids, wait up to $1 milliseconds for them to exit, SIGKILL the rest.
# Prints how many needed SIGKILL.
sscq_term_wait() {
  local budget_ms=$1 deadline pids
  shift
  pids=("$@")
  ((${#pids[@]})) || { echo 0; return 0; }
  kill -TERM "${pids[@]}" 2>/dev/null || true
  sscq_now_ms
  deadline=$((SSCQ_NOW_MS + budget_ms))
  while :; do
    mapfile -t pids < <(for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    ((${#pids[@]})) || break
    sscq_now_ms
    ((SSCQ_NOW_MS < deadline)) || break
    sleep 0.1
  done
  if ((${#pids[@]})); then
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  echo "${#pids[@]}"
}

# Stop one service by its recorded process group (members and their descendants only):
# SIGTERM, wait, then SIGKILL what is left, within SSCQ_STOP_GRACE seconds in all.
# Optional $2 / $3: command-line patterns of processes to stop first / last (Ray wants
# the raylet gone before its agents, and the GCS after everything else, as `ray stop`).
sscq_stop_service() {
  local name=$1 first=${2:-} last=${3:-} pgid pid args killed=0 n
  local -a tree s1=() s2=() s3=()
  pgid=$(sscq_pgid_of "$name")
  if ! sscq_service_alive "$name"; then
    rm -f "$SSCQ_PID_DIR/$name.pgid"
    return 1
  fi
  sscq_log "stopping $name (process group $pgid)"
  mapfile -t tree < <(sscq_group_tree "$pgid")
  ((${#tree[@]})) || { rm -f "$SSCQ_PID_DIR/$name.pgid"; return 1; }
  while read -r pid args; do
    if [[ -n $first && $args == *"$first"* ]]; then
      s1+=("$pid")
    elif [[ -n $last && $args == *"$last"* ]]; then
      s3+=("$pid")
    else
      s2+=("$pid")
    fi
  done < <(IFS=,; ps -o pid=,args= -p "${tree[*]}")
  # The grace period is shared by the (up to) three stages.
  local budget_ms=$((SSCQ_STOP_GRACE * 1000 / 3))
  n=$(sscq_term_wait "$budget_ms" "${s1[@]}") && killed=$((killed + n))
  n=$(sscq_term_wait "$budget_ms" "${s2[@]}") && killed=$((killed + n))
  n=$(sscq_term_wait "$budget_ms" "${s3[@]}") && killed=$((killed + n))
  if ((killed)); then
    sscq_log "$name: $killed process(es) needed SIGKILL"
  fi
  rm -f "$SSCQ_PID_DIR/$name.pgid"
  return 0
}

# Poll "$@" every 0.5 s until it succeeds; fail after SSCQ_START_TIMEOUT seconds, or at
# once when the service's process group has died, showing the tail of its log.
sscq_wait_until() {
  local name=$1 log=$2
  shift 2
  local deadline=$((SECONDS + SSCQ_START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! sscq_service_alive "$name"; then
      tail -n 20 "$log" >&2 || true
      sscq_die "$name exited during start-up (log: $log)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 20 "$log" >&2 || true
      sscq_die "$name not healthy after ${SSCQ_START_TIMEOUT}s (log: $log)"
    fi
    sleep 0.5
  done
}

# curl the Ray dashboard with the bearer token read from the token file; the token goes
# through a process substitution so it never appears in an argument list.
sscq_ray_curl() {
  local path=$1
  shift
  if [[ $SSCQ_RAY_AUTH == token && -f $SSCQ_TOKEN_FILE ]]; then
    curl -fsS --max-time 3 "$@" -H @<(printf 'Authorization: Bearer %s\n' "$(<"$SSCQ_TOKEN_FILE")") \
      "http://$SSCQ_HOST:$SSCQ_RAY_DASHBOARD_PORT$path"
  else
    curl -fsS --max-time 3 "$@" "http://$SSCQ_HOST:$SSCQ_RAY_DASHBOARD_PORT$path"
  fi
}

# Health checks, one per service (exit status only).
# Ray counts as up once the head's dashboard agent answers too: job submission goes
# through that agent and fails until it has started.
sscq_ray_healthy() {
  sscq_ray_curl /api/gcs_healthz -o /dev/null && sscq_ray_curl /api/version -o /dev/null &&
    curl -fs --max-time 3 -o /dev/null "http://$SSCQ_HOST:$SSCQ_RAY_AGENT_PORT/api/healthz"
}
sscq_s3_healthy() { curl -fsS --max-time 3 -o /dev/null "http://$SSCQ_HOST:$SSCQ_S3_PORT/"; }
sscq_bucket_exists() { curl -fs --max-time 3 -o /dev/null -I "http://$SSCQ_HOST:$SSCQ_S3_PORT/$SSCQ_BUCKET"; }
sscq_mlflow_healthy() { curl -fsS --max-time 3 "http://$SSCQ_HOST:$SSCQ_MLFLOW_PORT/health" | grep -q OK; }
