"""Cross-worker neighbour bank for the part-neighbour loss L_pn (SPEC section 4, "for scale").

Per subspace m, a FIFO memory of recent L2-normalised sub-quantized vectors z^m (detached),
sharded over W workers: each worker owns `size / W` slots per subspace and writes only its
own local batch. Global slot id of local slot s on rank r = r * (size / W) + s.

Exact distributed search (`NeighborBank.search`), one all-gather of the (detached) anchors
and one all-to-all of the per-shard results:

1. every rank scores all global anchors against its own shard (cosine; both unit vectors);
2. per shard and anchor it keeps the shard's top-k (values, global slot ids, vectors) and,
   when a temperature tau is given, the denominator statistics over *all* its filled slots:
       lse_r = log sum_j exp(s_j / tau)
       G_r   = d lse_r / d anchor = sum_j softmax_j(s / tau) v_j / tau;
3. the rows of each anchor go to the anchor's owner (all-to-all, no gradient);
4. the owner merges them: global top-k = top-k of the W per-shard top-k lists (a global
   top-k element is in its shard's top-k), lse = logsumexp_r lse_r and
   G = sum_r exp(lse_r - lse) G_r.

The loss then recomputes the neighbour similarities with its anchor (gradient to the anchor,
bank side detached) and enters the bank's share of the denominator as the surrogate
    lse.detach() + <a - a.detach(), G>,
whose value and gradient with respect to the anchor a are exactly those of
log sum_{j in bank} exp(a . v_j / tau). Memory per worker stays size / W slots.

Call `enqueue` after the loss of a step so a batch is never its own bank neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.distributed import exchange_rows, gather_no_grad, world_info
from sscq_dist.errors import ConfigError


@dataclass
class BankSearchResult:
    """Global top-k bank neighbours of R anchors, plus the bank's share of L_pn's denominator.

    values: (R, M, k) cosine similarities (-inf where fewer than k slots are filled);
    ids: (R, M, k) int64 global slot ids (-1 where missing); vectors: (R, M, k, d) the
    neighbours' unit vectors (zeros where missing); lse: (R, M) log sum_j exp(s_j / tau) over
    all filled slots of all shards, or None without tau; lse_grad: (R, M, d) its gradient
    with respect to the anchor, or None; num_filled: filled slots over all shards.
    All tensors are detached.
    """

    values: Tensor
    ids: Tensor
    vectors: Tensor
    lse: Optional[Tensor]
    lse_grad: Optional[Tensor]
    num_filled: int

    @property
    def num_valid(self) -> int:
        """Bank neighbours per anchor that exist: min(k, num_filled)."""
        return min(self.values.shape[-1], self.num_filled)


def merge_shard_results(parts: list[BankSearchResult], k: int) -> BankSearchResult:
    """Merge per-shard results for the same anchors into the global top-k and denominator.

    parts: one BankSearchResult per shard, each (R, M, k_s, ...) with global slot ids.
    Returns the global top-k (R, M, k) and the combined lse / lse_grad.
    """
    values = torch.cat([p.values for p in parts], dim=-1)  # (R, M, sum k_s)
    ids = torch.cat([p.ids for p in parts], dim=-1)
    vectors = torch.cat([p.vectors for p in parts], dim=-2)
    k = min(k, values.shape[-1])
    top_vals, top_idx = values.topk(k, dim=-1)
    top_ids = ids.gather(-1, top_idx)
    top_vecs = vectors.gather(-2, top_idx.unsqueeze(-1).expand(*top_idx.shape, vectors.shape[-1]))
    num_filled = sum(p.num_filled for p in parts)
    lse = lse_grad = None
    if parts[0].lse is not None:
        shard_lse = torch.stack([p.lse for p in parts])  # (W, R, M)
        shard_grad = torch.stack([p.lse_grad for p in parts])  # (W, R, M, d)
        if num_filled == 0:
            lse = torch.full_like(shard_lse[0], float("-inf"))
            lse_grad = torch.zeros_like(shard_grad[0])
        else:
            lse = torch.logsumexp(shard_lse, dim=0)
            # Weight of shard r in the softmax over all slots; empty shards get exp(-inf) = 0.
            weights = torch.exp(shard_lse - lse.unsqueeze(0))
            lse_grad = (weights.unsqueeze(-1) * shard_grad).sum(0)
    return BankSearchResult(top_vals, top_ids, top_vecs, lse, lse_grad, num_filled)


class NeighborBank(nn.Module):
    """FIFO memory of unit sub-vectors, one shard of `size / world_size` slots per worker.

    Args:
        num_subspaces: M, codebooks / subspaces.
        dim: d, sub-vector dimension.
        size: Q, slots per subspace over all workers (divisible by world_size).
        world_size: W, number of workers sharing the bank.
        rank: this worker's rank; it owns global slots [rank*Q/W, (rank+1)*Q/W).

    Buffers (in state_dict, so checkpoints resume the bank): `vectors` (M, Q/W, d),
    `ptr` (next slot to write) and `filled` (slots holding data), both int64 scalars.
    """

    def __init__(self, num_subspaces: int, dim: int, size: int, world_size: int = 1, rank: int = 0):
        super().__init__()
        if num_subspaces < 1 or dim < 1:
            raise ConfigError(f"neighbour bank needs M >= 1 and d >= 1, got M={num_subspaces}, d={dim}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"neighbour bank rank {rank} is not in a world of size {world_size}")
        if size < world_size or size % world_size:
            raise ConfigError(
                f"neighbour bank size {size} must be a positive multiple of the worker count {world_size}"
            )
        self.num_subspaces = num_subspaces
        self.dim = dim
        self.size = size
        self.world_size = world_size
        self.rank = rank
        self.shard_size = size // world_size
        self.register_buffer("vectors", torch.zeros(num_subspaces, self.shard_size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def num_filled(self) -> int:
        """Filled slots in this worker's shard (slots [0, num_filled) hold data)."""
        return int(self.filled)

    @property
    def slot_offset(self) -> int:
        """Global id of this shard's slot 0."""
        return self.rank * self.shard_size

    @torch.no_grad()
    def enqueue(self, z_sub: Tensor) -> None:
        """Write a local batch into this shard, oldest entries first out.

        z_sub: (b, M, d) sub-quantized vectors; stored L2-normalised and detached. When
        b > Q/W only the last Q/W rows are kept.
        """
        if z_sub.dim() != 3 or z_sub.shape[1:] != self.vectors.shape[::2]:
            raise ValueError(
                f"enqueue expects (b, {self.num_subspaces}, {self.dim}), got {tuple(z_sub.shape)}"
            )
        b, s = z_sub.shape[0], self.shard_size
        ptr = int(self.ptr)
        rows = F.normalize(z_sub.detach().to(self.vectors.dtype), dim=-1)
        start = ptr
        if b > s:
            # Only the newest s rows survive; they land where a full FIFO write would put them.
            rows, start = rows[-s:], (ptr + b - s) % s
        slots = (start + torch.arange(rows.shape[0], device=self.vectors.device)) % s
        self.vectors[:, slots] = rows.transpose(0, 1)
        self.ptr.fill_((ptr + b) % s)
        self.filled.fill_(min(s, int(self.filled) + b))

    @torch.no_grad()
    def shard_search(self, anchors: Tensor, k: int, tau: Optional[float] = None) -> BankSearchResult:
        """Top-k of this shard for every anchor (no communication).

        anchors: (A, M, d) unit vectors. Returns a BankSearchResult with k columns (padded
        with -inf / -1 / zeros where the shard holds fewer than k entries) and global ids.
        """
        a = anchors.detach()
        n, m, d = a.shape
        filled = self.num_filled
        bank = self.vectors[:, :filled].to(a.dtype)  # (M, filled, d)
        sims = torch.einsum("amd,msd->ams", a, bank)  # (A, M, filled)
        ks = min(k, filled)
        top_vals, top_slots = sims.topk(ks, dim=-1)
        values = a.new_full((n, m, k), float("-inf"))
        ids = torch.full((n, m, k), -1, dtype=torch.long, device=a.device)
        vectors = a.new_zeros((n, m, k, d))
        values[..., :ks] = top_vals
        ids[..., :ks] = top_slots + self.slot_offset
        # vectors[a, m, j] = bank[m, top_slots[a, m, j]]
        m_idx = torch.arange(m, device=a.device).view(1, m, 1)
        vectors[..., :ks, :] = bank[m_idx, top_slots]
        lse = lse_grad = None
        if tau is not None:
            if filled == 0:
                lse = a.new_full((n, m), float("-inf"))
                lse_grad = a.new_zeros((n, m, d))
            else:
                logits = sims / tau
                lse = torch.logsumexp(logits, dim=-1)
                weights = torch.softmax(logits, dim=-1)
                lse_grad = torch.einsum("ams,msd->amd", weights, bank) / tau
        return BankSearchResult(values, ids, vectors, lse, lse_grad, filled)

    @torch.no_grad()
    def search(
        self,
        anchors: Tensor,
        k: int,
        tau: Optional[float] = None,
        gathered_anchors: Optional[Tensor] = None,
    ) -> BankSearchResult:
        """Merged global top-k bank neighbours of this worker's anchors (a collective call).

        anchors: (R, M, d) this worker's unit anchors. k: neighbours per subspace (>= 1).
        tau: temperature for the denominator statistics (lse, lse_grad); None skips them.
        gathered_anchors: optional (W*R, M, d) all workers' anchors, rank-major (rows of rank
        r at [r*R, (r+1)*R)), when the caller has them already (saves an all-gather).
        Returns BankSearchResult with values/ids (R, M, k), vectors (R, M, k, d).
        """
        if k < 1:
            raise ConfigError(f"bank search needs k >= 1 neighbours, got {k}")
        if tau is not None and not tau > 0:
            raise ConfigError(f"bank search temperature must be > 0, got {tau}")
        world, rank = world_info()
        if (world, rank) != (self.world_size, self.rank):
            raise ValueError(
                f"neighbour bank was built for rank {self.rank} of {self.world_size} workers but "
                f"this process is rank {rank} of {world}"
            )
        if world == 1:
            return self.shard_search(anchors, k, tau)
        r, m, d = anchors.shape
        everyone = gathered_anchors if gathered_anchors is not None else gather_no_grad(anchors)
        if everyone.shape[0] != world * r:
            raise ValueError(f"gathered_anchors has {everyone.shape[0]} rows, expected {world * r}")
        local = self.shard_search(everyone, k, tau)
        # Pack floats and ints per anchor row so one all-to-all each moves the shard's result.
        floats = [local.values.reshape(world * r, -1), local.vectors.reshape(world * r, -1)]
        if tau is not None:
            floats += [local.lse.reshape(world * r, -1), local.lse_grad.reshape(world * r, -1)]
        filled_col = torch.full((world * r, 1), local.num_filled, dtype=torch.long, device=anchors.device)
        recv_f = exchange_rows(torch.cat(floats, dim=1))  # (W, R, F)
        recv_i = exchange_rows(torch.cat([local.ids.reshape(world * r, -1), filled_col], dim=1))
        parts = []
        sizes = [m * k, m * k * d] + ([m, m * d] if tau is not None else [])
        for s in range(world):
            chunks = torch.split(recv_f[s], sizes, dim=1)
            parts.append(
                BankSearchResult(
                    values=chunks[0].reshape(r, m, k),
                    ids=recv_i[s, :, :-1].reshape(r, m, k),
                    vectors=chunks[1].reshape(r, m, k, d),
                    lse=chunks[2].reshape(r, m) if tau is not None else None,
                    lse_grad=chunks[3].reshape(r, m, d) if tau is not None else None,
                    num_filled=int(recv_i[s, 0, -1]) if r > 0 else 0,
                )
            )
        return merge_shard_results(parts, k)
