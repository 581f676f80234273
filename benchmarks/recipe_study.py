"""Recipe study for issue 25: train candidate recipes for a fixed wall-clock budget each and
score them on the Fashion-MNIST validation split (SPEC section 5), in one plain process.

No Ray, DeepSpeed or MLflow: it imports only the project's model (`sscq_dist.model`),
objective (`sscq_dist.losses`) and augmentation (`sscq_dist.data.augment`), so it runs on a
bare GPU machine. Every candidate trains on the 55,000 database images (labels unused) with
its learning-rate schedule laid out over the time budget (warm-up + cosine in elapsed
training time), and is scored at a few points of the budget with the project's protocol:
database = hard PQ codes, queries = raw embeddings f, squared-L2 ADC, mAP@1000 by label;
beside it the float embedding f and the backbone features, each by cosine.

    python benchmarks/recipe_study.py --data fmnist.npz --device cuda --budget-s 60 --out out/
    python benchmarks/recipe_study.py --data fmnist.npz --device cpu --check-eval   # ADC/mAP == evaluation.py

The data file is an .npz with uint8 train_x (60000, 28, 28) and train_y (60000,) (the Debian
package's IDX files, read with `sscq_dist.ingest.read_idx`). Results: one JSON line per
evaluation point in <out>/study.jsonl (written as soon as it is measured) and
<out>/map_vs_time.png, redrawn after every candidate.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
for root in (HERE, os.path.dirname(HERE)):  # a copy beside the package first, else the repo
    if os.path.isdir(os.path.join(root, "sscq_dist")):
        sys.path.insert(0, root)
        break

from sscq_dist.config import AugmentConfig, Config  # noqa: E402
from sscq_dist.data.augment import apply_view, eval_view, nhwc_to_nchw, sample_params, to_float, two_views, view_seed  # noqa: E402
from sscq_dist.losses import NTXentLoss, SSCQObjective  # noqa: E402
from sscq_dist.model import build_model, hard_codes  # noqa: E402

VAL_QUERIES = 5000  # SPEC section 5: queries held out of train by a seeded permutation
TOPK = 1000
WARMUP_FRACTION = 0.05  # of the time budget (the config's 1 of 20 epochs)
EVAL_FRACTIONS = (0.5, 1.0)  # of the budget: points on the mAP-vs-time curve
WARM_STEPS = 3  # steps before each candidate's clock starts


# --------------------------------------------------------------------------- candidates

@dataclasses.dataclass
class Recipe:
    """One candidate: model/loss overrides on the config plus study-only switches."""

    name: str
    model: dict = dataclasses.field(default_factory=dict)
    loss: dict = dataclasses.field(default_factory=dict)
    augment: dict = dataclasses.field(default_factory=dict)  # data.augment overrides
    batch: int = 256
    optimizer: str = "adam"  # adam | sgd (Nesterov) | lars
    lr: Optional[float] = None  # None: train.lr for adam, 0.1 sgd, 0.3 * batch / 256 lars
    weight_decay: Optional[float] = None
    bf16: bool = True
    channels_last: bool = True
    local_crops: int = 0  # multi-crop: small crops per image besides the two views
    local_px: int = 14
    local_scale: tuple = (0.1, 0.35)
    w_local: float = 1.0
    aux_head: bool = False  # separate SimCLR head (NT-Xent) on the backbone output
    ema: float = 0.0  # > 0: EMA of the weights (evaluated) and an EMA-teacher NT-Xent term
    w_teacher: float = 0.5
    nnclr: float = 0.0  # > 0: weight of an NNCLR term (nearest bank neighbour as positive)
    nnclr_bank: int = 16384
    knn_swap_p: float = 0.0  # > 0: a row's second view is drawn from a mined neighbour image
    knn_k: int = 5
    knn_start: float = 0.3  # fraction of the budget at the first mining, then every knn_every
    knn_every: float = 0.2


def candidates() -> list[Recipe]:
    """The study's candidates, most informative first (a killed run keeps what finished)."""
    vgg = {"backbone": "vgg8"}
    final = {**vgg, "normalize_embedding": True, "tau_q": 0.1}  # the config's model section
    final_aug = {"crop_scale_min": 0.6, "brightness": 0.8, "contrast": 0.8}
    return [
        Recipe("baseline"),  # configs/fashion_mnist.yaml: small_cnn, Adam 5e-4, 2-layer head
        Recipe("vgg8", model=vgg),
        Recipe("vgg8_l2_tq0.1", model={**vgg, "normalize_embedding": True, "tau_q": 0.1}),
        Recipe("vgg8_linhead_aux", model={**vgg, "head_layers": 1}, aux_head=True),
        Recipe("vgg8_lr1.5e-3", model=vgg, lr=1.5e-3),
        Recipe("vgg8_multicrop4", model=vgg, local_crops=4),
        Recipe("vgg8_ema_teacher", model=vgg, ema=0.996),
        Recipe("vgg8_nnclr", model=vgg, nnclr=0.5),
        Recipe("vgg8_sgd_nesterov", model=vgg, optimizer="sgd"),
        Recipe("vgg8_lars", model=vgg, optimizer="lars"),
        Recipe("baseline_fp32", bf16=False, channels_last=False),
        Recipe("vgg8_l2_tq0.3", model={**vgg, "normalize_embedding": True, "tau_q": 0.3}),
        Recipe("vgg8_head2048", model={**vgg, "head_hidden": 2048}),
        Recipe("vgg8_b512", model=vgg, batch=512, lr=7e-4),
        # The levers that each helped alone, combined (second study).
        Recipe("combo_adam", model={**vgg, "normalize_embedding": True, "tau_q": 0.1}, lr=1.5e-3),
        Recipe("combo_sgd", model={**vgg, "normalize_embedding": True, "tau_q": 0.1}, optimizer="sgd"),
        # The same in fp32 and the default layout: what bf16 autocast + channels_last give on a CPU
        # (AMX, or AVX-512 bf16 only).
        Recipe("combo_sgd_fp32", model={**vgg, "normalize_embedding": True, "tau_q": 0.1}, optimizer="sgd",
               bf16=False, channels_last=False),
        # Third study (2 CPU cores): augmentations for 28 px grey images (item 4), then the loss
        # temperatures and the codeword-diversity weight (item 6), each alone on combo_sgd.
        *[Recipe(f"combo_sgd_{name}", model={**vgg, "normalize_embedding": True, "tau_q": 0.1}, optimizer="sgd",
                 augment=aug, loss=loss) for name, aug, loss in (
            ("nojitter", {"jitter_p": 0.0}, {}),
            ("crop0.6", {"crop_scale_min": 0.6}, {}),
            ("rot15", {"rotate_deg": 15.0}, {}),
            ("erase0.5", {"erase_p": 0.5}, {}),
            ("noblur", {"blur_p": 0.0}, {}),
            ("tcc0.5", {}, {"tau_cc": 0.5}),
            ("tpn0.2", {}, {"tau_pn": 0.2}),
            ("wcd0", {}, {"w_cd": 0.0}),
            # Without jitter the codes fell to 0.54: intensity is the shortcut to take away, so more.
            ("jitter0.8", {"brightness": 0.8, "contrast": 0.8}, {}),
            ("jitterp1", {"jitter_p": 1.0}, {}),
            ("crop0.6_jitter0.8", {"crop_scale_min": 0.6, "brightness": 0.8, "contrast": 0.8}, {}),
            # Fourth study: how far the two winners go (jitter 1.0 lets a factor reach 0).
            ("crop0.6_jitter1.0", {"crop_scale_min": 0.6, "brightness": 1.0, "contrast": 1.0}, {}),
            ("crop0.6_jitter1.4", {"crop_scale_min": 0.6, "brightness": 1.4, "contrast": 1.4}, {}),
            ("crop0.8_jitter0.8", {"crop_scale_min": 0.8, "brightness": 0.8, "contrast": 0.8}, {}),
            ("crop0.6_contrast1.4", {"crop_scale_min": 0.6, "brightness": 0.8, "contrast": 1.4}, {}),
        )],
        # Fifth study: an EMA teacher (item 5) on the final recipe (configs/fashion_mnist.yaml) at
        # CPU budgets long enough to see whether the teacher leads (the GPU's 27 s was ~6 epochs),
        # then the GPU study's other two additions (NNCLR; linear head + separate contrastive head).
        Recipe("final_ema_teacher", model=final, optimizer="sgd", augment=final_aug, ema=0.996),
        Recipe("final_nnclr", model=final, optimizer="sgd", augment=final_aug, nnclr=0.5),
        Recipe("final_linhead_aux", model={**final, "head_layers": 1}, optimizer="sgd", augment=final_aug,
               aux_head=True),
        # Sixth study: the NT-Xent terms' false negatives (item 5). With ten balanced classes a
        # tenth of each anchor's "negatives" share its class: debias their sum (Chuang et al.
        # 2020, the class prior tau+) or cancel each anchor's 20 most similar (Huynh et al. 2022).
        Recipe("final_dcl0.1", model=final, optimizer="sgd", augment=final_aug, loss={"debias_tau_plus": 0.1}),
        Recipe("final_fncancel20", model=final, optimizer="sgd", augment=final_aug, loss={"fn_cancel_k": 20}),
        # The instance temperature (item 6), last chosen on the old small_cnn recipe.
        *[Recipe(f"final_tic{t}", model=final, optimizer="sgd", augment=final_aug, loss={"tau_ic": t})
          for t in (0.3, 0.8)],
        # Neighbour positives mined from the whole training set (item 5; NNCLR's bank of stale
        # embeddings lost): from 30 % of the budget on, every 20 %, the 5 nearest images of each
        # by backbone cosine are mined, and half the rows take their second view from one of them.
        # The mining counts against the budget.
        Recipe("final_knnswap0.5", model=final, optimizer="sgd", augment=final_aug, knn_swap_p=0.5),
        # Twice the batch (1,022 negatives per anchor), lr scaled linearly: the GPU's b512 gave +0.006.
        Recipe("final_b512", model=final, optimizer="sgd", augment=final_aug, batch=512, lr=0.2),
    ]


