"""Learned product quantizer: M codebooks of K codewords of dimension d (SPEC section 4).

Soft quantization (training): per subspace m,
    z^m = sum_k softmax_k(-||f^m - c^m_k||^2 / tau_q) c^m_k,
and z is the concatenation over m. Hard codes (indexing): code^m = argmin_k ||f^m - c^m_k||^2.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sscq_dist.errors import ConfigError


def squared_distances(f: Tensor, codebooks: Tensor) -> Tensor:
    """Squared L2 distance of every sub-vector to every codeword of its subspace.

    f: (N, M*d) or (N, M, d); codebooks: (M, K, d). Returns (N, M, K).
    Computed as the sum of squared differences (not the expanded |x|^2 - 2xc + |c|^2) so
    near-ties resolve the same way as an exhaustive L2 search.
    """
    m, _, d = codebooks.shape
    f = f.reshape(f.shape[0], m, d)
    diff = f.unsqueeze(2) - codebooks.unsqueeze(0)  # (N, M, K, d)
    return (diff * diff).sum(-1)


def hard_codes(f: Tensor, codebooks: Tensor) -> Tensor:
    """Index of the nearest codeword per subspace (squared L2 argmin).

    f: (N, M*d); codebooks: (M, K, d). Returns (N, M) int64.
    """
    with torch.no_grad():
        return squared_distances(f, codebooks).argmin(dim=-1)


class ProductQuantizer(nn.Module):
    """Soft product quantization with learnable codebooks.

    Args:
        num_codebooks: M, number of subspaces.
        num_codewords: K, codewords per codebook.
        codeword_dim: d, dimension of a subspace.
        tau_q: softmax temperature of the soft assignment (> 0).

    `codebooks` is one parameter of shape (M, K, d), Xavier-uniform initialised as the
    authors' (K, M*d) matrix.
    forward(f (N, M*d)) -> (z (N, M*d), soft (N, M, K), codes (N, M) int64).
    """

    def __init__(self, num_codebooks: int, num_codewords: int, codeword_dim: int, tau_q: float):
        super().__init__()
        if num_codebooks < 1 or num_codewords < 2 or codeword_dim < 1:
            raise ConfigError(
                "product quantizer needs M >= 1 codebooks, K >= 2 codewords and d >= 1, "
                f"got M={num_codebooks}, K={num_codewords}, d={codeword_dim}"
            )
        if not tau_q > 0:
            raise ConfigError(f"soft quantization temperature tau_q must be > 0, got {tau_q}")
        self.num_codebooks = num_codebooks
        self.num_codewords = num_codewords
        self.codeword_dim = codeword_dim
        self.tau_q = float(tau_q)
        init = torch.empty(num_codewords, num_codebooks * codeword_dim)
        nn.init.xavier_uniform_(init)
        # (K, M*d) -> (M, K, d): subspace m owns columns [m*d, (m+1)*d).
        self.codebooks = nn.Parameter(
            init.view(num_codewords, num_codebooks, codeword_dim).permute(1, 0, 2).contiguous()
        )

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dist2 = squared_distances(f, self.codebooks)  # (N, M, K)
        soft = torch.softmax(-dist2 / self.tau_q, dim=-1)
        z = torch.einsum("nmk,mkd->nmd", soft, self.codebooks).reshape(f.shape[0], -1)
        codes = dist2.detach().argmin(dim=-1)
        return z, soft, codes
