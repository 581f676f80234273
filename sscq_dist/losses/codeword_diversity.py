"""L_cd: codeword diversity (entropy of the batch's mean codeword usage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.distributed import gather_with_grad
from sscq_dist.losses.ntxent import check_temperature

# Inside the log of L_cd (the authors' epsilon): keeps log finite for unused codewords.
USAGE_EPS = 1e-5


def usage_probabilities(f: Tensor, codebooks: Tensor, temperature: float) -> Tensor:
    """p_i^m = softmax_k(cos(f_i^m, c_k^m) / temperature).

    f: (N, M*d); codebooks: (M, K, d). Returns (N, M, K).
    """
    m, _, d = codebooks.shape
    f_sub = F.normalize(f.reshape(f.shape[0], m, d), dim=-1)
    c = F.normalize(codebooks, dim=-1)
    return torch.softmax(torch.einsum("nmd,mkd->nmk", f_sub, c) / temperature, dim=-1)


class CodewordDiversityLoss(nn.Module):
    """Codeword diversity regularisation (Wu, Zhang, Liwicki, SSCQ, arXiv 2206.09806).

    pbar^m is the mean over the global batch (both views) of p_i^m (see usage_probabilities);
    L_cd = mean_m sum_k pbar_k^m log(pbar_k^m + eps). Minimising it maximises the entropy of
    codeword usage; its minimum is about -log K.

    Args:
        temperature: tau_cd (> 0); the authors' 1.0 leaves the softmax nearly uniform.
        eps: added inside the log.

    forward(f_a (n, M*d), f_b (n, M*d), codebooks (M, K, d)) -> scalar. Every rank returns
    the same global value: the per-rank sums of p are all-gathered with gradient.
    """

    def __init__(self, temperature: float, eps: float = USAGE_EPS):
        super().__init__()
        self.temperature = check_temperature("codeword diversity temperature tau_cd", temperature)
        if not eps > 0:
            raise ValueError(f"codeword diversity eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, f_a: Tensor, f_b: Tensor, codebooks: Tensor) -> Tensor:
        p = usage_probabilities(torch.cat([f_a, f_b]), codebooks, self.temperature)  # (2n, M, K)
        # Sum locally, gather the (M, K) sums: fewer bytes than gathering every row.
        sums = gather_with_grad(p.sum(0, keepdim=True))  # (W, M, K)
        pbar = sums.sum(0) / (sums.shape[0] * p.shape[0])
        return (pbar * torch.log(pbar + self.eps)).sum(-1).mean()
