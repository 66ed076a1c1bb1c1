"""Unit tests of ldm/modules/losses.py: tiny shapes, CPU, no network."""

import os

import lpips
import pytest
import torch
import torchvision
from torch import nn

from ldm.modules import losses
from ldm.modules.losses import (
    NLayerDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    reconstruction_losses,
    vanilla_d_loss,
)

VGG_FILE = "vgg16-397923af.pth"


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test instead of hanging offline."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(torch.hub, "urlopen", _refuse)


def _use_torch_home(mp, path):
    """Point torch.hub (hence torchvision and lpips) at path/hub, as $TORCH_HOME does."""
    mp.setenv("TORCH_HOME", str(path))
    mp.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_patch_shapes():
    disc = NLayerDiscriminator()
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 32, 16, 8, 7, 6
    with torch.no_grad():
        assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # 128, 64, 32, 31, 30


def test_discriminator_param_count_and_keys():
    disc = NLayerDiscriminator()
    # 4x4 convs; BatchNorm makes the hidden convs bias-free, BatchNorm has weight + bias
    expected = (
        (3 * 64 * 16 + 64)  # main.0
        + (64 * 128 * 16 + 2 * 128)  # main.2, main.3
        + (128 * 256 * 16 + 2 * 256)  # main.5, main.6
        + (256 * 512 * 16 + 2 * 512)  # main.8 (stride 1), main.9
        + (512 * 1 * 16 + 1)  # main.11
    )
    assert expected == 2_765_633
    assert sum(p.numel() for p in disc.parameters()) == expected
    keys = set(disc.state_dict())
    for key in ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_var", "main.11.bias"]:
        assert key in keys
    assert "main.2.bias" not in keys


def test_discriminator_init_statistics():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    conv = disc.main[8].weight  # 2M weights: the std is tight
    assert abs(conv.std().item() - 0.02) < 1e-3 and abs(conv.mean().item()) < 1e-3
    bn = disc.main[9]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert torch.all(bn.bias == 0)


# ----------------------------------------------------------------------------- GAN losses


def test_hinge_and_vanilla_values():
    real = torch.tensor([[2.0, 0.5]])
    fake = torch.tensor([[-2.0, 0.0]])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.375)
    sp = nn.functional.softplus
    want = 0.5 * (sp(torch.tensor([-2.0, -0.5])).mean() + sp(torch.tensor([-2.0, 0.0])).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want.item())
    assert generator_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(real, fake, "wgan")


# ----------------------------------------------------------------------------- adaptive weight


def _linear_losses(a, b, dtype=torch.float32):
    """nll = sum(W * a), g = sum(W * b): their grads w.r.t. W are exactly a and b."""
    last = nn.Parameter(torch.ones(len(a), dtype=dtype))
    nll = (last * torch.tensor(a, dtype=dtype)).sum()
    g = (last * torch.tensor(b, dtype=dtype)).sum()
    return nll, g, last


def test_adaptive_weight_hand_computed_and_keeps_graph():
    nll, g, last = _linear_losses([3.0, 4.0], [0.6, 0.8])  # norms 5 and 1
    w = adaptive_weight(nll, g, last)
    assert w.item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    assert not w.requires_grad
    (nll + w * g).backward()  # graph retained for the real backward
    assert torch.allclose(last.grad, torch.tensor([3.0, 4.0]) + w * torch.tensor([0.6, 0.8]))


def test_adaptive_weight_clamped():
    nll, g, last = _linear_losses([3.0, 4.0], [0.0, 0.0])  # 5 / 1e-4 = 5e4 -> 1e4
    assert adaptive_weight(nll, g, last).item() == pytest.approx(1e4)
    nll, g, last = _linear_losses([3.0, 4.0], [0.0, 0.0])
    assert adaptive_weight(nll, g, last, max_weight=10.0).item() == pytest.approx(10.0)


def test_adaptive_weight_low_precision_finite():
    n = 65536  # fp16 norm of 300 * ones(n) is 76800 > 65504 = inf; in fp32 the ratio is 300
    nll, g, last = _linear_losses([300.0] * n, [1.0] * n, dtype=torch.float16)
    w = adaptive_weight(nll, g, last)
    assert w.dtype == torch.float32 and w.item() == pytest.approx(300.0, rel=1e-3)
    nll, g, last = _linear_losses([3.0, 4.0], [0.6, 0.8], dtype=torch.bfloat16)
    assert adaptive_weight(nll, g, last).item() == pytest.approx(5.0, rel=1e-2)


def test_adaptive_weight_nonfinite_grad_gives_zero():
    nll, g, last = _linear_losses([3.0, 4.0], [float("inf"), 1.0])
    w = adaptive_weight(nll, g, last)
    assert w.item() == 0.0 and torch.isfinite(w)


# ----------------------------------------------------------------------------- reconstruction


class _CountingPerceptual(nn.Module):
    """Stand-in LPIPS: a constant per sample, counting its calls."""

    def __init__(self, value=0.5):
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x, y):
        self.calls += 1
        return torch.full((x.shape[0],), self.value)


