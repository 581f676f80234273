"""The SSCQ training objective: five weighted terms over the global batch (SPEC section 4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.config import LossConfig, ModelConfig
from sscq_dist.distributed import gather_with_grad, sum_no_grad, world_info
from sscq_dist.errors import ConfigError
from sscq_dist.losses.codeword_diversity import CodewordDiversityLoss
from sscq_dist.losses.consistency import ConsistentContrastiveLoss
from sscq_dist.losses.ntxent import NTXentLoss
from sscq_dist.losses.part_neighbor import PartNeighborLoss
from sscq_dist.model.sscq import SSCQOutput
from sscq_dist.neighbor_bank import NeighborBank

LOSS_TERMS = ("icf", "icz", "cc", "pn", "cd")


def codeword_entropy(codes: Tensor, num_codewords: int) -> Tensor:
    """Mean over subspaces of the entropy (nats) of hard-code usage, over the global batch.

    codes: (N, M) int64 local codes. Returns a detached scalar; log K means uniform usage,
    0 means every item on one codeword. Counts are summed over ranks.
    """
    n, m = codes.shape
    counts = torch.zeros(m, num_codewords, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes.detach().T, torch.ones(m, n, dtype=torch.float64, device=codes.device))
    counts = sum_no_grad(counts)
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    # 0 log 0 = 0 for unused codewords.
    ent = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    return ent.mean().detach()


class SSCQObjective(nn.Module):
    """L = w_icf L_icf + w_icz L_icz + w_cc L_cc + w_pn L_pn + w_cd L_cd.

    Args:
        loss_cfg: weights, temperatures and N_k (LossConfig).
        model_cfg: gives M, K and d (ModelConfig).

    forward(out_a, out_b, codebooks (M, K, d), bank=None, use_bank=False) -> dict with
    'total', 'icf', 'icz', 'cc', 'pn', 'cd' (unweighted terms, with gradient) and
    'codeword_entropy' (detached). out_a / out_b are the two views of this rank's local
    batch (b images each; every rank must have the same b).

    With torch.distributed initialised and W > 1, f and z of both views are all-gathered
    with gradient (one collective), each rank computes only its own anchors' rows against
    the global batch, and L_cd's pbar is over the global batch. The terms a rank returns are
    its anchors' share: their mean over ranks, which DDP / DeepSpeed gradient averaging
    optimises, equals the single-process loss on the concatenated W*b batch (L_cd and the
    entropy are already global and equal on every rank). Use
    sscq_dist.distributed.mean_over_workers to log global values.

    Bank: with use_bank=True the bank's entries are extra L_pn candidates (numerator and
    denominator); call bank.enqueue(...) after the step, not before.
    """

    def __init__(self, loss_cfg: LossConfig, model_cfg: ModelConfig):
        super().__init__()
        for name in LOSS_TERMS:
            w = getattr(loss_cfg, f"w_{name}")
            if not w >= 0:
                raise ConfigError(f"loss weight w_{name} must be >= 0, got {w}")
        self.weights = {name: float(getattr(loss_cfg, f"w_{name}")) for name in LOSS_TERMS}
        self.num_subspaces = model_cfg.num_codebooks
        self.num_codewords = model_cfg.num_codewords
        self.codeword_dim = model_cfg.codeword_dim
        self.num_neighbors = loss_cfg.num_neighbors
        self.icf = NTXentLoss(loss_cfg.tau_ic, loss_cfg.debias_tau_plus, loss_cfg.fn_cancel_k)
        self.icz = NTXentLoss(loss_cfg.tau_ic, loss_cfg.debias_tau_plus, loss_cfg.fn_cancel_k)
        self.cc = ConsistentContrastiveLoss(loss_cfg.tau_cc)
        self.pn = PartNeighborLoss(loss_cfg.num_neighbors, loss_cfg.tau_pn)
        self.cd = CodewordDiversityLoss(loss_cfg.tau_cd)

    def forward(
        self,
        out_a: SSCQOutput,
        out_b: SSCQOutput,
        codebooks: Tensor,
        bank: Optional[NeighborBank] = None,
        use_bank: bool = False,
    ) -> dict[str, Tensor]:
        if out_a.f.shape != out_b.f.shape or out_a.z.shape != out_b.f.shape:
            raise ValueError(
                f"views disagree in shape: f_a {tuple(out_a.f.shape)}, f_b {tuple(out_b.f.shape)}, "
                f"z_a {tuple(out_a.z.shape)}"
            )
        if out_a.f.dim() != 2 or out_a.f.shape[1] != self.num_subspaces * self.codeword_dim:
            raise ValueError(
                f"embeddings must be (b, M*d) = (b, {self.num_subspaces * self.codeword_dim}), "
                f"got {tuple(out_a.f.shape)}"
            )
        if use_bank and bank is None:
            raise ValueError("use_bank=True needs a NeighborBank")
        world, rank = world_info()
        b = out_a.f.shape[0]
        m, d = self.num_subspaces, self.codeword_dim
        # One all-gather (with gradient) for f and z of both views: (W*b, 4, D).
        stacked = gather_with_grad(torch.stack([out_a.f, out_b.f, out_a.z, out_b.z], dim=1))
        f_a_all, f_b_all, z_a_all, z_b_all = stacked.unbind(1)
        offset = rank * b
        terms: dict[str, Tensor] = {}
        terms["icf"] = self.icf(out_a.f, out_b.f, f_a_all, f_b_all, offset)
        terms["icz"] = self.icz(out_a.z, out_b.z, z_a_all, z_b_all, offset)
        terms["cc"] = self.cc(out_a.f + out_a.z, out_b.f + out_b.z, f_a_all + z_a_all, f_b_all + z_b_all, offset)

        za_sub, zb_sub = out_a.z.view(b, m, d), out_b.z.view(b, m, d)
        za_all_sub, zb_all_sub = z_a_all.reshape(-1, m, d), z_b_all.reshape(-1, m, d)
        bank_result = None
        if use_bank:
            anchors = F.normalize(torch.cat([za_sub, zb_sub]).detach(), dim=-1)  # (2b, M, d)
            # Rank-major global anchors from what was gathered already: rank r's rows are
            # cat(z_a[r*b:(r+1)*b], z_b[r*b:(r+1)*b]), as NeighborBank.search expects.
            everyone = torch.cat(
                [za_all_sub.detach().view(world, b, m, d), zb_all_sub.detach().view(world, b, m, d)], dim=1
            ).reshape(world * 2 * b, m, d)
            bank_result = bank.search(
                anchors, self.num_neighbors, tau=self.pn.temperature,
                gathered_anchors=F.normalize(everyone, dim=-1),
            )
        terms["pn"] = self.pn(za_sub, zb_sub, za_all_sub, zb_all_sub, offset, bank=bank_result)
        terms["cd"] = self.cd(out_a.f, out_b.f, codebooks)
        total = sum(self.weights[name] * terms[name] for name in LOSS_TERMS)
        result = {"total": total, **terms}
        result["codeword_entropy"] = codeword_entropy(torch.cat([out_a.codes, out_b.codes]), self.num_codewords)
        return result