# --------------------------------------------------------------------------- data

def load_split(path: str, device: torch.device, seed: int = 0, db_limit: int = 0, q_limit: int = 0):
    """(db images (N, 28, 28, 1) uint8, db labels, query images, query labels) on device.

    The validation split of benchmarks/bench_setup.py: a default_rng(seed) permutation of the
    60,000 train ids, the first 5,000 are the queries, the rest the database (= training set).
    """
    d = np.load(path)
    x, y = d["train_x"], d["train_y"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    q_idx, db_idx = np.sort(order[:VAL_QUERIES]), np.sort(order[VAL_QUERIES:])
    if db_limit:
        db_idx = db_idx[:db_limit]
    if q_limit:
        q_idx = q_idx[:q_limit]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return t(x[db_idx][..., None]), t(y[db_idx]), t(x[q_idx][..., None]), t(y[q_idx])


# --------------------------------------------------------------------------- evaluation (torch)

def ranked_ids(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k columns of each row, ascending, ties by column (evaluation.py's order)."""
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


def average_precision(idx: torch.Tensor, q_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """AP@K per query (evaluation.retrieval_metrics): sum_r rel_r P@r / R_K, 0 when R_K = 0."""
    rel = (db_labels[idx] == q_labels[:, None]).double()
    cum = rel.cumsum(1)
    ranks = torch.arange(1, idx.shape[1] + 1, device=idx.device, dtype=torch.float64)
    r_k = cum[:, -1]
    return torch.where(r_k > 0, (rel * cum / ranks).sum(1) / r_k.clamp_min(1), torch.zeros_like(r_k))


def map_adc(q_f: torch.Tensor, db_codes: torch.Tensor, codebooks: torch.Tensor, q_labels, db_labels,
            topk: int = TOPK, chunk: int = 500) -> float:
    """mAP@topk of squared-L2 ADC: raw query f against hard-coded database items."""
    m, k, d = codebooks.shape
    aps = []
    for s in range(0, len(q_f), chunk):
        q = q_f[s:s + chunk].float().reshape(-1, m, 1, d)
        diff = q - codebooks.float()[None]
        tables = (diff * diff).sum(-1)  # (q, M, K)
        dist = torch.zeros(len(q), len(db_codes), device=q.device)
        for j in range(m):  # gather-sum over subspaces in a fixed order: exact ties stay ties
            dist += tables[:, j, db_codes[:, j]]
        aps.append(average_precision(ranked_ids(dist, topk), q_labels[s:s + chunk], db_labels))
    return float(torch.cat(aps).mean())


def map_cosine(q_x: torch.Tensor, db_x: torch.Tensor, q_labels, db_labels, topk: int = TOPK,
               chunk: int = 500) -> float:
    """mAP@topk of L2-normalised float vectors (squared L2 = 2 - 2 cos)."""
    q_x, db_x = F.normalize(q_x.float(), dim=1), F.normalize(db_x.float(), dim=1)
    aps = []
    for s in range(0, len(q_x), chunk):
        dist = (2.0 - 2.0 * q_x[s:s + chunk] @ db_x.T).clamp_min(0)
        aps.append(average_precision(ranked_ids(dist, topk), q_labels[s:s + chunk], db_labels))
    return float(torch.cat(aps).mean())


@torch.no_grad()
def encode_all(model, images_nhwc: torch.Tensor, batch: int = 4096):
    """(backbone features, f) of every image, deterministic view, fp32, eval mode."""
    was = model.training
    model.eval()
    hs, fs = [], []
    for s in range(0, len(images_nhwc), batch):
        x = eval_view(nhwc_to_nchw(images_nhwc[s:s + batch])).contiguous()
        h, f = model.encode(x)
        hs.append(h.float())
        fs.append(f.float())
    model.train(was)
    return torch.cat(hs), torch.cat(fs)


@torch.no_grad()
def nearest_rows(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(N, k) int64: each row's k most similar other rows of x (N, D) by dot product."""
    out = []
    for s in range(0, len(x), chunk):
        sim = x[s:s + chunk] @ x.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = float("-inf")  # never itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def mine_neighbours(model, images_nhwc: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) int64: each image's k nearest other images by backbone cosine."""
    return nearest_rows(F.normalize(encode_all(model, images_nhwc)[0], dim=1), k)


def evaluate(model, data, topk: int = TOPK) -> dict:
    db_x, db_y, q_x, q_y = data
    db_h, db_f = encode_all(model, db_x)
    q_h, q_f = encode_all(model, q_x)
    codebooks = model.quantizer.codebooks.detach().float()
    codes = hard_codes(db_f, codebooks)
    counts = torch.zeros(codes.shape[1], codebooks.shape[1], device=codes.device)
    counts.scatter_add_(1, codes.T, torch.ones_like(codes.T, dtype=torch.float32))
    p = counts / counts.sum(1, keepdim=True)
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
    return {"map_codes": map_adc(q_f, codes, codebooks, q_y, db_y, topk),
            "map_f_cos": map_cosine(q_f, db_f, q_y, db_y, topk),
            "map_bb_cos": map_cosine(q_h, db_h, q_y, db_y, topk),
            "code_entropy": entropy}


def check_eval(data_path: str, device: torch.device, db_limit: int = 3000, q_limit: int = 300,
               topk: int = 100) -> tuple[float, float]:
    """|torch mAP - evaluation.py mAP| of ADC and of cosine, on a subset (random-init model).

    ADC must agree exactly (same sums, same tie order); cosine only to float rounding, since
    evaluation.rank_float expands the squared L2 of centred vectors and near-ties of a
    random-init model's features can swap."""
    from sscq_dist import evaluation

    data = load_split(data_path, device, db_limit=db_limit, q_limit=q_limit)
    cfg = Config()
    torch.manual_seed(0)
    model = build_model(cfg.model, 1).to(device)
    db_x, db_y, q_x, q_y = data
    with torch.no_grad():  # a few train-mode passes so BN statistics are not the identity
        for s in range(0, len(db_x), 512):
            model.encode(eval_view(nhwc_to_nchw(db_x[s:s + 512])).contiguous())
    db_h, db_f = encode_all(model, db_x)
    q_h, q_f = encode_all(model, q_x)
    cb = model.quantizer.codebooks.detach().float()
    codes = hard_codes(db_f, cb)
    ours_adc = map_adc(q_f, codes, cb, q_y, db_y, topk)
    _, idx = evaluation.rank_pq(q_f.cpu().numpy(), codes.cpu().numpy(), cb.cpu().numpy(), topk)
    ref_adc = evaluation.retrieval_metrics(idx, q_y.cpu().numpy(), db_y.cpu().numpy())["map"]
    qn, dn = F.normalize(q_h, dim=1).cpu().numpy(), F.normalize(db_h, dim=1).cpu().numpy()
    ours_cos = map_cosine(q_h, db_h, q_y, db_y, topk)
    _, idx = evaluation.rank_float(qn, dn, topk)
    ref_cos = evaluation.retrieval_metrics(idx, q_y.cpu().numpy(), db_y.cpu().numpy())["map"]
    print(f"check-eval ({device.type}, {q_limit} queries x {db_limit} db, mAP@{topk}): ADC torch {ours_adc:.8f} "
          f"evaluation.py {ref_adc:.8f} | cosine torch {ours_cos:.8f} evaluation.py {ref_cos:.8f}", flush=True)
    return abs(ours_adc - ref_adc), abs(ours_cos - ref_cos)


# --------------------------------------------------------------------------- training pieces

class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017); 1-D params (BN, biases)
    get plain SGD without weight decay, as in SimCLR."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, gn = torch.norm(p), torch.norm(dp)
                    q = torch.where((pn > 0) & (gn > 0), g["eta"] * pn / gn, torch.ones_like(pn))
                    dp = dp.mul(q)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(dp)
                p.add_(buf, alpha=-g["lr"])


def make_optimizer(r: Recipe, params, cfg: Config) -> torch.optim.Optimizer:
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr or cfg.train.lr,
                                weight_decay=cfg.train.weight_decay if r.weight_decay is None else r.weight_decay)
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr or 0.1, momentum=0.9, nesterov=True,
                               weight_decay=5e-4 if r.weight_decay is None else r.weight_decay)
    if r.optimizer == "lars":
        return LARS(params, lr=r.lr or 0.3 * r.batch / 256, weight_decay=1e-6 if r.weight_decay is None else r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


def lr_factor(progress: float) -> float:
    """Warm-up over WARMUP_FRACTION of the budget, then cosine to 0 at the budget's end."""
    if progress < WARMUP_FRACTION:
        return max(progress / WARMUP_FRACTION, 1e-3)
    p = (progress - WARMUP_FRACTION) / (1 - WARMUP_FRACTION)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def local_views(images_nhwc: torch.Tensor, aug: AugmentConfig, r: Recipe, seed: int, step: int) -> list[torch.Tensor]:
    """Multi-crop: r.local_crops small crops per image, resized to r.local_px (normalised views)."""
    cfg = dataclasses.replace(aug, crop_scale_min=r.local_scale[0], crop_scale_max=r.local_scale[1])
    g = torch.Generator().manual_seed(view_seed(seed, 0, step, 1))
    x = to_float(nhwc_to_nchw(images_nhwc))
    out = []
    for _ in range(r.local_crops):
        v = apply_view(x, sample_params(len(x), cfg, g, x.device))
        v = F.interpolate(v, size=(r.local_px, r.local_px), mode="bilinear", align_corners=False, antialias=True)
        out.append(v.contiguous(memory_format=torch.channels_last) if r.channels_last else v.contiguous())
    return out


def build(r: Recipe, device: torch.device):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **r.model)
    cfg.loss = dataclasses.replace(cfg.loss, **r.loss)
    cfg.data.augment = dataclasses.replace(cfg.data.augment, **r.augment)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1).to(device)
    if r.channels_last:
        model = model.to(memory_format=torch.channels_last)
    extra = nn.ModuleDict()
    if r.aux_head:
        dim = model.head[0].in_features
        extra["aux"] = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(inplace=True), nn.Linear(512, 128)).to(device)
    return cfg, model, extra


