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


def test_budget_plan_follows_measured_rate():
    from sscq_dist.train.loop import StepPlan, plan_budget_steps

    # 10 steps measured in 2 s (5 steps/s), 60 s of a 100 s budget spent at step 250: 200 more.
    assert plan_budget_steps(100.0, 60.0, 10, 2.0, 250, 10_000) == 450
    assert plan_budget_steps(100.0, 60.0, 10, 2.0, 250, 300) == 300  # train.epochs caps it
    assert plan_budget_steps(100.0, 120.0, 10, 2.0, 250, 10_000) == 250  # over budget: stop now
    plan = StepPlan(1000)
    f = lr_lambda(10, plan)
    assert f(505) == pytest.approx(0.5, abs=1e-6)
    plan.total = 100  # the schedule follows the plan when it moves
    assert f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_deepspeed_op_builds_use_the_interpreters_ninja(monkeypatch):
    """Every process builds DeepSpeed's CPU op with the lock's ninja, whatever PATH it started
    with: a system ninja first on PATH would rebuild the op the venv's ninja built, and back."""
    import shutil
    import sys

    from sscq_dist.train.loop import use_interpreter_ninja

    venv_ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.access(venv_ninja, os.X_OK), "the lock installs ninja beside the interpreter"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_interpreter_ninja()
    assert shutil.which("ninja") == venv_ninja
    use_interpreter_ninja()  # idempotent: PATH is not prepended twice
    assert os.environ["PATH"].split(os.pathsep).count(os.path.dirname(sys.executable)) == 1


def test_workers_path_is_set_for_ray_start_and_restored(monkeypatch):
    from sscq_dist.train.driver import workers_path

    monkeypatch.setenv("PYTHONPATH", "/already")
    with workers_path("/repo"):
        assert os.environ["PYTHONPATH"] == os.pathsep.join(["/repo", "/already"])
    assert os.environ["PYTHONPATH"] == "/already"
    monkeypatch.delenv("PYTHONPATH")
    with workers_path("/repo"):
        assert os.environ["PYTHONPATH"] == "/repo"
    assert "PYTHONPATH" not in os.environ


def test_session_workers_start_without_runtime_env_setup_and_import_the_repo(ray_local):
    """The session's Ray (as `init_ray`'s local Ray) gives workers the repository through the
    raylet's environment: each worker process is Ray's worker itself, not its runtime-env setup
    script first (~0.35 CPU-s less per worker, hundreds of workers a suite)."""
    import sys

    @ray_local.remote
    def probe():
        import ray

        return dict(ray.get_runtime_context().runtime_env), sys.path

    runtime_env, path = ray_local.get(probe.remote())
    assert runtime_env == {}, runtime_env  # a non-empty one starts every worker through Ray's setup script
    assert os.path.dirname(os.path.dirname(os.path.abspath(__file__))) in path


def test_time_budget_stops_training_and_registers(tmp_path, digits_dir, ray_local):
    """train.time_budget_minutes: the run stops inside the budget, well before train.epochs,
    with the lr schedule ended (cosine at 0) and the model registered as usual."""
    from sscq_dist.train.driver import run_training

    # 15 s: the plan needs ~15 steps (warm-up, then BUDGET_MIN_MEASURED_STEPS measured), < 5 s
    # even on busy shared cores; 200 epochs would take minutes.
    budget_min = 0.25
    cfg = make_cfg(tmp_path, digits_dir, "train.epochs=200", "train.run_name=budget-test",
                   f"train.time_budget_minutes={budget_min}", "train.warmup_epochs=0.5")
    result = run_training(cfg)
    m = result.metrics
    assert result.version is not None
    assert m["epoch"] + 1 < cfg.train.epochs  # stopped by the budget, not by the epoch count
    assert m["lr"] < 0.05 * cfg.train.lr  # the schedule was laid out to end at the stop


def test_training_registers_challenger_with_metrics_and_artifacts(trained):
    from mlflow.tracking import MlflowClient

    cfg, r = trained["cfg"], trained["result"]
    assert trained["seconds"] < 300, f"demo training took {trained['seconds']:.0f}s (limit 5 min)"
    client = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)  # not a global one
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


