#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, run from the repository root:
#
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-gpu_results}/gpu_check.json
#
# 1. a virtualenv (${VENV:-.venv-gpu}, seeing the system's site-packages so a preinstalled
#    CUDA torch is reused) with this package installed: from wheels/ when that folder exists
#    (no index), else from the package index;
# 2. torch.cuda.is_available() (the script stops here, with the JSON saying why, if not);
# 3. a short real training run: jobs/train.py on the digits, 1 worker, train.use_gpu=true
#    (bf16 is switched on automatically where the GPU supports it), DeepSpeed ZeRO 2;
# 4. benchmarks/train_throughput.py on the GPU (Ray Train + DeepSpeed, 1 worker, vs plain
#    PyTorch on the same GPU), digits resized to 28 px so the GPU has work to do: the uint8
#    stream moved to the GPU and the two views made there, bf16 autocast and channels-last
#    on (train.* = null: auto), then the same with torch.compile forced on;
# 4b. benchmarks/augment_speed.py on the GPU: two-view augmentation images/s (ours vs kornia),
#    3 channels at 32 and 224 px;
# 5. benchmarks/encode_throughput.py with index.use_gpu=true (one encoding actor per GPU),
#    28 px as well;
# 6. benchmarks/quality_fashion_mnist.py on the GPU (issue 25): the Fashion-MNIST recipe
#    (configs/fashion_mnist.yaml), test split, 32 bits, 1 worker, trained for QUALITY_MINUTES
#    (default 5, to fit a short device lease; the aim is 60) with the mAP-vs-time curve.
#    Its data: the shards under FMNIST_DATA (default data/fashion_mnist, ~32 MB: carry it to
#    a machine without the Debian package), else the package's IDX files. QUALITY_MINUTES=0
#    skips the step.
# Every step has a time limit (STEP_TIMEOUT seconds) and its exit status goes into the JSON,
# so a failing step does not hide the numbers of the others.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-gpu_results}"
VENV="${VENV:-.venv-gpu}"
PYTHON="${PYTHON:-python3}"
EPOCHS="${EPOCHS:-3}"
ENCODE_ROWS="${ENCODE_ROWS:-60000}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
QUALITY_MINUTES="${QUALITY_MINUTES:-5}"
FMNIST_DATA="${FMNIST_DATA:-data/fashion_mnist}"
# GPU_CHECK_CPU=1 runs the same steps on CPU (train.use_gpu=false): a dry run of this script.
if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then USE_GPU=false; else USE_GPU=true; fi
# Data, runs and checkpoints stay outside $OUT, so only logs and JSON come back from a device.
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
STATUS_FILE="$OUT/steps.tsv"
: > "$STATUS_FILE"

log() { printf '[gpu_check] %s\n' "$*"; }

# run_step NAME CMD...: runs CMD under the step time limit, logs to $OUT/NAME.log, records status and seconds.
run_step() {
    local name="$1"
    shift
    local t0 t1 rc
    log "step $name: $*"
    t0=$(date +%s)
    timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" >> "$STATUS_FILE"
    log "step $name: exit $rc in $((t1 - t0)) s (log $OUT/$name.log)"
    tail -n 15 "$OUT/$name.log"
    return "$rc"
}

# ---------------------------------------------------------------- 1. environment
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV" || exit 2
fi
PY="$ROOT/$VENV/bin/python"
if ! "$PY" -c "import sscq_dist, torch, ray, deepspeed, faiss, mlflow" > /dev/null 2>&1; then
    if [ -d wheels ]; then
        log "installing from wheels/ (no index)"
        "$PY" -m pip install -q --no-index --find-links wheels/ -e . \
            || { log "wheel install failed; trying the package index"; "$PY" -m pip install -q -e .; }
    else
        log "installing from the package index"
        "$PY" -m pip install -q -e .
    fi
fi

# ---------------------------------------------------------------- 2. CUDA
"$PY" - "$OUT/cuda.json" <<'EOF'
import json, sys
import torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
sys.exit(0 if info["cuda_available"] else 1)
EOF
cuda_rc=$?
printf '%s\t%s\t%s\n' "cuda" "$cuda_rc" "0" >> "$STATUS_FILE"

if [ "$cuda_rc" -eq 0 ] || [ "$USE_GPU" = "false" ]; then
    # ------------------------------------------------------------ 3. short real training
    TRACK="sqlite:///$WORK/mlflow.db"
    run_step ingest "$PY" jobs/ingest.py --source digits --dest "$WORK/data/digits" --overwrite --no-progress
    run_step train "$PY" jobs/train.py --config configs/digits.yaml \
        "data.train_uri=$WORK/data/digits/train" "data.queries_uri=$WORK/data/digits/test" \
        "train.use_gpu=$USE_GPU" train.zero_stage=2 train.num_workers=1 "train.epochs=$EPOCHS" \
        train.checkpoint_every_epochs=1 "train.storage_path=$WORK/runs" train.run_name=gpu-check \
        "tracking.tracking_uri=$TRACK" "tracking.output_dir=$WORK/outputs"
    # Epoch metrics of that run, read back from its MLflow store.
    "$PY" - "$TRACK" "$OUT/train_metrics.json" > /dev/null 2>&1 <<'EOF'
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("sscq")
run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
hist = lambda k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
json.dump({"run_id": run.info.run_id, "status": run.info.status,
           "epoch_images_per_s": hist("epoch/images_per_s"),
           "epoch_data_wait_fraction": hist("epoch/data_wait_fraction"),
           "epoch_loss_total": hist("epoch/loss/total"),
           "epoch_codeword_entropy": hist("epoch/codeword_entropy"),
           "params": {k: v for k, v in run.data.params.items() if k.startswith("train.")}},
          open(sys.argv[2], "w"), indent=1)