def train_candidate(r: Recipe, data, device: torch.device, budget_s: float, emit, max_steps: int = 0,
                    eval_fractions: tuple = EVAL_FRACTIONS) -> None:
    """Train r for budget_s seconds of training time (evaluation pauses the clock); emit(row) per eval."""
    cfg, model, extra = build(r, device)
    objective = SSCQObjective(cfg.loss, cfg.model)
    ntx = NTXentLoss(cfg.loss.tau_ic)
    params = list(model.parameters()) + list(extra.parameters())
    opt = make_optimizer(r, params, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    teacher = copy.deepcopy(model).eval() if r.ema > 0 else None
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    bank = bank_ptr = None
    if r.nnclr > 0:
        bank = F.normalize(torch.randn(r.nnclr_bank, cfg.model.embedding_dim, device=device), dim=1)
        bank_ptr = 0
    db_x = data[0]
    n_train = len(db_x)
    knn, next_mine = None, (r.knn_start if r.knn_swap_p > 0 else None)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=r.bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    evals = sorted(eval_fractions)
    step = images = 0
    elapsed = 0.0
    perm = torch.randperm(n_train, device=device)
    pos = 0
    sync()
    t0 = time.perf_counter()
    while True:
        if step % 10 == 0 or (max_steps and step >= max_steps):
            sync()
            elapsed = time.perf_counter() - t0
            done = elapsed >= budget_s or (max_steps and step >= max_steps)
            if done or (evals and elapsed >= evals[0] * budget_s):
                frac = 1.0 if done else evals.pop(0)
                while evals and evals[0] <= frac:
                    evals.pop(0)
                row = {"candidate": r.name, "fraction": frac, "train_s": round(elapsed, 2), "steps": step,
                       "images": images, "epochs": round(images / n_train, 2),
                       "img_per_s": round(images / max(elapsed, 1e-9), 1)}
                t_eval = time.perf_counter()
                row.update(evaluate(teacher if teacher is not None else model, data))
                row["eval_s"] = round(time.perf_counter() - t_eval, 2)
                row["recipe"] = dataclasses.asdict(r)
                emit(row)
                if done:
                    return
                sync()
                t0 += time.perf_counter() - t_eval  # evaluation does not count against the budget
            if next_mine is not None and elapsed >= next_mine * budget_s:
                t_mine = time.perf_counter()
                knn = mine_neighbours(model, db_x, r.knn_k)  # on the clock: part of the method
                purity = float((data[1][knn] == data[1][:, None]).float().mean())  # report only
                print(f"{r.name:>20} t={elapsed:6.1f}s mined {r.knn_k} neighbours in "
                      f"{time.perf_counter() - t_mine:.1f}s, same label {purity:.3f}", flush=True)
                next_mine = next_mine + r.knn_every if next_mine + r.knn_every < 1.0 else None
            f = lr_factor(elapsed / budget_s)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
        if step == WARM_STEPS:  # cuDNN autotuning and first-call costs stay off the clock
            sync()
            t0, images = time.perf_counter(), 0
        if pos + r.batch > n_train:
            perm, pos = torch.randperm(n_train, device=device), 0
        idx = perm[pos:pos + r.batch]
        batch = db_x[idx]
        pos += r.batch
        n = len(batch)
        views = two_views(batch, cfg.data.augment, 0, 0, step, channels_last=r.channels_last)
        if knn is not None:
            swap = torch.rand(n, device=device) < r.knn_swap_p
            pick = knn[idx, torch.randint(r.knn_k, (n,), device=device)]
            partner = torch.where(swap, pick, idx)
            # The same step's view-b parameters, applied to the partner images.
            views_b = two_views(db_x[partner], cfg.data.augment, 0, 0, step, channels_last=r.channels_last)[n:]
            views = torch.cat([views[:n], views_b]).contiguous(
                memory_format=torch.channels_last if r.channels_last else torch.contiguous_format)
        with amp:
            h, f = model.encode(views)
        out = model.quantize(f)
        out_a, out_b = _split(out, n)
        losses = objective(out_a, out_b, model.quantizer.codebooks)
        loss = losses["total"]
        if r.aux_head:
            with amp:
                g_ = extra["aux"](h)
            loss = loss + ntx(g_[:n].float(), g_[n:].float())
        if r.local_crops:
            for i, v in enumerate(local_views(batch, cfg.data.augment, r, 0, step)):
                with amp:
                    _, fl = model.encode(v)
                ol = model.quantize(fl)
                loss = loss + r.w_local / r.local_crops * objective(ol, out_b if i % 2 else out_a,
                                                                    model.quantizer.codebooks)["total"]
        if teacher is not None:
            with torch.no_grad(), amp:
                _, tf = teacher.encode(views)
            tf = tf.float()
            loss = loss + r.w_teacher * 0.5 * (ntx(out_a.f, tf[n:]) + ntx(out_b.f, tf[:n]))
        if bank is not None:
            fa = F.normalize(out_a.f, dim=1)
            nn_a = bank[(fa.detach() @ bank.T).argmax(1)]
            loss = loss + r.nnclr * ntx(nn_a, out_b.f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        if teacher is not None:
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), model.parameters()):
                    pt.lerp_(ps, 1 - r.ema)
                for bt, bs in zip(teacher.buffers(), model.buffers()):
                    bt.copy_(bs)
        if bank is not None:
            with torch.no_grad():
                new = F.normalize(out_b.f.detach(), dim=1)
                idx = (bank_ptr + torch.arange(n, device=device)) % len(bank)
                bank[idx] = new
                bank_ptr = (bank_ptr + n) % len(bank)
        step += 1
        images += n


