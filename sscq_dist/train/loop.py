"""The per-worker training function: Ray Train worker + DeepSpeed engine + SSCQ objective.

Runs on every worker. Reads uint8 images (N, H, W, C), moved to the worker's device, where
`two_views` makes the two augmented views (SPEC section 4). A streamed set comes through
`ray.train.get_dataset_shard("train")`: one `iter_torch_batches` per epoch, one Ray Data
execution per epoch, whose block order and local shuffle are seeded by (seed, epoch). A
cached set comes as the block refs the driver materialised, and each rank deals itself its
share of every epoch (`sscq_dist.data.cached_shard`).

Checkpoints: every rank saves its DeepSpeed part and its neighbour-bank shard, then
`ray.train.report(metrics, checkpoint)`, at the end of every `train.checkpoint_every_epochs`
epochs and, with `train.checkpoint_every_steps` = N > 0, every N global steps inside an
epoch too. A restarted worker group resumes from the latest one (`resume_position`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from sscq_dist.config import Config, TrainConfig, from_dict
from sscq_dist.data.cached_shard import epoch_batches
from sscq_dist.data.pipeline import DropCounter, check_drop_ceiling
from sscq_dist.train.progress import WorkerConsole

log = logging.getLogger(__name__)

TRAIN_DATASET = "train"
BANK_FILE = "bank_rank{rank}.pt"
CLIENT_STATE_KEYS = ("epoch", "step_in_epoch", "global_step", "images_seen", "seed")
LOSS_TERMS = ("icf", "icz", "cc", "pn", "cd")
# Source files with drops that each rank contributes to the drop-ceiling error line.
DROP_EXAMPLES_PER_RANK = 3
# Ray Train's controller collects reported checkpoints when it polls the workers (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s); a checkpoint reported less than a poll
# before a worker dies is lost. After a step checkpoint the worker waits this many polls.
REPORT_POLLS_WAITED = 1.5

# train.time_budget_minutes: steps skipped before the step rate is measured (first-call and
# compile costs), and the fewest steps measured before the schedule is laid out.
BUDGET_RATE_SKIP_STEPS = 3
BUDGET_MIN_MEASURED_STEPS = 10


def make_optimizer(params, t) -> torch.optim.Optimizer:
    """train.optimizer: Adam, or SGD with Nesterov momentum (train.momentum)."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0,
                               weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


@dataclass
class StepPlan:
    """Global steps the lr schedule spans; with a time budget, also where training stops.

    Mutable: `plan_budget_steps` moves `total` once the step rate is measured.
    """

    total: int


def lr_lambda(warmup_steps: int, total_steps: "int | StepPlan"):
    """Linear warm-up to 1, then cosine decay to 0 (multiplier for the base lr).

    total_steps: a fixed count, or a StepPlan read at every step (time-budget runs).
    """
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        total = total_steps.total if isinstance(total_steps, StepPlan) else total_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def plan_budget_steps(budget_s: float, elapsed_s: float, measured_steps: int, measured_s: float,
                      global_step: int, max_steps: int) -> int:
    """Global steps that fit in the time budget: those done plus the remaining time at the
    measured rate (measured_steps in measured_s), never more than max_steps (train.epochs)."""
    rate = measured_steps / max(measured_s, 1e-9)
    remaining = max(0.0, budget_s - elapsed_s)
    return int(min(max_steps, global_step + math.floor(rate * remaining)))


def deepspeed_config(cfg: Config, local_batch: int) -> dict:
    """DeepSpeed engine config: ZeRO stage and clipping from our config.

    Weights stay fp32 in the engine; bf16 is torch autocast around the forward pass
    (`Precision`), so the fp32 master weights and the losses keep full precision.
    """
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": local_batch * cfg.train.num_workers,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # Our optimizer is torch's Adam (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _codeword_usage(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Per-subspace usage counts of hard codes: (N, M) int -> (M, K) float."""
    m = codes.shape[1]
    one_hot = torch.zeros(codes.shape[0], m, k, device=codes.device)
    one_hot.scatter_(2, codes.unsqueeze(-1), 1.0)
    return one_hot.sum(0)