EOF
    # ------------------------------------------------------------ 4. training throughput on the GPU
    run_step train_throughput "$PY" benchmarks/train_throughput.py --source digits --workers 1 \
        --epochs 3 --steps 0 --plain-steps 40 --pipeline-passes 1 --quiet \
        --data-dir "$WORK/data/digits" --out "$WORK/train_throughput" --json "$OUT/train_throughput.json" \
        "train.use_gpu=$USE_GPU" train.zero_stage=2 data.image_size=28
    run_step train_throughput_compile "$PY" benchmarks/train_throughput.py --source digits --workers 1 \
        --epochs 3 --steps 0 --plain-steps 40 --pipeline-passes 0 --quiet \
        --data-dir "$WORK/data/digits" --out "$WORK/train_throughput_compile" \
        --json "$OUT/train_throughput_compile.json" \
        "train.use_gpu=$USE_GPU" train.zero_stage=2 data.image_size=28 train.compile=true
    if [ "$USE_GPU" = "true" ]; then AUG_DEVICE=cuda; else AUG_DEVICE=cpu; fi
    run_step augment_speed "$PY" benchmarks/augment_speed.py --device "$AUG_DEVICE" --channels 3 \
        --sizes 32 224 --batches 256
    # ------------------------------------------------------------ 5. encoding on the GPU
    run_step encode "$PY" benchmarks/encode_throughput.py --source digits --rows "$ENCODE_ROWS" --quiet \
        --data-dir "$WORK/data/digits-encode" --out "$WORK/encode" --json "$OUT/encode_throughput.json" \
        "index.use_gpu=$USE_GPU" data.image_size=28
    # ------------------------------------------------------------ 6. retrieval quality for a fixed budget
    if [ "$QUALITY_MINUTES" != "0" ]; then
        # Training budget plus start-up, the untrained, checkpoint and final evaluations (each
        # ~1 min of 10,000 x 60,000 on 2 CPU cores: ~7 min of overhead in a CPU dry run).
        STEP_TIMEOUT=$(awk -v m="$QUALITY_MINUTES" -v t="$STEP_TIMEOUT" 'BEGIN { printf "%d", m * 60 * 1.2 + 2 * t }') \
        run_step quality "$PY" benchmarks/quality_fashion_mnist.py --split test --bits 32 --methods sscq \
            --workers 1 --curve-methods sscq --curve-bits 32 --curve-points 20 --quiet \
            --data-dir "$FMNIST_DATA" --out "$WORK/quality" \
            "train.use_gpu=$USE_GPU" "train.time_budget_minutes=$QUALITY_MINUTES"
        for f in results.json results.md map_vs_time.png; do
            cp "$WORK/quality/$f" "$OUT/quality_$f" 2> /dev/null
        done
    fi
else
    log "no usable CUDA device: training and encoding checks skipped"
fi

# ---------------------------------------------------------------- summary JSON
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
steps = {}
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, rc, secs = line.rstrip("\n").split("\t")
        steps[name] = {"exit_code": int(rc), "seconds": int(secs)}
summary = {"cuda": load("cuda.json"), "steps": steps, "train": load("train_metrics.json"),
           "train_throughput": load("train_throughput.json"),
           "train_throughput_compile": load("train_throughput_compile.json"),
           "encode_throughput": load("encode_throughput.json"),
           "quality": load("quality_results.json")}
tt, et = summary["train_throughput"] or {}, summary["encode_throughput"] or {}
tc = summary["train_throughput_compile"] or {}
summary["headline"] = {
    "train_images_per_s_ray_1worker": (tt.get("ray") or [{}])[0].get("images_per_s"),
    "train_images_per_s_plain": (tt.get("plain") or {}).get("images_per_s"),
    "train_overhead_ratio": (tt.get("overhead_ratio") or {}).get("1"),
    "train_data_wait_fraction": (tt.get("ray") or [{}])[0].get("data_wait_fraction"),
    "train_images_per_s_ray_1worker_compiled": (tc.get("ray") or [{}])[0].get("images_per_s"),
    "stream_bytes_per_image": tt.get("stream_bytes"),
    "encode_reindex_images_per_s": (et.get("reindex") or {}).get("images_per_s"),
    "encode_bare_forward_images_per_s": (et.get("bare") or {}).get("forward_images_per_s"),
    "encode_ratio": et.get("ratio_reindex_vs_bare"),
}
# The quality run's result (results.json keeps one row per method/bits).
q = ((summary["quality"] or {}).get("results") or {}).get("sscq/32") or {}
summary["headline"].update(quality_map_at_1000_32b=q.get("map_sql2"), quality_float_map=q.get("map_float"),
                           quality_epochs=q.get("epochs"), quality_train_wall_s=q.get("train_wall_s"),
                           quality_images_per_s=q.get("images_per_s"))
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps({"steps": steps, "headline": summary["headline"]}, indent=1))
EOF
log "wrote $OUT/gpu_check.json"
# Exit status: 1 when any step failed (the JSON is written either way); a CPU dry run
# does not count the missing GPU.
if awk -F'\t' -v use_gpu="$USE_GPU" '$2 != 0 && !($1 == "cuda" && use_gpu == "false") { bad = 1 }
        END { exit bad }' "$STATUS_FILE"; then
    exit 0
fi
exit 1
