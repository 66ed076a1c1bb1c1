"""Decoder training losses: PatchGAN discriminator, GAN losses, adaptive weight, LPIPS, L1/L2.

Plain functions of tensors and small modules; nothing here knows the trainer, the global step or the
batch. The official recipe (ldm LPIPSWithDiscriminator, DESIGN.md "Training recipe") composes as:

    nll = reconstruction_losses(recon, x, mask, perceptual)["nll"] * C*H*W   # L1 + 1.0 * LPIPS, ldm's sum scale
    g = generator_loss(disc(recon))
    w = adaptive_weight(nll, g, decoder.conv_out.weight) * 0.8 * (step >= 50001)
    total = nll + w * g
    d_loss = hinge_d_loss(disc(x.detach()), disc(recon.detach()))   # own optimiser step

AsymmetricDecoderTraining.training_step computes the same with one forward, w from
adaptive_weight_from_output_grads.
"""

import os
import warnings
from unittest import mock

import lpips
import torch
import torch.nn.functional as F
import torchvision
from lpips import pretrained_networks
from torch import nn

# ImageNet weights of the LPIPS trunks, as torchvision names them; lpips loads them via torch.hub
_TRUNK_WEIGHTS = {
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


# ----------------------------------------------------------------------------- discriminator


def _init_discriminator_weights(module):
    """taming's weights_init: conv weights N(0, 0.02), norm weights N(1, 0.02) and bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)  # conv biases keep PyTorch's default, as taming
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix/taming: (B, C, H, W) -> (B, 1, h, w) patch logits."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),  # BatchNorm shifts
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # 1-channel patch logits
        # `main.<i>` indices as taming's (main.0, main.2, main.3, ...)
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, x):
        # 256 px, 3 layers: 128, 64, 32, 31, 30 -> (B, 1, 30, 30); each logit sees a 70 px patch
        return self.main(x)


# ----------------------------------------------------------------------------- GAN losses


def hinge_d_loss(logits_real, logits_fake):
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real, logits_fake):
    """Non-saturating BCE discriminator loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
    loss_real = F.softplus(-logits_real.float()).mean()
    loss_fake = F.softplus(logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def discriminator_loss(logits_real, logits_fake, kind="hinge"):
    """Discriminator loss by name: 'hinge' (official recipe) or 'vanilla'."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; choose one of {sorted(D_LOSSES)}")
    return D_LOSSES[kind](logits_real, logits_fake)


def generator_loss(logits_fake):
    """Generator adversarial loss -mean(logits_fake), used by taming/ldm with either D loss."""
    return -logits_fake.float().mean()


def _wide(t):
    """`t` in float32 at least: bf16/fp16 widened (their sums of squares overflow), float64 (tests) kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _balance(nll_norm, g_norm, max_weight, eps):
    """nll_norm / (g_norm + eps) in [0, max_weight]; 0 when a norm is not finite (fp16 overflow), without a host
    sync, so a bad step never injects NaN."""
    weight = (nll_norm / (g_norm + eps)).clamp(0.0, max_weight)
    finite = torch.isfinite(nll_norm) & torch.isfinite(g_norm)
    return torch.where(finite, weight, torch.zeros_like(weight))


def adaptive_weight(nll_loss, g_loss, last_layer, max_weight=1e4, eps=1e-4):
    """Balance GAN vs reconstruction: ||grad nll|| / (||grad g|| + eps) at last_layer, detached (taming's way).

    last_layer is the decoder's `conv_out.weight`. The caller multiplies by disc_weight (0.8) and by 0 before
    disc_start (50001), as DESIGN.md.
    """
    # retain_graph: the caller still backpropagates nll + w * g through the same graph
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    # norms in fp32: a bf16/fp16 grad's sum of squares can overflow or lose the ratio's precision
    return _balance(torch.linalg.vector_norm(_wide(nll_grad.detach())),
                    torch.linalg.vector_norm(_wide(g_grad.detach())), max_weight, eps)


def adaptive_weight_from_output_grads(conv_out, features, grad_nll, grad_g, max_weight=1e4, eps=1e-4):
    """adaptive_weight at W = conv_out.weight, from the losses' gradients w.r.t. conv_out's output.

    conv_out is linear in W, so dL/dW follows from dL/d(output) and its input `features` alone: no second
    pass through LPIPS or the discriminator (taming backpropagates each loss to W separately).
    """
    out = conv_out.out_channels
    grads = _wide(torch.cat([grad_nll, grad_g], dim=1))  # both in one pass over the features: rows [:out], [out:]
    shape = (2 * out, *conv_out.weight.shape[1:])
    dw = torch.nn.grad.conv2d_weight(_wide(features.detach()).to(grads.dtype), shape, grads, stride=conv_out.stride,
                                     padding=conv_out.padding)
    return _balance(dw[:out].norm(), dw[out:].norm(), max_weight, eps)


# ----------------------------------------------------------------------------- LPIPS


def trunk_weights_path(net="vgg"):
    """Where torch.hub (hence lpips) looks for the ImageNet trunk: $TORCH_HOME/hub/checkpoints/<file>."""
    url = _TRUNK_WEIGHTS[net].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def lpips_heads_path(net="vgg"):
    """The calibrated v0.1 linear heads that ship inside the lpips package."""
    return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")


def _require_trunk_weights(net):
    """Raise before lpips would try a download, saying which file goes where."""
    path = trunk_weights_path(net)
    if os.path.isfile(path):
        return
    weights = _TRUNK_WEIGHTS[net]
    raise FileNotFoundError(
        f"LPIPS({net}) needs the ImageNet weights file {os.path.basename(path)} in "
        f"{os.path.dirname(path)} (set by $TORCH_HOME, default ~/.cache/torch). It is torchvision's "
        f"{type(weights).__name__}.{weights.name}, from {weights.url}; copy it there on a machine "
        f"without internet. For offline smoke tests only, `pretrained: false` builds an untrained trunk."
    )


def _skip_draws(count):
    """Advance the default CPU generator as `count` float draws (uniform_, or normal_ on a multiple of 16) would."""
    if count % 2:
        torch.empty(1).uniform_()
    pairs, chunk = count // 2, torch.empty(1 << 20, dtype=torch.int64)
    while pairs:
        n = min(pairs, chunk.numel())
        chunk[:n].random_(-2**63, None)  # full-range int64: two 32-bit draws each, nothing else
        pairs -= n


def _vgg16_without_classifier(pretrained=False):
    """torchvision's vgg16 for lpips, which keeps only `.features`: those weights, and the CPU generator's state after
    them, are torchvision's, but the 120M-parameter classifier is shapes on the meta device and its random draws are
    skipped, not made (making them into 495 MB took 1.3 s of the 2 s build). The random stream stays that of
    torchvision.models.vgg16, so what is built after LPIPS (the discriminator) is initialised as before."""
    tv = torchvision.models.vgg
    features = tv.make_layers(tv.cfgs["D"])  # Conv2d's default init: the draws torchvision's build makes first
    with torch.device("meta"):
        classifier = [m for m in tv.VGG(nn.Sequential(), init_weights=False).classifier if isinstance(m, nn.Linear)]
    _skip_draws(sum(p.numel() for m in classifier for p in m.parameters()))  # nn.Linear's default init
    with torch.device("meta"):  # the classifier again on meta; VGG's own init of the features unless pretrained
        vgg = tv.VGG(features, init_weights=not pretrained)
    if pretrained:  # torchvision's own load of the file _require_trunk_weights checked; features.* only
        state = _TRUNK_WEIGHTS["vgg"].get_state_dict(progress=False, check_hash=True)
        vgg.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                      if k.startswith("features.")})
    else:
        _skip_draws(sum(m.weight.numel() for m in classifier))  # VGG's normal_ init of the Linear weights
    return vgg


