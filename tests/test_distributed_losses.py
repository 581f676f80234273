"""Two gloo workers of local batch b give the same SSCQ losses and gradients as one process
on the concatenated 2b batch, with and without a neighbour bank sharded over the workers.

BatchNorm is kept out of the comparison (model.eval(): running statistics), as SPEC section 4
explains; what is proved is the gathered losses and gradients.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from sscq_dist.config import LossConfig, ModelConfig
from sscq_dist.distributed import mean_over_workers
from sscq_dist.losses import SSCQObjective
from sscq_dist.model import build_model
from sscq_dist.neighbor_bank import NeighborBank

WORLD = 2
LOCAL_BATCH = 3
BANK_SIZE = 8
IMAGE = 10
JOIN_TIMEOUT_S = 90
MODEL_CFG = ModelConfig(backbone="small_cnn", bits=16)  # M = 4, K = 16, d = 16
LOSS_CFG = LossConfig(num_neighbors=3)
# (name, use_bank, bank rows per shard): shards hold rows [r*4, r*4 + fill) of the entries.
SCENARIOS = [("no_bank", False, 0), ("full_bank", True, 4), ("partial_bank", True, 3)]


def _bank(entries: torch.Tensor, fill: int, world: int, rank: int) -> NeighborBank:
    """Shard `rank` of a bank whose global rows are entries[r*per : r*per + fill] per shard."""
    m, d = MODEL_CFG.num_codebooks, MODEL_CFG.codeword_dim
    bank = NeighborBank(m, d, BANK_SIZE, world_size=world, rank=rank).double()
    per = BANK_SIZE // WORLD
    if world == 1:
        bank.enqueue(torch.cat([entries[r * per : r * per + fill] for r in range(WORLD)]))
    else:
        bank.enqueue(entries[rank * per : rank * per + fill])
    return bank


def _step(model, objective, xa, xb, bank, use_bank):
    model.zero_grad(set_to_none=True)
    out_a, out_b = model(xa), model(xb)
    res = objective(out_a, out_b, model.quantizer.codebooks, bank=bank, use_bank=use_bank)
    res["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return res, grads, out_a, out_b


def _worker(rank: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        data = torch.load(data_path)
        model = build_model(MODEL_CFG, channels=1).double()
        model.load_state_dict(data["state"])
        model.eval()
        objective = SSCQObjective(LOSS_CFG, MODEL_CFG)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        xa, xb = data["xa"][rows], data["xb"][rows]
        results = {}
        for name, use_bank, fill in SCENARIOS:
            bank = _bank(data["entries"], fill, WORLD, rank)
            res, grads, out_a, out_b = _step(model, objective, xa, xb, bank, use_bank)
            terms = mean_over_workers({k: v for k, v in res.items()})
            for g in grads.values():  # what DDP / DeepSpeed gradient averaging does
                dist.all_reduce(g)
                g /= WORLD
            m, d = MODEL_CFG.num_codebooks, MODEL_CFG.codeword_dim
            anchors = F.normalize(torch.cat([out_a.z, out_b.z]).detach().view(-1, m, d), dim=-1)
            search = bank.search(anchors, LOSS_CFG.num_neighbors, tau=LOSS_CFG.tau_pn)
            results[name] = {"terms": terms, "grads": grads, "search": search.__dict__,
                             "memory": bank.vectors.shape[1]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_workers(port: int, data_path: str, out_dir: str) -> None:
    ctx = mp.start_processes(_worker, args=(port, data_path, out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {JOIN_TIMEOUT_S} s")


def test_two_workers_equal_one_process_on_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, channels=1).double()
    # Non-trivial BN running statistics, then frozen: the same per-image transform everywhere.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    model.eval()
    n = WORLD * LOCAL_BATCH
    xa = torch.randn(n, 1, IMAGE, IMAGE, dtype=torch.float64)
    xb = xa + 0.3 * torch.randn(n, 1, IMAGE, IMAGE, dtype=torch.float64)
    m, d = MODEL_CFG.num_codebooks, MODEL_CFG.codeword_dim
    entries = torch.randn(BANK_SIZE, m, d, dtype=torch.float64)
    data_path = str(tmp_path / "data.pt")
    torch.save({"state": model.state_dict(), "xa": xa, "xb": xb, "entries": entries}, data_path)

    _run_workers(free_port(), data_path, str(tmp_path))

    objective = SSCQObjective(LOSS_CFG, MODEL_CFG)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, use_bank, fill in SCENARIOS:
        bank = _bank(entries, fill, 1, 0)
        res, grads, out_a, out_b = _step(model, objective, xa, xb, bank, use_bank)
        got = per_rank[0][name]
        assert set(got["terms"]) == {"total", "icf", "icz", "cc", "pn", "cd", "codeword_entropy"}
        for key, value in res.items():
            assert got["terms"][key].item() == pytest.approx(value.item(), abs=1e-9), (name, key)
        assert set(got["grads"]) == set(grads)
        for pname, g in grads.items():
            assert torch.allclose(got["grads"][pname], g, atol=1e-4, rtol=0), (name, pname)
            assert torch.allclose(got["grads"][pname], g, atol=1e-9, rtol=1e-7), (name, pname)
        # Bank memory per worker is Q/W; merged search rows equal the single bank's rows.
        anchors = F.normalize(torch.cat([out_a.z, out_b.z]).detach().view(-1, m, d), dim=-1)
        ref = bank.search(anchors, LOSS_CFG.num_neighbors, tau=LOSS_CFG.tau_pn)
        for r in range(WORLD):
            assert per_rank[r][name]["memory"] == BANK_SIZE // WORLD
            s = per_rank[r][name]["search"]
            rows = torch.cat([torch.arange(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH) + v * n for v in range(2)])
            assert s["num_filled"] == ref.num_filled == WORLD * fill
            assert torch.allclose(s["values"], ref.values[rows], atol=1e-12) or fill == 0
            if fill == BANK_SIZE // WORLD:  # full shards: same global slot ids as one bank
                assert torch.equal(s["ids"], ref.ids[rows])
            valid = s["ids"] >= 0
            assert torch.allclose(s["vectors"][valid], ref.vectors[rows][valid], atol=1e-12)
            if fill:
                assert torch.allclose(s["lse"], ref.lse[rows], atol=1e-10)
                assert torch.allclose(s["lse_grad"], ref.lse_grad[rows], atol=1e-10)
    # The bank changes L_pn (so the bank scenarios test something).
    assert abs(per_rank[0]["full_bank"]["terms"]["pn"] - per_rank[0]["no_bank"]["terms"]["pn"]) > 1e-3
