"""Each SSCQ loss against a naive per-sample reference written from the SPEC formulas."""

from __future__ import annotations

import math

import pytest
import torch

from sscq_dist.config import LossConfig, ModelConfig
from sscq_dist.errors import ConfigError
from sscq_dist.losses import (
    CodewordDiversityLoss,
    ConsistentContrastiveLoss,
    NTXentLoss,
    PartNeighborLoss,
    SSCQObjective,
    codeword_entropy,
)
from sscq_dist.model import ProductQuantizer, SSCQOutput
from sscq_dist.neighbor_bank import NeighborBank

M, K, D = 3, 4, 5


# ----------------------------------------------------------------- naive references


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def _rows(t: torch.Tensor) -> list:
    return t.tolist()


def _positive(i: int, batch: int) -> int:
    return i + batch if i < batch else i - batch


def naive_ntxent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    x = _rows(torch.cat([a, b]))
    batch = a.shape[0]
    total = 0.0
    for i in range(2 * batch):
        denom = sum(math.exp(_cos(x[i], x[j]) / tau) for j in range(2 * batch) if j != i)
        total += -math.log(math.exp(_cos(x[i], x[_positive(i, batch)]) / tau) / denom)
    return total / (2 * batch)


def naive_dcl(a: torch.Tensor, b: torch.Tensor, tau: float, tau_plus: float, cancel_k: int) -> tuple[float, int]:
    """Debiased NT-Xent (Chuang et al. 2020) after dropping each anchor's k most similar
    negatives; also returns how many anchors hit the floor N_neg * exp(-1/tau)."""
    x = _rows(torch.cat([a, b]))
    batch = a.shape[0]
    total, floored = 0.0, 0
    for i in range(2 * batch):
        pos = math.exp(_cos(x[i], x[_positive(i, batch)]) / tau)
        negs = sorted((_cos(x[i], x[j]) for j in range(2 * batch) if j not in (i, _positive(i, batch))),
                      reverse=True)[cancel_k:]
        neg = sum(math.exp(s / tau) for s in negs)
        if tau_plus:
            floor = len(negs) * math.exp(-1 / tau)
            debiased = (neg - tau_plus * len(negs) * pos) / (1 - tau_plus)
            floored += debiased < floor
            neg = max(debiased, floor)
        total += -math.log(pos / (pos + neg))
    return total / (2 * batch), floored


def naive_cc(h_a: torch.Tensor, h_b: torch.Tensor, tau: float) -> float:
    x = _rows(torch.cat([h_a, h_b]))
    batch = h_a.shape[0]
    total = 0.0
    for n in range(batch):
        cands = [j for j in range(2 * batch) if j not in (n, n + batch)]
        assert len(cands) == 2 * batch - 2
        ea = [math.exp(_cos(x[n], x[j]) / tau) for j in cands]
        eb = [math.exp(_cos(x[n + batch], x[j]) / tau) for j in cands]
        pa = [e / sum(ea) for e in ea]
        pb = [e / sum(eb) for e in eb]
        kl_ab = sum(p * math.log(p / q) for p, q in zip(pa, pb))
        kl_ba = sum(q * math.log(q / p) for p, q in zip(pa, pb))
        total += 0.5 * kl_ab + 0.5 * kl_ba
    return total / batch


def naive_pn(z_a: torch.Tensor, z_b: torch.Tensor, k: int, tau: float, bank: list | None = None) -> float:
    """z_a, z_b: (B, M, d). bank: per subspace a list of extra candidate vectors."""
    x = _rows(torch.cat([z_a, z_b]))
    batch, m = z_a.shape[0], z_a.shape[1]
    total = 0.0
    for sub in range(m):
        for i in range(2 * batch):
            sims = [_cos(x[i][sub], x[j][sub]) for j in range(2 * batch) if j not in (i, _positive(i, batch))]
            if bank is not None:
                sims += [_cos(x[i][sub], v) for v in bank[sub]]
            nbrs = sorted(sims, reverse=True)[: min(k, len(sims))]
            num = sum(math.exp(s / tau) for s in nbrs)
            den = sum(math.exp(s / tau) for s in sims)
            total += -math.log(num / den)
    return total / (2 * batch * m)