def test_a_cached_set_trains_without_a_split_coordinator(trained):
    """The cached digits set reaches the workers as block refs (data/cached_shard.py): the run
    starts its controller and two workers, and no Ray Data split coordinator."""
    started = trained["actors_started"]
    assert started.count("RayTrainWorker") == 2, started
    assert not [c for c in started if "SplitCoordinator" in c], started


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


def test_worker_killed_between_step_checkpoints_resumes_mid_epoch(tmp_path, digits_dir, ray_local):
    """SIGKILL a worker after the first step checkpoint: the run resumes mid-epoch from the
    latest checkpoint, and repeats at most checkpoint_every_steps steps."""
    from mlflow.tracking import MlflowClient

    from sscq_dist.train.driver import run_training

    every = 3
    cfg = make_cfg(tmp_path, digits_dir, "train.epochs=3", "train.run_name=kill-test", "bank.enabled=true",
                   "bank.size=256", "bank.warmup_epochs=0", "train.max_failures=2", "train.log_every_steps=1",
                   "train.checkpoint_every_epochs=1", f"train.checkpoint_every_steps={every}")
    killed = {}

    def killer():
        import traceback

        try:
            _killer()
        except Exception:
            killed["error"] = traceback.format_exc()

    def _killer():
        deadline = time.time() + 900  # worker start-up alone can take minutes on a loaded 2-core machine
        while time.time() < deadline and not killed:
            # A checkpoint counts once Ray Train has registered it in the run's snapshot.
            snaps = [os.path.join(r, f) for r, _, files in os.walk(tmp_path / "runs") for f in files
                     if f == "checkpoint_manager_snapshot.json"]
            if snaps and "checkpoint_dir_name" in open(snaps[0]).read():
                time.sleep(1.0)  # a few steps past the checkpoint, so some are lost and redone
                pids = _worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["pid"] = pids[-1]
                    return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_training(cfg)
    t.join(timeout=1)
    assert "pid" in killed, f"no worker was killed: {killed.get('error', 'no checkpoint appeared')}"
    client = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)

    def history(key):
        return sorted(client.get_metric_history(result.run_id, key), key=lambda m: (m.step, m.timestamp))

    spe = int(history("epoch/global_step")[0].value)  # the first epoch ends at global step = steps per epoch
    assert result.metrics["epoch"] == 2 and result.metrics["global_step"] == 3 * spe
    # A restart really happened, from a step checkpoint inside an epoch.
    resumed = [int(m.value) for m in history("epoch/resumed_at_step") if m.value > 0]
    assert len(resumed) == 1 and resumed[0] % every == 0 and 0 < resumed[0] < spe, resumed
    # Rank 0 logs every step synchronously: a step logged twice was trained twice.
    steps = [m.step for m in history("loss/total")]
    repeated = len(steps) - len(set(steps))
    print(f"resumed at step {resumed[0]} of {spe}; repeated steps: {repeated} (at most {every})")
    assert sorted(set(steps)) == list(range(1, 3 * spe + 1))  # every step trained, none skipped
    assert repeated <= every
    imgs = history("epoch/images_seen")
    assert imgs[-1].value == 3 * spe * cfg.train.global_batch_size


