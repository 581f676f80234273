"""L_pn: part-neighbour semantic consistency on the sub-quantized vectors z^m."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.errors import ConfigError
from sscq_dist.losses.ntxent import check_temperature, resolve_views, view_pair_indices
from sscq_dist.neighbor_bank import BankSearchResult


class PartNeighborLoss(nn.Module):
    """Part-neighbour semantic consistency (Wu, Zhang, Liwicki, SSCQ, arXiv 2206.09806).

    Per subspace m, with cosine similarity s between sub-quantized vectors z^m and
    candidates C_i = every view except anchor i and its positive (plus the bank entries when
    a bank result is given), the neighbours are the num_neighbors most similar members of C_i:
        loss_i^m = -log( sum_{j in nbrs} exp(s_ij / tau) / sum_{j in C_i} exp(s_ij / tau) ),
    averaged over anchors and subspaces. When C_i has fewer than num_neighbors members, all
    of them are neighbours (the term is then 0).

    Args:
        num_neighbors: N_k (>= 1).
        temperature: tau_pn (> 0).

    forward(z_a (n, M, d), z_b (n, M, d), z_a_all=None (N, M, d), z_b_all=None (N, M, d),
    offset=0, bank=None) -> scalar. Anchors are this rank's 2n rows cat(z_a, z_b); `bank`
    is NeighborBank.search(...) for those anchors, in that order, with tau = temperature.
    Bank vectors are detached; gradient reaches the anchor through the recomputed neighbour
    similarities and the exact surrogate of the bank's denominator share (neighbor_bank.py).
    """

    def __init__(self, num_neighbors: int, temperature: float):
        super().__init__()
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
            raise ConfigError(f"part-neighbour loss needs num_neighbors >= 1 (an integer), got {num_neighbors!r}")
        self.num_neighbors = num_neighbors
        self.temperature = check_temperature("part-neighbour temperature tau_pn", temperature)

    def forward(
        self,
        z_a: Tensor,
        z_b: Tensor,
        z_a_all: Optional[Tensor] = None,
        z_b_all: Optional[Tensor] = None,
        offset: int = 0,
        bank: Optional[BankSearchResult] = None,
    ) -> Tensor:
        if z_a.dim() != 3:
            raise ValueError(f"L_pn expects sub-vectors (n, M, d), got {tuple(z_a.shape)}")
        z_a_all, z_b_all, total = resolve_views(z_a, z_b, z_a_all, z_b_all, offset)
        n = z_a.shape[0]
        anchors = F.normalize(torch.cat([z_a, z_b]), dim=-1)  # (2n, M, d)
        candidates = F.normalize(torch.cat([z_a_all, z_b_all]), dim=-1)  # (2N, M, d)
        logits = torch.einsum("rmd,cmd->rmc", anchors, candidates) / self.temperature  # (2n, M, 2N)
        self_idx, pos_idx = view_pair_indices(n, total, offset, z_a.device)
        # Remove the anchor itself and its other view from both numerator and denominator.
        excluded = torch.zeros(2 * n, 2 * total, dtype=torch.bool, device=z_a.device)
        rows = torch.arange(2 * n, device=z_a.device)
        excluded[rows, self_idx] = True
        excluded[rows, pos_idx] = True
        logits = logits.masked_fill(excluded.unsqueeze(1), float("-inf"))
        num_candidates = 2 * total - 2
        neighbour_pool, denominator_terms = logits, logits
        if bank is not None and bank.num_valid > 0:
            if bank.lse is None or bank.lse_grad is None:
                raise ValueError("L_pn needs the bank search run with tau (denominator statistics)")
            if bank.values.shape[:2] != anchors.shape[:2]:
                raise ValueError(
                    f"bank result covers {tuple(bank.values.shape[:2])} anchors, expected {tuple(anchors.shape[:2])}"
                )
            vectors = bank.vectors.to(anchors.dtype)
            # Bank neighbours' logits recomputed from the anchor: gradient to the anchor only.
            bank_logits = torch.einsum("rmd,rmkd->rmk", anchors, vectors) / self.temperature
            bank_logits = bank_logits.masked_fill(bank.ids < 0, float("-inf"))
            # Bank share of the denominator: value lse, gradient d lse / d anchor (exact).
            lse = bank.lse.to(anchors.dtype)
            lse_grad = bank.lse_grad.to(anchors.dtype)
            bank_share = lse + ((anchors - anchors.detach()) * lse_grad).sum(-1)  # (2n, M)
            neighbour_pool = torch.cat([logits, bank_logits], dim=-1)
            denominator_terms = torch.cat([logits, bank_share.unsqueeze(-1)], dim=-1)
            num_candidates += bank.num_valid
        k = min(self.num_neighbors, num_candidates)
        if k < 1:
            raise ValueError("L_pn needs at least one candidate besides the anchor and its positive")
        numerator = torch.logsumexp(neighbour_pool.topk(k, dim=-1).values, dim=-1)  # (2n, M)
        denominator = torch.logsumexp(denominator_terms, dim=-1)
        return (denominator - numerator).mean()
