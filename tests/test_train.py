"""Training: Ray Train + DeepSpeed on 2 workers, MLflow tracking and registration, resume, quality."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import make_cfg
from sscq_dist.train.loop import lr_lambda


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_training_registers_challenger_with_metrics_and_artifacts(trained):
    from mlflow.tracking import MlflowClient

    cfg, r = trained["cfg"], trained["result"]
    assert trained["seconds"] < 300, f"demo training took {trained['seconds']:.0f}s (limit 5 min)"
    client = MlflowClient(cfg.tracking.tracking_uri)
    mv = client.get_model_version_by_alias("sscq", "challenger")
    assert str(mv.version) == r.version
    assert {"git_commit", "data_uri", "bits", "config_hash"} <= set(mv.tags)
    assert mv.tags["bits"] == "32" and mv.tags["config_hash"] == cfg.hash()
    run = client.get_run(r.run_id)
    assert run.data.params["model.bits"] == "32" and run.data.params["train.zero_stage"] == "1"
    for key in ("loss/total", "loss/icf", "loss/icz", "loss/cc", "loss/pn", "loss/cd", "lr", "images_per_s",
                "codeword_entropy", "epoch/dropped_images", "epoch/data_wait_s", "epoch/codeword_entropy"):
        assert key in run.data.metrics, key
    epochs = client.get_metric_history(r.run_id, "epoch/loss/total")
    assert len(epochs) == cfg.train.epochs
    assert epochs[-1].value < epochs[0].value  # it learns
    names = {a.path for a in client.list_artifacts(r.run_id)}
    assert {"config.yaml", f"{cfg.train.run_name}-loss.png"} <= names
    # MLflow 3 keeps a logged model beside its run's artifacts: the version's model comes from this run.
    logged = client.get_logged_model(mv.source.rsplit("/", 1)[-1])
    assert logged.source_run_id == r.run_id
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert os.path.exists(os.path.join(cfg.tracking.output_dir, f"{cfg.train.run_name}-loss.png"))


def test_registered_model_loads_without_training_globals(trained):
    from sscq_dist.registry import load_model

    cfg, r = trained["cfg"], trained["result"]
    loaded = load_model(f"models:/sscq/{r.version}", cfg.tracking)
    assert loaded.version == r.version and loaded.codebooks.shape == (8, 16, 16)
    size = cfg.data.image_size
    x = np.zeros((2, 1, size, size), np.float32)
    import torch

    with torch.no_grad():
        assert loaded.model.embed(torch.from_numpy(x)).shape == (2, 128)


def test_quality_beats_untrained(trained):
    """mAP@100 of the trained 32-bit codes on held-out queries >= untrained + 0.1."""
    from sscq_dist.model import build_model
    from sscq_dist.model_eval import evaluate_model, load_eval_sets
    from sscq_dist.registry import load_model

    cfg, r = trained["cfg"], trained["result"]
    sets = load_eval_sets(cfg)
    import torch

    torch.manual_seed(cfg.train.seed)
    untrained = evaluate_model(build_model(cfg.model, cfg.data.channels), sets, 100)["map_sql2"]
    model = load_model(f"models:/sscq/{r.version}", cfg.tracking).model
    got = evaluate_model(model, sets, 100)["map_sql2"]
    print(f"digits mAP@100: trained {got:.4f}, untrained {untrained:.4f}")
    assert got >= untrained + 0.1


def _worker_pids():
    """Live Ray Train worker processes of this test's Ray (process title `ray::RayTrainWorker...`).

    Only descendants of this process (the local Ray it started): another Ray on the machine
    is neither killed nor taken for a replacement.
    """
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline() or []).startswith("ray::RayTrainWorker"):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def test_worker_killed_mid_run_resumes_from_checkpoint(tmp_path, digits_dir, ray_local):
    """SIGKILL a training worker after the first checkpoint: the run resumes, not restarts."""
    from mlflow.tracking import MlflowClient

    from sscq_dist.train.driver import run_training

    cfg = make_cfg(tmp_path, digits_dir, "train.epochs=3", "train.run_name=kill-test", "bank.enabled=true",
                   "bank.size=256", "bank.warmup_epochs=0", "train.max_failures=2",
                   "train.checkpoint_every_epochs=1")
    killed = {}

    def killer():
        import traceback

        try:
            _killer()
        except Exception:
            killed["error"] = traceback.format_exc()

    def _killer():
        deadline = time.time() + 600  # a loaded CI machine can take minutes to the first checkpoint
        while time.time() < deadline and not killed:
            # A checkpoint counts once Ray Train has registered it in the run's snapshot.
            snaps = [os.path.join(r, f) for r, _, files in os.walk(tmp_path / "runs") for f in files
                     if f == "checkpoint_manager_snapshot.json"]
            if snaps and "checkpoint_dir_name" in open(snaps[0]).read():
                pids = _worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["pid"] = pids[-1]
                    break
            time.sleep(0.5)
        while time.time() < deadline:  # Ray Train replaces the worker group: new processes
            new = set(_worker_pids()) - set(pids)
            if new:
                killed["replacements"] = sorted(new)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_training(cfg)
    t.join(timeout=1)
    assert "pid" in killed, f"no worker was killed: {killed.get('error', 'no checkpoint appeared')}"
    assert killed.get("replacements"), f"no replacement worker started: {killed}"
    assert result.metrics["epoch"] == 2
    client = MlflowClient(cfg.tracking.tracking_uri)
    hist = sorted(client.get_metric_history(result.run_id, "epoch/global_step"), key=lambda m: m.step)
    steps = [int(m.value) for m in hist]
    # One MLflow run. Resumed, not restarted: epoch 1's step appears once (an epoch cut
    # short by the kill may be logged again when it is redone from the checkpoint).
    spe = steps[0]
    assert steps.count(spe) == 1, steps
    assert sorted(set(steps)) == [spe, 2 * spe, 3 * spe] and steps[-1] == 3 * spe
    imgs = sorted(client.get_metric_history(result.run_id, "epoch/images_seen"), key=lambda m: m.step)
    assert imgs[-1].value == 3 * spe * cfg.train.global_batch_size