def _equalise_batch(batch: dict, world: int, device: torch.device) -> Optional[dict]:
    """Cut every rank's batch to the smallest valid count so all-gathers line up.

    Ranks may lose different numbers of undecodable rows; the global batch must have the
    same local size on every rank. Returns None when too few rows remain (skip the step).
    """
    n = torch.tensor([len(batch["id"])], device=device)
    if world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n.item())
    if n < 2:
        return None
    return {k: v[:n] for k, v in batch.items()}


@dataclass
class Precision:
    """What the worker runs with, resolved from the config for its device.

    bf16: forward pass under torch.autocast(bfloat16); channels_last: model and views in
    channels-last memory format; compile: `nn.Module.compile()` (torch.compile in place,
    so state-dict keys and checkpoints do not change).
    """

    bf16: bool
    channels_last: bool
    compile: bool


CPUINFO = "/proc/cpuinfo"


# CPU flags of bf16 hardware: AMX tiles (Intel) or AVX-512 bf16 dot products (AMD Zen 4, Intel
# Cooper Lake). The SSCQ step on 2 cores, fp32 -> bf16 + channels_last: AMX 553 -> 1,215 img/s
# (small_cnn, 28 px); AVX-512 bf16 only (AMD EPYC) 457 -> 936 img/s (VGG-8, 28 px); BENCHMARKS.md.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16(cpuinfo: str = CPUINFO) -> bool:
    """True where the CPU computes bf16 in hardware (`FAST_BF16_FLAGS` in its flags).

    Reads the flags of `cpuinfo` (Linux); where that file is missing, asks torch's own AMX probe.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in FAST_BF16_FLAGS for flag in line.split(":", 1)[1].split())
        return False
    except OSError:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe()) if probe is not None else False


def resolve_precision(t: TrainConfig, device: torch.device, cpu_bf16: Optional[bool] = None) -> Precision:
    """None (auto) = bf16 and channels_last on CUDA devices (bf16 where the GPU supports it)
    and on CPUs with bf16 hardware (`cpu_has_fast_bf16`, or `cpu_bf16` when given); fp32 and the
    default layout on other CPUs; compile on CUDA only (its start-up cost did not pay on CPU,
    BENCHMARKS.md). true/false force a switch on any device (the tests run all three on CPU).
    """
    cuda = device.type == "cuda"
    fast_cpu = device.type == "cpu" and (cpu_has_fast_bf16() if cpu_bf16 is None else cpu_bf16)

    def pick(v: Optional[bool], auto: bool) -> bool:
        return auto if v is None else bool(v)

    # Channels-last weights only under ZeRO 0: ZeRO 1-3 put every parameter in a flat buffer in
    # the default layout (config validation refuses an explicit true there).
    return Precision(bf16=pick(t.bf16, (cuda and torch.cuda.is_bf16_supported()) or fast_cpu),
                     channels_last=pick(t.channels_last, (cuda or fast_cpu) and t.zero_stage == 0),
                     compile=pick(t.compile, cuda))


def use_interpreter_ninja() -> None:
    """Put this interpreter's bin directory first on PATH when it holds `ninja` (the lock pins one).

    DeepSpeed JIT-builds its CPU shared-memory all-reduce op with the first `ninja` on PATH,
    into one build directory per user (~/.cache/torch_extensions). A system ninja (1.11) and
    the lock's (1.13) keep incompatible build logs, so each rebuilds the op whenever the other
    built it last: processes started from a venv-activated shell and from a plain one (Ray
    workers inherit either) took turns, ~30 s of g++ on 2 cores per turn, three turns a suite.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(bindir, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


def make_engine(model: torch.nn.Module, optimizer, scheduler, cfg: Config, local_batch: int, precision: Precision):
    """deepspeed.initialize, then the layout and compile switches on the engine's module.

    Channels-last comes after initialize: DeepSpeed's start-up broadcast views every parameter
    as bytes, which a channels-last weight refuses. `.to(memory_format=...)` swaps each
    parameter's data in place, so the optimizer keeps the same Parameter objects.
    """
    use_interpreter_ninja()
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, local_batch), dist_init_required=False)
    if precision.channels_last:
        engine.module.to(memory_format=torch.channels_last)
    if precision.compile:
        engine.module.compile()  # in place: parameter names (checkpoints) unchanged
    return engine, optimizer, scheduler


