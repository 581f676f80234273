#!/usr/bin/env bash
# Health of the dev stack started by cluster/up.sh, one line per service.
# Exit status: 0 when every service is running and healthy, 1 otherwise.
#
# Checks: Ray dashboard /api/gcs_healthz and /api/version (with the bearer token when
# token auth is on, and that a request without it is refused), the S3 endpoint and the
# bucket, MLflow /health.
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
sscq_settings
sscq_load_recorded

failed=0
report() {  # name, ok(0/1), detail
  local state=healthy
  if (($2)); then
    state=DOWN
    failed=1
  fi
  printf '[sscq-stack] %-7s %-8s %s\n' "$1" "$state" "$3"
}

# Ray.
ray_url=http://$SSCQ_HOST:$SSCQ_RAY_DASHBOARD_PORT
if ! sscq_service_alive ray; then
  report ray 1 "not running ($ray_url)"
elif ! sscq_ray_healthy; then
  report ray 1 "process group $(sscq_pgid_of ray) alive but dashboard not answering at $ray_url"
else
  version=$(sscq_ray_curl /api/version | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["ray_version"])')
  auth="auth=$SSCQ_RAY_AUTH" bad=0
  if [[ $SSCQ_RAY_AUTH == token ]]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$ray_url/api/version" || true)
    auth+=" (request without token: HTTP $code)"
    [[ $code == 401 || $code == 403 ]] || bad=1
  fi
  report ray "$bad" "pgid $(sscq_pgid_of ray)  $ray_url  ray $version  num_cpus=$SSCQ_RAY_NUM_CPUS  $auth"
fi

# S3 endpoint.
s3_url=http://$SSCQ_HOST:$SSCQ_S3_PORT
if ! sscq_service_alive moto; then
  report s3 1 "not running ($s3_url)"
elif ! sscq_s3_healthy; then
  report s3 1 "process group $(sscq_pgid_of moto) alive but $s3_url not answering"
elif ! sscq_bucket_exists; then
  report s3 1 "$s3_url up but bucket $SSCQ_BUCKET missing"
else
  report s3 0 "pgid $(sscq_pgid_of moto)  $s3_url  bucket s3://$SSCQ_BUCKET"
fi

# MLflow.
mlflow_url=http://$SSCQ_HOST:$SSCQ_MLFLOW_PORT
if ! sscq_service_alive mlflow; then
  report mlflow 1 "not running ($mlflow_url)"
elif ! sscq_mlflow_healthy; then
  report mlflow 1 "process group $(sscq_pgid_of mlflow) alive but $mlflow_url/health not OK"
else
  report mlflow 0 "pgid $(sscq_pgid_of mlflow)  $mlflow_url  artifacts s3://$SSCQ_BUCKET/mlflow"
fi

if ((failed == 0)) && [[ -f $SSCQ_ENV_SH ]]; then
  sscq_log "clients: source $SSCQ_ENV_SH"
fi
exit "$failed"