def test_hole_and_known_weighting_by_hand():
    target = torch.zeros(1, 1, 2, 2)
    recon = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # holes at |d| = 1 and 4
    plain = reconstruction_losses(recon, target, mask, None, perceptual_weight=0.0)
    assert plain["l1"].item() == pytest.approx(10.0 / 4)  # default 1/1 = plain mean
    weighted = reconstruction_losses(
        recon, target, mask, None, perceptual_weight=0.0, hole_weight=3.0, known_weight=0.5
    )
    assert weighted["l1"].item() == pytest.approx((3 * (1 + 4) + 0.5 * (2 + 3)) / 4)
    both = reconstruction_losses(recon, target, mask, None, l2_weight=2.0, perceptual_weight=0.0)
    assert both["l2"].item() == pytest.approx(2.0 * 30.0 / 4)
    assert both["nll"].item() == pytest.approx(2.5 + 15.0)


def test_perceptual_term_and_zero_weight_skips_it():
    recon, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fake_lpips = _CountingPerceptual(0.5)
    terms = reconstruction_losses(recon, target, None, fake_lpips, perceptual_weight=2.0)
    assert fake_lpips.calls == 1 and terms["lpips"].item() == pytest.approx(1.0)
    assert terms["nll"].item() == pytest.approx(terms["l1"].item() + 1.0)
    terms = reconstruction_losses(recon, target, None, fake_lpips, perceptual_weight=0.0)
    assert fake_lpips.calls == 1 and "lpips" not in terms


def test_terms_are_fp32_pixel_means():
    recon = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    target = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    terms = reconstruction_losses(recon, target, None, _CountingPerceptual(0.5))
    assert all(t.dtype == torch.float32 for t in terms.values())
    want_l1 = (recon.float() - target.float()).abs().sum() / 96  # ldm's sum / batch is this x C*H*W (48)
    assert terms["l1"].item() == pytest.approx(want_l1.item(), rel=1e-5)


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def vgg_home(tmp_path_factory):
    """A TORCH_HOME holding a random-init VGG16 saved where torchvision caches the real one."""
    home = tmp_path_factory.mktemp("torch_home")
    os.makedirs(home / "hub" / "checkpoints")
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state, home / "hub" / "checkpoints" / VGG_FILE)
    return home, state["features.0.weight"]


@pytest.fixture(scope="module")
def perceptual(vgg_home):
    home, _ = vgg_home
    with pytest.MonkeyPatch.context() as mp:
        _use_torch_home(mp, home)
        mp.setattr(torch.hub, "download_url_to_file", _refuse)  # loads the file, never fetches
        return PerceptualLoss()


def test_lpips_loads_cached_vgg_and_shipped_heads(perceptual, vgg_home):
    _, first_conv = vgg_home
    assert torch.equal(perceptual.net.slice1[0].weight, first_conv)
    heads = torch.load(losses.lpips_heads_path("vgg"), map_location="cpu")
    assert torch.equal(perceptual.lin0.model[1].weight, heads["lin0.model.1.weight"])


def test_lpips_values_grad_and_frozen(perceptual):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(perceptual(x, x), torch.zeros(2), atol=1e-6)
    x.requires_grad_(True)
    d = perceptual(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    assert perceptual(x, y, reduction="mean").item() == pytest.approx(d.mean().item())
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perceptual.parameters())
    perceptual.train()  # e.g. Lightning's model.train(): dropout must stay off
    assert not perceptual.training and torch.equal(perceptual(x, y), perceptual(x, y))


def test_lpips_ignores_autocast(perceptual):
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    ref = perceptual(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = perceptual(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, perceptual(x.bfloat16().float(), y.bfloat16().float()))
    assert out.item() == pytest.approx(ref.item(), rel=0.05)


def test_lpips_missing_vgg_names_file_and_dir(tmp_path, monkeypatch):
    _use_torch_home(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss()
    msg = str(err.value)
    assert VGG_FILE in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "download.pytorch.org/models/vgg16-397923af.pth" in msg and "pretrained: false" in msg


@pytest.mark.filterwarnings("ignore::UserWarning")  # the untrained trunk's warning, torchvision's `pretrained`
@pytest.mark.parametrize("pretrained", [False, True])
def test_lpips_is_built_as_on_torchvisions_whole_vgg16(pretrained, vgg_home, monkeypatch):
    """PerceptualLoss builds VGG16 without its classifier: the weights of lpips.LPIPS built on torchvision's whole
    VGG16, and the CPU generator left where that build leaves it (the discriminator, built next, draws from it)."""
    _use_torch_home(monkeypatch, vgg_home[0])
    built = []
    for build in (lambda: lpips.LPIPS(net="vgg", pnet_rand=not pretrained, model_path=losses.lpips_heads_path("vgg"),
                                      verbose=False),
                  lambda: PerceptualLoss(pretrained=pretrained)):
        torch.manual_seed(3)
        built.append((build().state_dict(), torch.get_rng_state()))
    (theirs, their_rng), (ours, our_rng) = built
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(our_rng, their_rng)


def test_lpips_untrained_mode_is_offline_and_loud(tmp_path, monkeypatch):
    _use_torch_home(monkeypatch, tmp_path)  # empty cache: any load attempt would fail
    with pytest.warns(UserWarning, match="NOT perceptual"):
        loss = PerceptualLoss(pretrained=False)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, -x).item() > 0
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="vgg"):
        PerceptualLoss(net="resnet")