def naive_cd(f_a: torch.Tensor, f_b: torch.Tensor, codebooks: torch.Tensor, tau: float) -> float:
    m, k, d = codebooks.shape
    f = _rows(torch.cat([f_a, f_b]))
    c = _rows(codebooks)
    total = 0.0
    for sub in range(m):
        pbar = [0.0] * k
        for row in f:
            part = row[sub * d : (sub + 1) * d]
            e = [math.exp(_cos(part, c[sub][j]) / tau) for j in range(k)]
            for j in range(k):
                pbar[j] += e[j] / sum(e) / len(f)
        total += sum(p * math.log(p + 1e-5) for p in pbar)
    return total / m


# ----------------------------------------------------------------- tests


@pytest.fixture(params=[3, 8], ids=["B3", "B8"])
def batch(request):
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ntxent_matches_naive(batch):
    g = _gen(batch)
    a, b = torch.randn(batch, 7, generator=g, dtype=torch.float64), torch.randn(batch, 7, generator=g, dtype=torch.float64)
    got = NTXentLoss(0.5)(a, b).item()
    assert got == pytest.approx(naive_ntxent(a, b, 0.5), abs=1e-5)


@pytest.mark.parametrize("tau_plus, cancel_k", [(0.1, 0), (0.0, 2), (0.1, 2), (0.9, 0)])
def test_debiased_and_cancelled_ntxent_match_naive(batch, tau_plus, cancel_k):
    g = _gen(20 + batch)
    a = torch.randn(batch, 7, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(batch, 7, generator=g, dtype=torch.float64)
    want, floored = naive_dcl(a, b, 0.5, tau_plus, cancel_k)
    assert NTXentLoss(0.5, tau_plus, cancel_k)(a, b).item() == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(naive_ntxent(a, b, 0.5), abs=1e-3)  # the options change the loss
    if tau_plus == 0.9:  # close positives and a large prior: the estimate falls to its floor
        assert floored > 0


@pytest.mark.parametrize("tau_plus, cancel_k", [(0.0, 0), (0.1, 0), (0.0, 3), (0.2, 2)])
def test_ntxent_shards_of_anchors_average_to_the_global_batch_loss_and_gradient(tau_plus, cancel_k):
    """What each worker computes (its anchors against the gathered batch) averages to the
    one-process loss and gradient, with debiasing and cancellation too."""
    g = _gen(31)
    world, local = 2, 4
    a = torch.randn(world * local, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(world * local, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss = NTXentLoss(0.5, tau_plus, cancel_k)
    full = loss(a, b)
    want = torch.autograd.grad(full, (a, b))
    shards = [loss(a[r * local:(r + 1) * local], b[r * local:(r + 1) * local], a, b, r * local)
              for r in range(world)]
    mean = sum(shards) / world
    assert mean.item() == pytest.approx(full.item(), abs=1e-12)
    for got, ref in zip(torch.autograd.grad(mean, (a, b)), want):
        assert torch.allclose(got, ref, atol=1e-12)


def test_consistency_matches_naive(batch):
    g = _gen(10 + batch)
    h_a = torch.randn(batch, 6, generator=g, dtype=torch.float64)
    h_b = torch.randn(batch, 6, generator=g, dtype=torch.float64)
    got = ConsistentContrastiveLoss(0.2)(h_a, h_b).item()
    assert got == pytest.approx(naive_cc(h_a, h_b, 0.2), abs=1e-5)
    # Identical rows give identical distributions: zero divergence.
    assert ConsistentContrastiveLoss(0.2)(h_a, h_a).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("k", [1, 2, 20])
def test_part_neighbor_matches_naive(batch, k):
    g = _gen(20 + batch)
    z_a = torch.randn(batch, M, D, generator=g, dtype=torch.float64)
    z_b = torch.randn(batch, M, D, generator=g, dtype=torch.float64)
    got = PartNeighborLoss(k, 0.5)(z_a, z_b).item()
    assert got == pytest.approx(naive_pn(z_a, z_b, k, 0.5), abs=1e-5)
    if k >= 2 * batch - 2:
        assert got == pytest.approx(0.0, abs=1e-9)  # every candidate is a neighbour
    else:
        assert got > 1e-3


def test_part_neighbor_excludes_positive():
    """An anchor's positive never counts as a neighbour even when it is the most similar."""
    g = _gen(3)
    z_a = torch.randn(4, M, D, generator=g, dtype=torch.float64)
    z_b = z_a + 1e-3 * torch.randn(4, M, D, generator=g, dtype=torch.float64)
    got = PartNeighborLoss(2, 0.5)(z_a, z_b).item()
    assert got == pytest.approx(naive_pn(z_a, z_b, 2, 0.5), abs=1e-5)


def test_codeword_diversity_matches_naive(batch):
    g = _gen(30 + batch)
    f_a = torch.randn(batch, M * D, generator=g, dtype=torch.float64)
    f_b = torch.randn(batch, M * D, generator=g, dtype=torch.float64)
    cb = torch.randn(M, K, D, generator=g, dtype=torch.float64)
    for tau in (0.2, 1.0):
        got = CodewordDiversityLoss(tau)(f_a, f_b, cb).item()
        assert got == pytest.approx(naive_cd(f_a, f_b, cb, tau), abs=1e-5)
        assert got >= -math.log(K) - 1e-4  # entropy of K codewords is at most log K


def _filled_bank(entries: torch.Tensor, size: int) -> NeighborBank:
    bank = NeighborBank(entries.shape[1], entries.shape[2], size).double()
    bank.enqueue(entries)
    return bank


@pytest.mark.parametrize("filled", [5, 12])
def test_part_neighbor_with_bank_matches_naive_value_and_gradient(batch, filled):
    """Bank entries join numerator and denominator; the surrogate's anchor gradient is exact."""
    g = _gen(40 + batch)
    tau, k = 0.5, 4
    z_a = torch.randn(batch, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(batch, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    entries = torch.randn(filled, M, D, generator=g, dtype=torch.float64)
    bank = _filled_bank(entries, size=12)
    anchors = torch.nn.functional.normalize(torch.cat([z_a, z_b]).detach(), dim=-1)
    result = bank.search(anchors, k, tau=tau)
    loss = PartNeighborLoss(k, tau)(z_a, z_b, bank=result)
    unit = torch.nn.functional.normalize(entries, dim=-1)
    naive = naive_pn(z_a.detach(), z_b.detach(), k, tau, bank=[unit[:, s].tolist() for s in range(M)])
    assert loss.item() == pytest.approx(naive, abs=1e-5)
    ga, gb = torch.autograd.grad(loss, [z_a, z_b])

    # Direct reference: bank vectors as detached extra candidates of a plain computation.
    za2, zb2 = z_a.detach().clone().requires_grad_(), z_b.detach().clone().requires_grad_()
    x = torch.nn.functional.normalize(torch.cat([za2, zb2]), dim=-1)  # (2B, M, d)
    n2 = 2 * batch
    sims = torch.einsum("imd,jmd->imj", x, x)
    sims_bank = torch.einsum("imd,jmd->imj", x, unit)
    mask = torch.zeros(n2, n2, dtype=torch.bool)
    for i in range(n2):
        mask[i, i] = mask[i, (i + batch) % n2] = True
    logits = torch.cat([sims.masked_fill(mask[:, None], float("-inf")), sims_bank], -1) / tau
    ref = (torch.logsumexp(logits, -1) - torch.logsumexp(logits.topk(k, -1).values, -1)).mean()
    ra, rb = torch.autograd.grad(ref, [za2, zb2])
    assert ref.item() == pytest.approx(loss.item(), abs=1e-10)
    assert torch.allclose(ga, ra, atol=1e-10) and torch.allclose(gb, rb, atol=1e-10)


def test_empty_bank_changes_nothing():
    g = _gen(7)
    z_a, z_b = torch.randn(4, M, D, generator=g), torch.randn(4, M, D, generator=g)
    bank = NeighborBank(M, D, 8)
    result = bank.search(torch.nn.functional.normalize(torch.cat([z_a, z_b]), dim=-1), 3, tau=0.5)
    loss = PartNeighborLoss(3, 0.5)
    assert torch.equal(loss(z_a, z_b, bank=result), loss(z_a, z_b))


def _outputs(batch: int, cfg: ModelConfig, seed: int):
    g = _gen(seed)
    pq = ProductQuantizer(cfg.num_codebooks, cfg.num_codewords, cfg.codeword_dim, cfg.tau_q).double()
    outs = []
    for _ in range(2):
        f = torch.randn(batch, cfg.embedding_dim, generator=g, dtype=torch.float64)
        z, soft, codes = pq(f)
        outs.append(SSCQOutput(f=f, z=z, soft=soft, codes=codes))
    return outs, pq.codebooks


def test_objective_total_is_weighted_sum_of_naive_terms(batch):
    mcfg = ModelConfig(bits=16)  # M = 4, K = 16, d = 16
    lcfg = LossConfig(num_neighbors=3)
    (out_a, out_b), cb = _outputs(batch, mcfg, 50 + batch)
    res = SSCQObjective(lcfg, mcfg)(out_a, out_b, cb)
    m, d = mcfg.num_codebooks, mcfg.codeword_dim
    naive = {
        "icf": naive_ntxent(out_a.f, out_b.f, lcfg.tau_ic),
        "icz": naive_ntxent(out_a.z.detach(), out_b.z.detach(), lcfg.tau_ic),
        "cc": naive_cc((out_a.f + out_a.z).detach(), (out_b.f + out_b.z).detach(), lcfg.tau_cc),
        "pn": naive_pn(out_a.z.detach().view(batch, m, d), out_b.z.detach().view(batch, m, d), 3, lcfg.tau_pn),
        "cd": naive_cd(out_a.f, out_b.f, cb.detach(), lcfg.tau_cd),
    }
    for name, value in naive.items():
        assert res[name].item() == pytest.approx(value, abs=1e-5), name
    weighted = sum(getattr(lcfg, f"w_{n}") * v for n, v in naive.items())
    assert res["total"].item() == pytest.approx(weighted, abs=1e-5)
    assert res["total"].requires_grad and not res["codeword_entropy"].requires_grad


def test_codeword_entropy_matches_counts():
    codes = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])
    ent = codeword_entropy(codes, 4).item()
    # Subspace 0: one codeword (0 nats); subspace 1: usage (1/2, 1/4, 1/4).
    expected = (0.0 + -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))) / 2
    assert ent == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NTXentLoss(0.0), "temperature"),
        (lambda: NTXentLoss(0.5, tau_plus=1.0), "tau_plus"),
        (lambda: NTXentLoss(0.5, cancel_k=-1), "cancellation"),
        (lambda: ConsistentContrastiveLoss(-1.0), "temperature"),
        (lambda: PartNeighborLoss(0, 0.5), "num_neighbors >= 1"),
        (lambda: PartNeighborLoss(3, 0.0), "temperature"),
        (lambda: CodewordDiversityLoss(0.0), "temperature"),
        (lambda: SSCQObjective(LossConfig(tau_pn=0.0), ModelConfig()), "tau_pn"),
        (lambda: SSCQObjective(LossConfig(num_neighbors=0), ModelConfig()), "num_neighbors"),
        (lambda: SSCQObjective(LossConfig(w_cc=-1.0), ModelConfig()), "w_cc"),
    ],
)
def test_bad_hyperparameters_fail_in_init(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