class _FeaturesOnlyModels:
    """torchvision.models as lpips.pretrained_networks sees it while PerceptualLoss builds: vgg16 without its
    classifier, every other model torchvision's own."""

    vgg16 = staticmethod(_vgg16_without_classifier)

    def __getattr__(self, name):
        return getattr(torchvision.models, name)


class PerceptualLoss(lpips.LPIPS):
    """Frozen LPIPS (v0.1) on [-1, 1] images, always in fp32: (B, 3, H, W) x2 -> (B,) or mean.

    Subclasses lpips.LPIPS: the trunk and the calibrated heads come from their own files (never from a run's
    checkpoint; see keep_out_of_checkpoints).
    """

    def __init__(self, net="vgg", pretrained=True):
        if net not in _TRUNK_WEIGHTS:
            raise ValueError(f"unknown LPIPS trunk {net!r}; choose one of {sorted(_TRUNK_WEIGHTS)}")
        if pretrained:
            _require_trunk_weights(net)
        else:
            warnings.warn(
                f"PerceptualLoss(pretrained=False): the {net} trunk is RANDOMLY initialised, so this "
                "loss is NOT perceptual; use it only for offline smoke tests.",
                stacklevel=2,
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
            # lpips flags: `pretrained` = the calibrated linear heads (shipped inside the package,
            # always loaded: random heads could even make the distance negative); `pnet_rand` = a
            # random trunk, which never touches the network. use_dropout stays True: the shipped
            # keys are `lin*.model.1.weight` and lpips loads them with strict=False, so without the
            # dropout slot the heads would silently stay random. model_path is explicit because
            # lpips finds its default via inspect.getfile(self.__init__), i.e. this file.
            # lpips builds its trunk through pretrained_networks.tv (torchvision.models) and keeps `.features`
            with mock.patch.object(pretrained_networks, "tv", _FeaturesOnlyModels()):
                super().__init__(
                    pretrained=True,
                    net=net,
                    version="0.1",
                    pnet_rand=not pretrained,
                    model_path=lpips_heads_path(net),
                    verbose=False,
                )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Stay in eval whatever the parent does: the linear heads sit behind Dropout layers."""
        return super().train(False)

    def forward(self, x, y, reduction="none"):
        """LPIPS distance per sample (B,) for reduction 'none', or its batch mean for 'mean'."""
        # autocast off and fp32 inputs: mixed precision must not change the loss value
        with torch.autocast(device_type=x.device.type, enabled=False):
            dist = super().forward(x.float(), y.float()).flatten()  # (B, 1, 1, 1) -> (B,)
        if reduction == "mean":
            return dist.mean()
        if reduction != "none":
            raise ValueError(f"unknown reduction {reduction!r}; use 'none' or 'mean'")
        return dist


# ----------------------------------------------------------------------------- reconstruction


def reconstruction_losses(
    recon,
    target,
    mask=None,
    perceptual=None,
    l1_weight=1.0,
    l2_weight=0.0,
    perceptual_weight=1.0,
    hole_weight=1.0,
    known_weight=1.0,
):
    """Decoder reconstruction terms in fp32: weighted scalars l1, l2, lpips and their sum 'nll'.

    recon, target: (B, C, H, W) in [-1, 1]; mask: (B, 1, H, W), 1 = hole, 0 = known (None = no
    mask). The pixel losses are weighted hole_weight in the hole and known_weight outside (1/1, the
    paper: a plain whole-image loss); LPIPS is on the whole image and is not computed at weight 0.
    Means over pixels: ldm's LPIPSWithDiscriminator sums over C, H, W (LPIPS broadcast over every
    pixel), i.e. every term times C*H*W; the training step applies that scale (Adam's eps sees it).
    """
    recon, target = recon.float(), target.float()
    diff = recon - target  # (B, C, H, W)
    pixel_weight = torch.ones_like(diff[:, :1])  # (B, 1, H, W), broadcast over channels
    if mask is not None:
        mask = mask.float()
        pixel_weight = hole_weight * mask + known_weight * (1.0 - mask)
    terms = {}
    if l1_weight:
        terms["l1"] = l1_weight * (pixel_weight * diff.abs()).mean()
    if l2_weight:
        terms["l2"] = l2_weight * (pixel_weight * diff.square()).mean()
    if perceptual_weight:
        if perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual module (e.g. PerceptualLoss)")
        terms["lpips"] = perceptual_weight * perceptual(recon, target).mean()
    terms["nll"] = sum(terms.values(), torch.zeros((), device=diff.device))
    return terms
