#!/usr/bin/env bash
# Training images/s before and after a change, alternating runs on one machine.
#
#   bash benchmarks/input_ab.sh [OLD_COMMIT] [NEW_COMMIT]    # default: 159e8d2 (float views
#                                                            # from Ray Data) vs HEAD
#
# Each commit runs from its own git worktree with this checkout's virtualenv: Fashion-MNIST
# (data/fashion_mnist, `python jobs/ingest.py --source fashion_mnist`) at 16 px, 2 workers,
# 3 epochs of 80 steps, each run to its own SQLite store; prints epoch/images_per_s and
# epoch/data_wait_fraction per run. Order: old, new, old, new.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OLD=${1:-159e8d2}
NEW=${2:-HEAD}
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-$REPO/data/fashion_mnist}
WORK=$(mktemp -d)
trap 'git -C "$REPO" worktree remove --force "$WORK/old" >/dev/null 2>&1 || true;
      git -C "$REPO" worktree remove --force "$WORK/new" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git -C "$REPO" worktree add --detach "$WORK/old" "$OLD" >/dev/null
git -C "$REPO" worktree add --detach "$WORK/new" "$NEW" >/dev/null
for run in old new old2 new2; do
  tree=$WORK/${run%2}
  out=$WORK/out-$run
  mkdir -p "$out"
  echo "== $run $(git -C "$tree" log -1 --format=%h) $(date +%T)"
  (cd "$tree" && PYTHONPATH=$tree SSCQ_VERBOSE=1 "$PY" jobs/train.py --config configs/fashion_mnist.yaml \
    "data.train_uri=$DATA/train" "data.queries_uri=$DATA/test" data.image_size=16 train.lr=1.5e-3 \
    train.epochs=3 train.max_steps_per_epoch=80 "train.storage_path=$out/runs" \
    "tracking.tracking_uri=sqlite:///$out/mlflow.db" "tracking.output_dir=$out/outputs" "train.run_name=ab-$run" \
    > "$out/log.txt" 2>&1) || { echo "$run failed: $out/log.txt"; tail -5 "$out/log.txt"; exit 1; }
  "$PY" - "$out/mlflow.db" "$run" <<'P'
import sys
from mlflow.tracking import MlflowClient
uri = f"sqlite:///{sys.argv[1]}"
c = MlflowClient(uri, registry_uri=uri)
for e in c.search_experiments():
    for r in c.search_runs([e.experiment_id]):
        def hist(key):
            return [m.value for m in sorted(c.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
        print(sys.argv[2], "images/s", [round(v) for v in hist("epoch/images_per_s")],
              "data wait", [round(v, 3) for v in hist("epoch/data_wait_fraction")], flush=True)
P
done
