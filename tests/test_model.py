"""SSCQModel: shapes per bit width, quantizer semantics, the three backbones."""

from __future__ import annotations

import pytest
import torch

from sscq_dist.config import ModelConfig
from sscq_dist.errors import ConfigError
from sscq_dist.model import (
    ProductQuantizer,
    SSCQOutput,
    build_backbone,
    build_model,
    hard_codes,
)


@pytest.mark.parametrize("bits, m", [(16, 4), (32, 8), (64, 16)])
def test_output_shapes_per_bit_width(bits, m):
    cfg = ModelConfig(bits=bits)
    model = build_model(cfg, channels=1)
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert isinstance(out, SSCQOutput)
    assert cfg.num_codebooks == m
    assert out.f.shape == (5, m * 16) and out.z.shape == (5, m * 16)
    assert out.soft.shape == (5, m, 16) and out.codes.shape == (5, m)
    assert out.codes.dtype == torch.int64
    assert model.quantizer.codebooks.shape == (m, 16, 16)
    assert torch.allclose(out.soft.sum(-1), torch.ones(5, m), atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed(x), model(x).f)


def test_hard_codes_are_squared_l2_argmin():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 4 * 3, generator=g)
    cb = torch.randn(4, 6, 3, generator=g)
    codes = hard_codes(f, cb)
    for n in range(50):
        for m in range(4):
            d2 = [float(((f[n, m * 3 : (m + 1) * 3] - cb[m, k]) ** 2).sum()) for k in range(6)]
            assert codes[n, m].item() == min(range(6), key=d2.__getitem__)


def test_soft_quantization_formula_and_codes():
    pq = ProductQuantizer(2, 4, 3, tau_q=0.2)
    f = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    z, soft, codes = pq(f)
    cb = pq.codebooks.detach()
    for m in range(2):
        d2 = ((f[:, None, m * 3 : (m + 1) * 3] - cb[m][None]) ** 2).sum(-1)  # (7, 4)
        w = torch.softmax(-d2 / 0.2, dim=-1)
        assert torch.allclose(soft[:, m], w, atol=1e-6)
        assert torch.allclose(z[:, m * 3 : (m + 1) * 3], w @ cb[m], atol=1e-6)
    assert torch.equal(codes, hard_codes(f, cb))
    # Lower temperature makes the soft assignment approach the hard code.
    pq.tau_q = 1e-4
    _, soft_cold, _ = pq(f)
    assert torch.equal(soft_cold.argmax(-1), codes)


def test_codebooks_xavier_init_range():
    pq = ProductQuantizer(8, 16, 16, tau_q=0.2)
    bound = (6.0 / (16 + 8 * 16)) ** 0.5
    assert pq.codebooks.abs().max().item() <= bound
    assert pq.codebooks.std().item() > bound / 3  # not collapsed to zero
    assert isinstance(pq.codebooks, torch.nn.Parameter)


@pytest.mark.parametrize(
    "name, channels, size, dim",
    [("small_cnn", 1, 28, 128), ("small_cnn", 3, 12, 128), ("vgg8", 1, 28, 128), ("vgg8", 1, 14, 128),
     ("resnet18_cifar", 3, 32, 512),
     ("resnet18_cifar", 1, 16, 512), ("resnet50", 1, 32, 2048)],
)
def test_backbones_forward(name, channels, size, dim):
    net, out_dim = build_backbone(name, channels)
    assert out_dim == dim
    net.eval()
    with torch.no_grad():
        y = net(torch.randn(2, channels, size, size))
    assert y.shape == (2, dim)
    assert torch.isfinite(y).all()


def test_small_cnn_width_scales_every_block():
    base, d1 = build_backbone("small_cnn", 1)
    wide, d2 = build_backbone("small_cnn", 1, width=2.0)
    assert (d1, d2) == (128, 256)
    convs = lambda n: [m.out_channels for m in n.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert convs(wide) == [2 * c for c in convs(base)]
    n_params = lambda n: sum(p.numel() for p in n.parameters())  # noqa: E731
    assert 3.5 * n_params(base) < n_params(wide) < 4.5 * n_params(base)  # conv weights grow with width^2
    with pytest.raises(Exception, match="width must be > 0"):
        build_backbone("small_cnn", 1, width=0)


def test_vgg8_pools_between_stages():
    net, _ = build_backbone("vgg8", 1, width=0.5)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 32, 32, 64, 64]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 2  # 28 -> 14 -> 7


def test_linear_head_and_normalised_embedding():
    """head_layers=1 is one Linear; normalize_embedding gives |f| = sqrt(M) and codes from that f."""
    cfg = ModelConfig(bits=32, head_layers=1, normalize_embedding=True, tau_q=0.1)
    model = build_model(cfg, channels=1).eval()
    assert [type(m) for m in model.head] == [torch.nn.Linear]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        h, f = model.encode(x)
        out = model(x)
    assert h.shape == (4, 128) and f.shape == (4, cfg.embedding_dim)
    assert torch.allclose(f.norm(dim=1), torch.full((4,), cfg.num_codebooks ** 0.5), atol=1e-5)
    assert torch.equal(out.codes, hard_codes(f, model.quantizer.codebooks))
    plain = build_model(ModelConfig(bits=32), channels=1)
    assert len(plain.head) == 3 and plain.embed_scale is None  # defaults unchanged


def test_quantizer_runs_fp32_under_autocast():
    model = build_model(ModelConfig(bits=32), channels=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 1, 28, 28))
    assert out.f.dtype == out.z.dtype == out.soft.dtype == torch.float32


def test_model_with_resnet_backbone_and_bad_input():
    model = build_model(ModelConfig(backbone="resnet18_cifar", bits=16), channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out.f.shape == (2, 64)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16))


def test_bad_hyperparameters_fail_in_init():
    with pytest.raises(ConfigError, match="tau_q must be > 0"):
        build_model(ModelConfig(tau_q=0.0), channels=1)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_model(ModelConfig(backbone="vgg"), channels=1)
