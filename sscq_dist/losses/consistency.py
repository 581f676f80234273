"""L_cc: consistent contrastive regularisation between the two views of each image."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.losses.ntxent import check_temperature, resolve_views


class ConsistentContrastiveLoss(nn.Module):
    """Consistent contrastive regularisation (Wu, Zhang, Liwicki, SSCQ, arXiv 2206.09806).

    With fused embeddings h = f + z, for image n take the cosine-similarity row of view a
    and of view b over the same 2N - 2 candidates (every view except n's two), turn each
    into a distribution softmax(row / tau), and penalise their symmetric KL divergence
    0.5 KL(P_a || P_b) + 0.5 KL(P_b || P_a), averaged over images.

    Args:
        temperature: tau_cc (> 0).

    forward(h_a (n, D), h_b (n, D), h_a_all=None (N, D), h_b_all=None (N, D), offset=0) ->
    scalar. Local pairs only (rows of this rank's images), candidates from the global batch.
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = check_temperature("consistent contrastive temperature tau_cc", temperature)

    def forward(
        self,
        h_a: Tensor,
        h_b: Tensor,
        h_a_all: Optional[Tensor] = None,
        h_b_all: Optional[Tensor] = None,
        offset: int = 0,
    ) -> Tensor:
        h_a_all, h_b_all, total = resolve_views(h_a, h_b, h_a_all, h_b_all, offset)
        if total < 2:
            raise ValueError("L_cc needs a global batch of at least 2 images (2B - 2 > 0 candidates)")
        n = h_a.shape[0]
        candidates = F.normalize(torch.cat([h_a_all, h_b_all]), dim=-1)  # (2N, D)
        row_a = F.normalize(h_a, dim=-1) @ candidates.T  # (n, 2N)
        row_b = F.normalize(h_b, dim=-1) @ candidates.T
        # Remove both views of image n from its rows, leaving the same 2N - 2 columns in the
        # same order for view a and view b.
        local = torch.arange(n, device=h_a.device) + offset
        keep = torch.ones_like(row_a, dtype=torch.bool)
        rows = torch.arange(n, device=h_a.device)
        keep[rows, local] = False
        keep[rows, local + total] = False
        log_p = F.log_softmax(row_a[keep].view(n, 2 * total - 2) / self.temperature, dim=-1)
        log_q = F.log_softmax(row_b[keep].view(n, 2 * total - 2) / self.temperature, dim=-1)
        # 0.5 KL(p||q) + 0.5 KL(q||p) = 0.5 sum (p - q)(log p - log q)
        sym_kl = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
        return sym_kl.mean()
