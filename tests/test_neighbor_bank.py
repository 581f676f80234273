"""NeighborBank: FIFO writes, shard memory, merged top-k, checkpoint round-trip."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from sscq_dist.errors import ConfigError
from sscq_dist.neighbor_bank import NeighborBank, merge_shard_results

M, D = 3, 4


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, M, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_memory_per_worker_is_size_over_world():
    for world in (1, 2, 4):
        bank = NeighborBank(M, D, size=64, world_size=world, rank=world - 1)
        assert bank.vectors.shape == (M, 64 // world, D)
        assert bank.slot_offset == (world - 1) * (64 // world)


def test_enqueue_stores_normalised_detached_rows_in_fifo_order_with_wraparound():
    bank = NeighborBank(M, D, size=5).double()
    x = _rows(7).requires_grad_()
    bank.enqueue(x[:3])
    assert bank.num_filled == 3 and int(bank.ptr) == 3
    assert torch.allclose(bank.vectors[:, :3], F.normalize(x[:3].detach(), dim=-1).transpose(0, 1))
    assert not bank.vectors.requires_grad
    bank.enqueue(x[3:7])  # 4 rows: slots 3, 4, then wrap to 0, 1
    assert bank.num_filled == 5 and int(bank.ptr) == 2
    expected_slots = [5, 6, 2, 3, 4]  # row of x held by slots 0..4
    unit = F.normalize(x.detach(), dim=-1)
    for slot, row in enumerate(expected_slots):
        assert torch.allclose(bank.vectors[:, slot], unit[row])


def test_enqueue_larger_than_shard_keeps_newest_rows():
    bank = NeighborBank(M, D, size=4).double()
    bank.enqueue(_rows(1, seed=1))  # ptr = 1
    x = _rows(6, seed=2)
    bank.enqueue(x)  # newest 4 rows x[2:6] fill the slots a FIFO would put them in
    unit = F.normalize(x, dim=-1)
    # A FIFO starting at slot 1 writing 6 rows puts x[j] at slot (1 + j) % 4.
    for j in range(2, 6):
        assert torch.allclose(bank.vectors[:, (1 + j) % 4], unit[j])
    assert int(bank.ptr) == (1 + 6) % 4 and bank.num_filled == 4


def _split_banks(entries: torch.Tensor, world: int, size: int) -> list[NeighborBank]:
    per = size // world
    banks = []
    for r in range(world):
        bank = NeighborBank(M, D, size, world_size=world, rank=r).double()
        bank.enqueue(entries[r * per : (r + 1) * per])
        banks.append(bank)
    return banks


@pytest.mark.parametrize("k", [1, 3, 7])
def test_merged_shard_topk_equals_topk_over_concatenated_shards(k):
    size, world = 12, 3
    entries = _rows(size, seed=3)
    anchors = F.normalize(_rows(5, seed=4), dim=-1)
    shards = _split_banks(entries, world, size)
    merged = merge_shard_results([b.shard_search(anchors, k, tau=0.5) for b in shards], k)
    single = NeighborBank(M, D, size).double()
    single.enqueue(entries)
    ref = single.search(anchors, k, tau=0.5)
    # Brute force over the concatenation.
    sims = torch.einsum("amd,smd->ams", anchors, F.normalize(entries, dim=-1))
    top = sims.topk(k, dim=-1)
    for res in (merged, ref):
        assert torch.allclose(res.values, top.values)
        assert torch.equal(res.ids, top.indices)
        assert torch.allclose(res.vectors, F.normalize(entries, dim=-1).transpose(0, 1)[torch.arange(M)[None, :, None], top.indices])
        assert torch.allclose(res.lse, torch.logsumexp(sims / 0.5, -1))
        assert res.num_filled == size
    assert torch.allclose(merged.lse_grad, ref.lse_grad)


def test_partially_filled_shards_pad_and_merge():
    """Fewer filled slots than k: missing entries are -inf / -1 and never win the merge."""
    a = NeighborBank(M, D, 8, world_size=2, rank=0).double()
    b = NeighborBank(M, D, 8, world_size=2, rank=1).double()
    a.enqueue(_rows(2, seed=5))  # shard 1 stays empty
    anchors = F.normalize(_rows(3, seed=6), dim=-1)
    merged = merge_shard_results([a.shard_search(anchors, 3, tau=0.5), b.shard_search(anchors, 3, tau=0.5)], 3)
    assert merged.num_filled == 2 and merged.num_valid == 2
    assert torch.all(merged.ids[..., :2] >= 0) and torch.all(merged.ids[..., 2] == -1)
    assert torch.all(torch.isinf(merged.values[..., 2]))
    assert torch.all(torch.isfinite(merged.lse))


def test_state_dict_round_trip_resumes_bank():
    bank = NeighborBank(M, D, size=6)
    bank.enqueue(_rows(4, seed=7).float())
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    restored = NeighborBank(M, D, size=6)
    restored.load_state_dict(torch.load(buf))
    assert torch.equal(restored.vectors, bank.vectors)
    assert restored.num_filled == 4 and int(restored.ptr) == 4
    # Resumed bank continues the FIFO where the saved one stopped.
    nxt = _rows(3, seed=8).float()
    bank.enqueue(nxt)
    restored.enqueue(nxt)
    assert torch.equal(restored.vectors, bank.vectors) and int(restored.ptr) == 1


def test_bad_bank_parameters_fail_with_a_sentence():
    with pytest.raises(ConfigError, match="multiple of the worker count"):
        NeighborBank(M, D, size=10, world_size=3)
    with pytest.raises(ConfigError, match="rank 2 is not in a world of size 2"):
        NeighborBank(M, D, size=10, world_size=2, rank=2)
    with pytest.raises(ConfigError, match="k >= 1"):
        NeighborBank(M, D, size=4).search(torch.zeros(2, M, D), 0)
    with pytest.raises(ValueError, match=r"expects \(b, 3, 4\)"):
        NeighborBank(M, D, size=4).enqueue(torch.zeros(2, M, D + 1))