def _split(out, n: int):
    from sscq_dist.model import SSCQOutput

    a = SSCQOutput(f=out.f[:n], z=out.z[:n], soft=out.soft[:n], codes=out.codes[:n])
    b = SSCQOutput(f=out.f[n:], z=out.z[n:], soft=out.soft[n:], codes=out.codes[n:])
    return a, b


# --------------------------------------------------------------------------- output

def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab20").colors  # one colour per candidate (tab10 repeats after 10)
    for i, name in enumerate(dict.fromkeys(r["candidate"] for r in rows)):
        pts = sorted((r["train_s"], r["map_codes"]) for r in rows if r["candidate"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i % 4], color=colours[i % 20],
                ls="-" if i < 10 else "--", label=name)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("mAP@1000, 32-bit codes (ADC), val split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(HERE, "fmnist.npz"), help=".npz with train_x, train_y (uint8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=60.0, help="training seconds per candidate")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all, in order)")
    p.add_argument("--out", default="outputs/recipe-study")
    p.add_argument("--db-limit", type=int, default=0, help="smoke runs: keep this many database images")
    p.add_argument("--q-limit", type=int, default=0, help="smoke runs: keep this many queries")
    p.add_argument("--max-steps", type=int, default=0, help="smoke runs: stop each candidate after this many steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--eval-at", default=",".join(str(f) for f in EVAL_FRACTIONS),
                   help="fractions of the budget to score at (the budget's end always is; each CPU eval of "
                        "the full split takes ~75 s)")
    p.add_argument("--check-eval", action="store_true", help="compare the torch ADC/cosine mAP with evaluation.py first")
    p.add_argument("--continue-on-check-failure", action="store_true",
                   help="run the study even when --check-eval finds a gap (one-shot device runs)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for evaluation; training runs bf16 autocast
    torch.backends.cudnn.benchmark = True
    os.makedirs(a.out, exist_ok=True)
    if a.check_eval:
        gap_adc, gap_cos = check_eval(a.data, device)
        ok = gap_adc <= 1e-6 and gap_cos <= 1e-3
        with open(os.path.join(a.out, "study.jsonl"), "a") as f:
            f.write(json.dumps({"check_eval": {"device": device.type, "gap_adc": gap_adc, "gap_cos": gap_cos,
                                               "ok": ok}}) + "\n")
        print(f"check-eval {'ok' if ok else 'FAILED'}: torch mAP vs evaluation.py gap {gap_adc:.1e} (ADC), "
              f"{gap_cos:.1e} (cosine)", flush=True)
        if not ok and not a.continue_on_check_failure:
            return 1
    data = load_split(a.data, device, db_limit=a.db_limit, q_limit=a.q_limit)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"{len(data[0])} database / {len(data[2])} queries, budget {a.budget_s:.0f} s per candidate", flush=True)
    wanted = [s for s in a.only.split(",") if s]
    recipes = [r for r in candidates() if not wanted or r.name in wanted]
    unknown = set(wanted) - {r.name for r in recipes}
    if unknown:
        print(f"unknown candidates: {sorted(unknown)}", flush=True)
        return 2
    jsonl = os.path.join(a.out, "study.jsonl")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['candidate']:>20} t={row['train_s']:6.1f}s ep={row['epochs']:5.2f} {row['img_per_s']:8.0f} img/s | "
              f"codes {row['map_codes']:.4f} f-cos {row['map_f_cos']:.4f} backbone-cos {row['map_bb_cos']:.4f} "
              f"H={row['code_entropy']:.2f} (eval {row['eval_s']:.1f}s)", flush=True)

    for r in recipes:
        try:
            train_candidate(r, data, device, a.budget_s, emit, a.max_steps,
                            tuple(float(f) for f in a.eval_at.split(",") if f))
        except Exception as exc:  # one broken candidate must not cost the others their device time
            print(f"{r.name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            with open(jsonl, "a") as f:
                f.write(json.dumps({"candidate": r.name, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        if rows:
            plot(rows, os.path.join(a.out, "map_vs_time.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
