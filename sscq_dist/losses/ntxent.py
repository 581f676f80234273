"""NT-Xent (SimCLR) instance-contrastive loss, used for L_icf (on f) and L_icz (on z)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sscq_dist.errors import ConfigError


def check_temperature(name: str, value: float) -> float:
    """Return `value` as float, or raise ConfigError when it is not a positive number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{name} must be a positive, finite temperature, got {value!r}")
    return number


def view_pair_indices(n: int, total: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Self and positive columns of the local anchors among the global candidates.

    Anchors are the 2n local rows cat(view_a, view_b); candidates are the 2*total global rows
    cat(view_a_all, view_b_all), with the local rows at [offset, offset + n) of each view.
    Returns (self_idx, pos_idx), each (2n,) int64.
    """
    if n < 1 or offset < 0 or offset + n > total:
        raise ValueError(f"local rows [{offset}, {offset + n}) do not fit in a global batch of {total}")
    local = torch.arange(n, device=device) + offset
    self_idx = torch.cat([local, local + total])
    pos_idx = torch.cat([local + total, local])
    return self_idx, pos_idx


def resolve_views(
    a: Tensor, b: Tensor, a_all: Optional[Tensor], b_all: Optional[Tensor], offset: int
) -> tuple[Tensor, Tensor, int]:
    """Default the global views to the local ones and check their shapes agree."""
    if a.shape != b.shape:
        raise ValueError(f"the two views differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a_all is None and b_all is None:
        if offset != 0:
            raise ValueError("offset needs the gathered views a_all and b_all")
        return a, b, a.shape[0]
    if a_all is None or b_all is None or a_all.shape != b_all.shape or a_all.shape[1:] != a.shape[1:]:
        raise ValueError("a_all and b_all must both be given, with the local views' trailing shape")
    return a_all, b_all, a_all.shape[0]


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (Chen et al., SimCLR, ICML 2020).

    For anchor i among the 2N views of a batch of N images, with cosine similarity s and
    temperature tau: loss_i = -log( exp(s(i, pos(i))/tau) / sum_{j != i} exp(s(i, j)/tau) ),
    averaged over anchors.

    Args:
        temperature: tau (> 0).
        tau_plus: debiasing (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020) in
            [0, 1): the class prior of a random negative being a same-class image. With
            tau_plus > 0 the negatives' sum is replaced by the debiased estimate
            Ng = max((sum_neg exp(s/tau) - tau_plus * N_neg * exp(s_pos/tau)) / (1 - tau_plus),
            N_neg * exp(-1/tau)), N_neg = 2N - 2; 0 is plain NT-Xent. With ten balanced
            classes about a tenth of a batch's "negatives" share the anchor's class.
        cancel_k: false-negative cancellation (Huynh et al., WACV 2022), >= 0: each anchor's
            k most similar negatives (by the detached logits) leave the denominator; 0 keeps all.

    forward(a (n, D), b (n, D), a_all=None (N, D), b_all=None (N, D), offset=0) -> scalar.
    a, b are the local views; a_all, b_all the gathered global views (default: a, b) whose
    rows [offset, offset + n) are the local ones. Only the local anchors' rows are computed
    (local x global logits), so the mean over ranks is the global-batch loss.
    """

    def __init__(self, temperature: float, tau_plus: float = 0.0, cancel_k: int = 0):
        super().__init__()
        self.temperature = check_temperature("NT-Xent temperature tau_ic", temperature)
        if not 0.0 <= tau_plus < 1.0:
            raise ConfigError(f"NT-Xent debiasing tau_plus must be in [0, 1), got {tau_plus!r}")
        if int(cancel_k) != cancel_k or cancel_k < 0:
            raise ConfigError(f"NT-Xent false-negative cancellation k must be an integer >= 0, got {cancel_k!r}")
        self.tau_plus = float(tau_plus)
        self.cancel_k = int(cancel_k)

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        a_all: Optional[Tensor] = None,
        b_all: Optional[Tensor] = None,
        offset: int = 0,
    ) -> Tensor:
        a_all, b_all, total = resolve_views(a, b, a_all, b_all, offset)
        n = a.shape[0]
        anchors = F.normalize(torch.cat([a, b]), dim=-1)  # (2n, D)
        candidates = F.normalize(torch.cat([a_all, b_all]), dim=-1)  # (2N, D)
        logits = anchors @ candidates.T / self.temperature  # (2n, 2N)
        self_idx, pos_idx = view_pair_indices(n, total, offset, a.device)
        # Remove each anchor's similarity with itself (same view of the same image).
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[torch.arange(2 * n, device=a.device), self_idx] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        if self.tau_plus == 0.0 and self.cancel_k == 0:
            return F.cross_entropy(logits, pos_idx)
        rows = torch.arange(2 * n, device=a.device)
        neg_mask = ~self_mask
        neg_mask[rows, pos_idx] = False
        if self.cancel_k:
            k = min(self.cancel_k, 2 * total - 3)  # keep at least one negative
            if k > 0:
                hardest = logits.detach().masked_fill(~neg_mask, float("-inf")).topk(k, dim=1).indices
                neg_mask[rows.unsqueeze(1), hardest] = False
        n_neg = neg_mask.sum(1).to(logits.dtype)  # (2n,) negatives left per anchor; int * float is float32
        pos = logits[rows, pos_idx]
        shift = logits.detach().max(1).values  # exp stays finite; cancels in the ratio
        neg_sum = torch.exp(logits - shift[:, None]).masked_fill(~neg_mask, 0.0).sum(1)
        pos_exp = torch.exp(pos - shift)
        if self.tau_plus > 0.0:
            floor = n_neg * torch.exp(-1.0 / self.temperature - shift)  # every negative at cosine -1
            neg_sum = torch.maximum((neg_sum - self.tau_plus * n_neg * pos_exp) / (1.0 - self.tau_plus), floor)
        return (torch.log(pos_exp + neg_sum) - (pos - shift)).mean()