def _corrupt_training_set(d, rows=300, good_in_first=30):
    """part-00000: mostly undecodable rows (truncated PNGs); part-00001: clean."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sscq_dist.data.schema import IMAGE_SCHEMA
    from sscq_dist.ingest import png_bytes

    d.mkdir()
    rng = np.random.default_rng(0)
    imgs = [png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(rows)]
    for part, lo in enumerate((0, rows // 2)):
        batch = [im if part == 1 or i < good_in_first else im[: len(im) // 2]
                 for i, im in enumerate(imgs[lo:lo + rows // 2])]
        ids = list(range(lo, lo + rows // 2))
        pq.write_table(pa.Table.from_pydict({"id": ids, "image": batch, "uri": [None] * len(ids),
                                             "label": [[0]] * len(ids)}, schema=IMAGE_SCHEMA),
                       d / f"part-0000{part}.parquet")
    return str(d)


@pytest.mark.parametrize("path", ["cached", "streaming"])
def test_drop_ceiling_stops_training_and_registers_nothing(tmp_path, ray_local, path):
    from mlflow.tracking import MlflowClient

    from sscq_dist.errors import TrainingError
    from sscq_dist.train.driver import run_training

    train = _corrupt_training_set(tmp_path / "bad")
    cfg = make_cfg(tmp_path, str(tmp_path), f"data.train_uri={train}", "train.epochs=1", "train.max_failures=0",
                   "train.run_name=drop-test", "data.max_drop_fraction=0.05",
                   *(["data.cache_max_rows=0"] if path == "streaming" else []))
    with pytest.raises(TrainingError) as err:
        run_training(cfg)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg.strip() and "did not decode, above data.max_drop_fraction=0.05" in msg
    assert "part-00000.parquet" in msg and "part-00001.parquet" not in msg  # the bad file, not the clean one
    if path == "cached":  # counted exactly on the driver: 120 of the 150 rows in part-00000 are truncated
        assert msg.startswith("120 of 300 training images (40.0%)")
    # registry_uri explicitly: an earlier test's mlflow.set_registry_uri is process-global.
    client = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    assert client.search_model_versions("name='sscq'") == []


def test_cpu_precision_auto_follows_bf16_hardware(tmp_path):
    """Auto precision on CPU: bf16 (+ channels_last under ZeRO 0) where /proc/cpuinfo lists
    amx_bf16 or avx512_bf16, fp32 elsewhere."""
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.train.loop import Precision, cpu_has_fast_bf16, resolve_precision

    amx, avx512, avx2 = tmp_path / "amx", tmp_path / "avx512", tmp_path / "avx2"
    amx.write_text("processor : 0\nflags : fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    avx512.write_text("processor : 0\nflags : fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    avx2.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_has_fast_bf16(str(amx)) is True
    assert cpu_has_fast_bf16(str(avx512)) is True
    assert cpu_has_fast_bf16(str(avx2)) is False
    t = load_config("configs/digits.yaml", ["train.zero_stage=0"]).train
    cpu = torch.device("cpu")
    assert resolve_precision(t, cpu, cpu_bf16=True) == Precision(True, True, False)
    assert resolve_precision(t, cpu, cpu_bf16=False) == Precision(False, False, False)
    t.zero_stage = 1  # ZeRO 1-3 own the weights' layout: auto channels-last is off there
    assert resolve_precision(t, cpu, cpu_bf16=True) == Precision(True, False, False)
    t.bf16, t.channels_last = False, False  # explicit settings win over detection
    assert resolve_precision(t, cpu, cpu_bf16=True) == Precision(False, False, False)


def test_channels_last_engine_starts_and_steps_under_deepspeed(monkeypatch, tmp_path):
    """A channels-last model through deepspeed.initialize (its start-up broadcast views each
    weight as bytes, which channels-last weights refuse) and one optimizer step: the weights
    end channels-last, the step changes them, state-dict keys are unchanged. ZeRO 1 with an
    explicit channels_last=true is a config error naming the key. The checkpoint exports the
    trained weights, contiguous fp32."""
    import torch
    import torch.distributed as tdist

    from conftest import free_port
    from sscq_dist.config import load_config
    from sscq_dist.data.augment import two_views
    from sscq_dist.errors import ConfigError
    from sscq_dist.losses.objective import SSCQObjective
    from sscq_dist.model import build_model
    from sscq_dist.train.driver import fp32_state_dict
    from sscq_dist.train.loop import Precision, _split, make_engine, make_optimizer

    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config("configs/digits.yaml", ["train.channels_last=true", "train.zero_stage=1"])
    cfg = load_config("configs/digits.yaml", ["train.channels_last=true", "train.zero_stage=0",
                                              "train.num_workers=1", "train.global_batch_size=16"])
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    tdist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, 1)
        keys = list(model.state_dict())
        opt = make_optimizer(model.parameters(), cfg.train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        engine, _, _ = make_engine(model, opt, sched, cfg, 16, Precision(False, True, False))
        convs = [m.weight for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                             for w in convs)  # (a 1-channel input conv's weight is both layouts)
        before = convs[0].detach().clone()
        imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))
        a, b = _split(engine(two_views(imgs, cfg.data.augment, seed=0, channels_last=True)), 16)
        loss = SSCQObjective(cfg.loss, cfg.model)(a, b, engine.module.quantizer.codebooks.float())["total"]
        engine.backward(loss)
        engine.step()
        assert torch.isfinite(loss) and not torch.equal(before, convs[0].detach())
        assert list(engine.module.state_dict()) == keys
        # The exported model of a ZeRO 0 run (DeepSpeed's zero_to_fp32 cannot read its checkpoint).
        engine.save_checkpoint(str(tmp_path), tag="sscq")
        exported = fp32_state_dict(str(tmp_path))
        trained = engine.module.state_dict()
        assert list(exported) == keys and all(
            v.is_contiguous() and v.dtype == torch.float32 and torch.equal(v, trained[k].float())
            for k, v in exported.items())
    finally:
        tdist.destroy_process_group()


def test_optimizer_switch_builds_adam_or_nesterov_sgd():
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.train.loop import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = make_optimizer(params, load_config("configs/digits.yaml").train)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3
    t = load_config("configs/digits.yaml", ["train.optimizer=sgd", "train.lr=0.1", "train.weight_decay=5e-4"]).train
    sgd = make_optimizer(params, t)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"], sgd.defaults["weight_decay"]) == \
        (0.1, 0.9, True, 5e-4)


# Dynamo's capture and AOTAutograd's forward+backward graphs of our model, without Inductor's
# C++ kernel build (25 s cold on 2 cores; on GPUs Inductor emits Triton instead, which a CPU
# build of those kernels would not test either).
COMPILE_BACKEND = "aot_eager"


def test_precision_switches_run_a_step_on_cpu():
    """bf16 autocast, channels-last and torch.compile (the GPU defaults) are correct on CPU too."""
    import torch

    from sscq_dist.config import load_config
    from sscq_dist.data.augment import two_views
    from sscq_dist.losses.objective import SSCQObjective
    from sscq_dist.model import build_model
    from sscq_dist.train.loop import Precision, _split, autocast, cpu_has_fast_bf16, resolve_precision

    cfg = load_config("configs/digits.yaml")
    cpu = torch.device("cpu")
    fast = cpu_has_fast_bf16()
    assert resolve_precision(cfg.train, cpu) == Precision(fast, False, False)  # auto: bf16 on bf16 hardware (ZeRO 1)
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))
    results = {}
    for name, p in {"fp32": Precision(False, False, False), "bf16+cl": Precision(True, True, False),
                    "compile": Precision(False, True, True)}.items():
        torch.manual_seed(0)
        model = build_model(cfg.model, 1)
        if p.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if p.compile:
            model.compile(backend=COMPILE_BACKEND)
        views = two_views(imgs, cfg.data.augment, seed=0, channels_last=p.channels_last)
        with autocast(cpu, p):
            out = model(views)
        a, b = _split(out, 16)
        loss = SSCQObjective(cfg.loss, cfg.model)(a, b, model.quantizer.codebooks.float())["total"]
        loss.backward()
        grad = model.quantizer.codebooks.grad
        assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all(), name
        results[name] = (float(loss), model.state_dict().keys())
    # Same numbers within bf16 precision; compile keeps the parameter names (checkpoints unchanged).
    assert abs(results["bf16+cl"][0] - results["fp32"][0]) < 0.05 * abs(results["fp32"][0])
    assert abs(results["compile"][0] - results["fp32"][0]) < 1e-3 * abs(results["fp32"][0])
    assert list(results["compile"][1]) == list(results["fp32"][1])
