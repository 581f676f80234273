"""The per-worker training function: Ray Train worker + DeepSpeed engine + SSCQ objective.

Runs on every worker. Reads its data only through `ray.train.get_dataset_shard("train")`.
Checkpoint per epoch: every rank saves its DeepSpeed part and its neighbour-bank shard,
then `ray.train.report(metrics, checkpoint)`; a restarted worker group resumes from it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist

from sscq_dist.config import Config, from_dict
from sscq_dist.data.pipeline import DropCounter

log = logging.getLogger(__name__)

TRAIN_DATASET = "train"
BANK_FILE = "bank_rank{rank}.pt"
CLIENT_STATE_KEYS = ("epoch", "global_step", "images_seen")
LOSS_TERMS = ("icf", "icz", "cc", "pn", "cd")


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 (multiplier for the base lr)."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def deepspeed_config(cfg: Config, local_batch: int, bf16: bool) -> dict:
    """DeepSpeed engine config: ZeRO stage, clipping, precision from our config."""
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": local_batch * cfg.train.num_workers,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # Our optimizer is torch's Adam (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
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


def train_func(loop_config: dict) -> None:
    """Ray Train entry: loop_config = {"cfg": Config dict, "steps_per_epoch": int, "run_id": str|None,
    "tracking_uri": str|None}."""
    import deepspeed
    import ray.train

    from sscq_dist.losses.objective import SSCQObjective
    from sscq_dist.model import build_model, convert_sync_batchnorm
    from sscq_dist.neighbor_bank import NeighborBank
    from sscq_dist.tracking import RunLogger

    cfg: Config = from_dict(loop_config["cfg"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    bf16 = use_gpu and torch.cuda.is_bf16_supported()

    torch.manual_seed(cfg.train.seed)  # same init on every rank; DeepSpeed broadcasts anyway
    model = build_model(cfg.model, cfg.data.channels)
    if use_gpu and cfg.model.sync_batchnorm and world > 1:
        model = convert_sync_batchnorm(model)
    objective = SSCQObjective(cfg.loss, cfg.model)
    local_batch = cfg.train.global_batch_size // world
    bank = None
    if cfg.bank.enabled:
        bank = NeighborBank(cfg.model.num_codebooks, cfg.model.codeword_dim, cfg.bank.size, world, rank).to(device)

    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, local_batch, bf16), dist_init_required=False)

    start_epoch, global_step, images_seen = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag="sscq")
            start_epoch = int(client_state["epoch"]) + 1
            global_step = int(client_state["global_step"])
            images_seen = int(client_state["images_seen"])
            if bank is not None:
                bank.load_state_dict(torch.load(os.path.join(ckpt_dir, BANK_FILE.format(rank=rank)),
                                                map_location=device, weights_only=True))
        if rank == 0:
            print(f"[train] resumed from the checkpoint of epoch {start_epoch} (step {global_step})", flush=True)

    logger = None
    if rank == 0 and loop_config.get("run_id"):
        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"], cfg.tracking.max_attempts,
                           request_timeout_s=cfg.tracking.request_timeout_s)

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    in_dtype = torch.bfloat16 if bf16 else torch.float32
    k = cfg.model.num_codewords
    # Small sets: one Ray Data execution streams every epoch (decoded once, augmented per
    # pass), so no epoch pays the pipeline start-up. Large sets: one execution per epoch.
    single_stream = bool(loop_config.get("single_stream"))

    def new_stream():
        return iter(shard.iter_torch_batches(
            batch_size=local_batch, drop_last=True, device=device, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None))

    stream = new_stream() if single_stream else None
    if single_stream and start_epoch:
        # A resumed run's single stream still starts at pass 0: skip the passes already trained.
        for _ in _take(stream, start_epoch * steps_per_epoch):
            pass
    for epoch in range(start_epoch, cfg.train.epochs):
        if not single_stream:
            stream = new_stream()
        engine.train()
        use_bank = bank is not None and epoch >= cfg.bank.warmup_epochs
        drops = DropCounter()
        sums = {t: 0.0 for t in LOSS_TERMS + ("total",)}
        usage = torch.zeros(cfg.model.num_codebooks, k, device=device)
        steps = 0
        data_wait = compute = 0.0
        epoch_t0 = time.perf_counter()
        t_ready = time.perf_counter()
        for raw in _take(stream, steps_per_epoch):
            t_data = time.perf_counter()
            data_wait += t_data - t_ready
            batch = _equalise_batch(drops.filter(raw), world, device)
            if batch is None:
                t_ready = time.perf_counter()
                continue
            n = len(batch["id"])
            views = torch.cat([batch["view_a"], batch["view_b"]]).to(in_dtype)
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
            images_seen += n * world
            for t in sums:
                sums[t] += float(losses[t].detach())
            t_ready = time.perf_counter()
            compute += t_ready - t_data
            if logger and global_step % cfg.train.log_every_steps == 0:
                logger.log_metrics({**{f"loss/{t}": float(losses[t].detach()) for t in sums},
                                    "lr": scheduler.get_last_lr()[0],
                                    "images_per_s": n * world * steps / max(1e-9, t_ready - epoch_t0),
                                    "codeword_entropy": float(losses["codeword_entropy"])}, step=global_step)
            if rank == 0 and global_step % cfg.train.log_every_steps == 0:
                print(f"[train] epoch {epoch + 1}/{cfg.train.epochs} step {steps}/{steps_per_epoch} "
                      f"loss {float(losses['total'].detach()):.4f} "
                      f"{n * world * steps / max(1e-9, t_ready - epoch_t0):.0f} img/s", flush=True)
        epoch_s = time.perf_counter() - epoch_t0
        metrics = _epoch_metrics(sums, steps, usage, drops, data_wait, epoch_s, world, device)
        metrics.update(epoch=epoch, global_step=global_step, images_seen=images_seen,
                       images_per_s=steps * cfg.train.global_batch_size / max(1e-9, epoch_s),
                       lr=scheduler.get_last_lr()[0], bank_active=float(use_bank))
        if logger:
            logger.log_metrics({f"epoch/{k_}": v for k_, v in metrics.items() if k_ not in ("epoch", "fatal")},
                               step=global_step)
            logger.flush()
        last = epoch + 1 == cfg.train.epochs
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag="sscq", client_state={
                    "epoch": epoch, "global_step": global_step, "images_seen": images_seen})
                if bank is not None:
                    torch.save(bank.state_dict(), os.path.join(tmp, BANK_FILE.format(rank=rank)))
                if world > 1:
                    dist.barrier()  # every rank's part is on disk before the report
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{cfg.train.epochs} done: loss {metrics['loss/total']:.4f}, "
                  f"{metrics['images_per_s']:.0f} img/s, data wait {100 * metrics['data_wait_fraction']:.1f}%, "
                  f"dropped {metrics['dropped_images']}, codeword entropy {metrics['codeword_entropy']:.2f}",
                  flush=True)
    if logger:
        logger.close(cfg.tracking.final_flush_s)


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