def autocast(device: torch.device, precision: Precision):
    """bf16 autocast for the forward pass when switched on, else a no-op context."""
    if not precision.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class ResumePosition:
    """Where a run continues: epoch, steps of it already trained, global step, images seen."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    images_seen: int = 0


def resume_position(client_state: dict, steps_per_epoch: int) -> ResumePosition:
    """The position to continue from, given a checkpoint's client state.

    An epoch-end checkpoint (step_in_epoch == steps_per_epoch, or a checkpoint written
    before step checkpoints existed) continues at the next epoch, step 0. A step
    checkpoint of epoch e after k steps continues epoch e at step k: the model, optimiser,
    lr schedule (global step) and neighbour bank are restored exactly, and the views of
    every later step are too (their generator is seeded by (seed, rank, global step)).

    The data position is exact for a cached set: its epoch order is a function of (seed,
    epoch, rank, world), and the resumed epoch skips the k batches already trained on. For a
    streamed set it is approximated: the resumed epoch trains its remaining
    steps_per_epoch - k steps on a fresh pass over the data in a new seeded order, not on
    the rows the lost pass had not reached yet. Exact replay is not possible there because
    Ray Data's streaming split hands blocks to workers in arrival order. For SGD this is
    sound: every batch is still a uniform random sample of the training set, so each step's
    gradient stays an unbiased estimate and the step count and lr schedule are exact; the
    cost is that in that one epoch some images are seen twice and others not at all
    (k / steps_per_epoch of an epoch sampled with replacement). At most the steps since
    the last checkpoint (one interval) are trained again.
    """
    epoch = int(client_state["epoch"])
    step = int(client_state.get("step_in_epoch", steps_per_epoch))
    if step >= steps_per_epoch:
        epoch, step = epoch + 1, 0
    return ResumePosition(epoch, step, int(client_state["global_step"]), int(client_state["images_seen"]))


def epoch_shuffle_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the worker's local shuffle buffer in one epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0])


def train_func(loop_config: dict) -> None:
    """Ray Train entry: loop_config = {"cfg": Config dict, "steps_per_epoch": int, "run_id": str|None,
    "tracking_uri": str|None, "shard_uris": list of source file URIs (index = the stream's `shard`)}."""
    import ray.train

    from sscq_dist.data.augment import two_views
    from sscq_dist.losses.objective import SSCQObjective
    from sscq_dist.model import build_model, convert_sync_batchnorm
    from sscq_dist.neighbor_bank import NeighborBank
    from sscq_dist.tracking import RunLogger

    cfg: Config = from_dict(loop_config["cfg"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    shard_uris: list = loop_config.get("shard_uris") or []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    precision = resolve_precision(cfg.train, device)

    torch.manual_seed(cfg.train.seed)  # same init on every rank; DeepSpeed broadcasts anyway
    model = build_model(cfg.model, cfg.data.channels)
    if use_gpu and cfg.model.sync_batchnorm and world > 1:
        model = convert_sync_batchnorm(model)
    objective = SSCQObjective(cfg.loss, cfg.model)
    local_batch = cfg.train.global_batch_size // world
    bank = None
    if cfg.bank.enabled:
        bank = NeighborBank(cfg.model.num_codebooks, cfg.model.codeword_dim, cfg.bank.size, world, rank).to(device)

    max_steps = steps_per_epoch * cfg.train.epochs
    plan = StepPlan(max_steps)
    budget_s = 60.0 * cfg.train.time_budget_minutes
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    optimizer = make_optimizer(model.parameters(), cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, plan))
    engine, optimizer, scheduler = make_engine(model, optimizer, scheduler, cfg, local_batch, precision)

    relay = WorkerConsole(loop_config.get("progress_queue") if rank == 0 else None)

    def say(text: str, force: bool = False) -> None:
        print(text, flush=True)  # every line reaches the job's log file
        relay.line(text, force)  # a throttled few reach the operator's terminal

    pos = ResumePosition()
    plan_frozen = False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag="sscq")
            pos = resume_position(client_state, steps_per_epoch)
            if budget_s and "planned_steps" in client_state:
                # A resumed budget run keeps its plan: the time before the failure is spent.
                plan.total, plan_frozen = int(client_state["planned_steps"]), True
            if bank is not None:
                bank.load_state_dict(torch.load(os.path.join(ckpt_dir, BANK_FILE.format(rank=rank)),
                                                map_location=device, weights_only=True))
        if rank == 0:
            say(f"[train] resumed from a checkpoint: epoch {pos.epoch + 1} step {pos.step_in_epoch} "
                f"(global step {pos.global_step})", force=True)
    global_step, images_seen = pos.global_step, pos.images_seen

    logger = None
    if rank == 0 and loop_config.get("run_id"):
        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.max_attempts,
                           request_timeout_s=cfg.tracking.request_timeout_s)

    cached = loop_config.get("cached_blocks")
    shard = None if cached is not None else ray.train.get_dataset_shard(TRAIN_DATASET)
    k = cfg.model.num_codewords
    every = cfg.train.checkpoint_every_steps

    def save_and_report(metrics: dict, epoch: int, step_in_epoch: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="sscq", client_state={
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "images_seen": images_seen, "seed": cfg.train.seed, "planned_steps": plan.total})
            if bank is not None:
                torch.save(bank.state_dict(), os.path.join(tmp, BANK_FILE.format(rank=rank)))
            if world > 1:
                dist.barrier()  # every rank's part is on disk before the report
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # Time budget: the clock runs from here; the step rate is measured from the
    # BUDGET_RATE_SKIP_STEPS-th step on and the schedule is laid out once at least
    # max(warm-up, BUDGET_MIN_MEASURED_STEPS) steps are measured, then again at every epoch end.
    budget = {"t0": time.perf_counter(), "rate_t0": None, "rate_step0": 0, "planned": False}
    run_steps = 0

    def replan() -> None:
        now = time.perf_counter()
        total = plan_budget_steps(budget_s, now - budget["t0"], global_step - budget["rate_step0"],
                                  now - budget["rate_t0"], global_step, max_steps)
        t = torch.tensor([total], device=device)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)  # every rank stops at the same step
        plan.total = max(int(t.item()), global_step)
        budget["planned"] = True
        if rank == 0:
            say(f"[train] time budget {cfg.train.time_budget_minutes:g} min: {plan.total} steps "
                f"({plan.total / steps_per_epoch:.2f} epochs) planned at step {global_step}", force=True)

    for epoch in range(pos.epoch, cfg.train.epochs):
        if budget_s and global_step >= plan.total:
            break
        first_step = pos.step_in_epoch if epoch == pos.epoch else 0
        if cached is not None:  # this rank's share of the epoch, past the batches already trained on
            stream = (_to_torch(b, device) for b in epoch_batches(cached, epoch, rank, world, local_batch, first_step))
        else:  # one execution per epoch; its block order is seeded by (seed, epoch) in the dataset
            stream = iter(shard.iter_torch_batches(
                batch_size=local_batch, drop_last=True, device=device, prefetch_batches=cfg.data.prefetch_batches,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=epoch_shuffle_seed(cfg.train.seed, rank, epoch) if cfg.data.shuffle_buffer else None))
        engine.train()
        use_bank = bank is not None and epoch >= cfg.bank.warmup_epochs
        drops = DropCounter()
        sums = {t: 0.0 for t in LOSS_TERMS + ("total",)}
        usage = torch.zeros(cfg.model.num_codebooks, k, device=device)
        steps = 0
        data_wait = augment_s = checkpoint_s = 0.0
        epoch_t0 = time.perf_counter()
        t_ready = time.perf_counter()
        for raw in _take(stream, steps_per_epoch - first_step):
            t_data = time.perf_counter()
            data_wait += t_data - t_ready
            batch = _equalise_batch(drops.filter(raw), world, device)
            if batch is None:
                t_ready = time.perf_counter()
                continue
            n = len(batch["id"])
            views = two_views(batch["image"], cfg.data.augment, cfg.train.seed, rank, global_step,
                              channels_last=precision.channels_last)
            t_aug = time.perf_counter()
            augment_s += t_aug - t_data
            with autocast(device, precision):
                out = engine(views)
            out_a, out_b = _split(out, n)
            losses = objective(out_a, out_b, _codebooks(engine), bank=bank, use_bank=use_bank)
            _check_finite(losses, global_step, epoch, world, device)
            engine.backward(losses["total"])
            engine.step()
            if bank is not None:
                z = out_b.z.detach().float().view(n, cfg.model.num_codebooks, cfg.model.codeword_dim)
                bank.enqueue(z)
            usage += _codeword_usage(out_a.codes, k)
            steps += 1
            global_step += 1
            run_steps += 1
            images_seen += n * world
            for t in sums:
                sums[t] += float(losses[t].detach())
            t_ready = time.perf_counter()
            if budget_s and not plan_frozen:
                if run_steps == BUDGET_RATE_SKIP_STEPS:
                    budget["rate_t0"], budget["rate_step0"] = t_ready, global_step
                elif (not budget["planned"] and run_steps > BUDGET_RATE_SKIP_STEPS
                      and global_step - budget["rate_step0"] >= max(warmup_steps, BUDGET_MIN_MEASURED_STEPS)):
                    replan()
            rate = n * world * steps / max(1e-9, t_ready - epoch_t0 - checkpoint_s)
            if logger and global_step % cfg.train.log_every_steps == 0:
                logger.log_metrics({**{f"loss/{t}": float(losses[t].detach()) for t in sums},
                                    "lr": scheduler.get_last_lr()[0], "images_per_s": rate,
                                    "codeword_entropy": float(losses["codeword_entropy"])}, step=global_step)
            if rank == 0 and global_step % cfg.train.log_every_steps == 0:
                say(f"[train] epoch {epoch + 1}/{cfg.train.epochs} step {first_step + steps}/{steps_per_epoch} "
                    f"loss {float(losses['total'].detach()):.4f} {rate:.0f} img/s")
            if every and global_step % every == 0 and first_step + steps < steps_per_epoch:
                t_ck = time.perf_counter()
                _check_drops(drops, shard_uris, cfg.data.max_drop_fraction, world, device)
                save_and_report({"epoch": epoch, "step_in_epoch": first_step + steps, "global_step": global_step,
                                 "images_seen": images_seen}, epoch, first_step + steps)
                # Let the controller register it before training moves on, so a failure after
                # this point repeats at most the next interval (measured: without the wait a
                # kill 1 s after a checkpoint resumed from the one before it).
                time.sleep(REPORT_POLLS_WAITED * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
                if rank == 0:
                    print(f"[train] step checkpoint: epoch {epoch + 1} step {first_step + steps} "
                          f"(global step {global_step})", flush=True)  # the log file only
                checkpoint_s += time.perf_counter() - t_ck
                t_ready = time.perf_counter()
            if budget_s and global_step >= plan.total:
                break  # the budget is spent: this epoch's metrics and the final checkpoint follow
        stopped = bool(budget_s) and global_step >= plan.total
        if budget_s and not plan_frozen and budget["rate_t0"] is not None and not stopped:
            replan()  # correct the plan for the rate seen so far (checkpoints, evaluation pauses)
            stopped = global_step >= plan.total
        epoch_s = time.perf_counter() - epoch_t0 - checkpoint_s
        _check_drops(drops, shard_uris, cfg.data.max_drop_fraction, world, device)
        metrics = _epoch_metrics(sums, steps, usage, drops, data_wait, epoch_s, world, device)
        metrics.update(epoch=epoch, step_in_epoch=steps_per_epoch, global_step=global_step,
                       images_seen=images_seen, resumed_at_step=first_step,
                       images_per_s=steps * cfg.train.global_batch_size / max(1e-9, epoch_s),
                       augment_fraction=augment_s / max(1e-9, epoch_s),
                       lr=scheduler.get_last_lr()[0], bank_active=float(use_bank))
        if logger:
            logger.log_metrics({f"epoch/{k_}": v for k_, v in metrics.items() if k_ not in ("epoch", "fatal")},
                               step=global_step)
            logger.flush()
        last = epoch + 1 == cfg.train.epochs or stopped
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            save_and_report(metrics, epoch, steps_per_epoch)
        else:
            ray.train.report(metrics)
        if rank == 0:
            say(f"[train] epoch {epoch + 1}/{cfg.train.epochs} done: loss {metrics['loss/total']:.4f}, "
                f"{metrics['images_per_s']:.0f} img/s, data wait {100 * metrics['data_wait_fraction']:.1f}%, "
                f"dropped {metrics['dropped_images']}, codeword entropy {metrics['codeword_entropy']:.2f}",
                force=last)
    if logger:
        logger.close(cfg.tracking.final_flush_s)


def _check_drops(drops: DropCounter, shard_uris: list, max_fraction: float, world: int,
                 device: torch.device) -> None:
    """Stop every rank together when the epoch's undecodable share is above the ceiling.

    Ranks sum their row and drop counts; only when the ceiling is crossed do they gather
    their worst source files (DROP_EXAMPLES_PER_RANK each) for the one-line error.
    """
    counts = torch.tensor([float(drops.rows), float(drops.dropped)], device=device)
    if world > 1:
        dist.all_reduce(counts)
    rows, dropped = int(counts[0]), int(counts[1])
    if rows == 0 or dropped / rows <= max_fraction:
        return
    worst = drops.by_shard.most_common(DROP_EXAMPLES_PER_RANK)
    mine = torch.full((DROP_EXAMPLES_PER_RANK, 2), -1.0, device=device)
    for i, (s, c) in enumerate(worst):
        mine[i, 0], mine[i, 1] = float(s), float(c)
    parts = [torch.empty_like(mine) for _ in range(world)]
    if world > 1:
        dist.all_gather(parts, mine)
    else:
        parts = [mine]
    by_shard: dict[int, int] = {}
    for row in torch.cat(parts).tolist():
        if row[0] >= 0:
            by_shard[int(row[0])] = by_shard.get(int(row[0]), 0) + int(row[1])
    check_drop_ceiling(rows, dropped, by_shard, shard_uris, max_fraction)


def _to_torch(batch: dict, device: torch.device) -> dict:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def _take(stream, n: int):
    """The next n batches of the stream (fewer only if the stream ends)."""
    for _ in range(n):
        try:
            yield next(stream)
        except StopIteration:
            return


def _codebooks(engine) -> torch.Tensor:
    return engine.module.quantizer.codebooks.float()


def _split(out, n: int):
    from sscq_dist.model import SSCQOutput

    def part(sl):
        return SSCQOutput(f=out.f[sl].float(), z=out.z[sl].float(), soft=out.soft[sl].float(), codes=out.codes[sl])
    return part(slice(0, n)), part(slice(n, 2 * n))


def _check_finite(losses: dict, step: int, epoch: int, world: int, device: torch.device) -> None:
    """Stop every rank together, naming the first non-finite term, before a NaN reaches the weights."""
    from sscq_dist.errors import TrainingError

    vals = torch.stack([losses[t].detach().float() for t in LOSS_TERMS + ("total",)]).to(device)
    bad = (~torch.isfinite(vals)).float()
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.any():
        term = (LOSS_TERMS + ("total",))[int(bad.nonzero()[0])]
        raise TrainingError(f"non-finite loss term '{term}' at step {step} (epoch {epoch}); "
                            f"lower train.lr or check the input data")


def _epoch_metrics(sums: dict, steps: int, usage: torch.Tensor, drops: DropCounter, data_wait: float,
                   epoch_s: float, world: int, device: torch.device) -> dict:
    """Epoch means over all ranks (losses), global sums (drops, usage)."""
    vals = torch.tensor([sums[t] for t in sums] + [float(steps), float(drops.dropped), data_wait], device=device)
    if world > 1:
        dist.all_reduce(vals)
        dist.all_reduce(usage)
    names = list(sums)
    steps_all = max(1.0, float(vals[len(names)]))
    out = {f"loss/{t}": float(vals[i]) / steps_all for i, t in enumerate(names)}
    p = usage / usage.sum(1, keepdim=True).clamp(min=1)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum(1).mean()
    out["codeword_entropy"] = float(ent)
    out["dropped_images"] = int(vals[len(names) + 1])
    out["data_wait_s"] = float(vals[len(names) + 2]) / world
    out["data_wait_fraction"] = out["data_wait_s"] / max(1e-9, epoch_s)
    out["steps"] = int(steps)
    return out
