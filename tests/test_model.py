"""Tier 1: the autoencoder and decoder on CPU at tiny sizes (plus exact parameter counts of the presets)."""
import pytest
import torch

from ldm import PRESETS, AsymmetricAutoencoderKL
from ldm.modules.common import ConditionEncoder
from ldm.modules.sd.vae import AsymmetricDecoder

TINY = dict(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AsymmetricAutoencoderKL(**TINY).eval()


def random_mask(shape, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


@pytest.mark.parametrize("preset,decoder_total,decoder_core", [
    ("x1", 60_276_227, 49_490_179),
    ("x1.5", 160_136_835, None),
    ("x2", 371_966_467, None),
])
def test_parameter_counts_match_design(preset, decoder_total, decoder_core):
    with torch.device("meta"):  # counts only: no memory for 370M parameters
        model = AsymmetricAutoencoderKL(**PRESETS[preset])
    assert n_params(model.decoder) == decoder_total
    assert n_params(model.encoder) == 34_163_592
    if decoder_core is not None:  # x1's core is exactly the SD decoder, so it can warm-start from SD
        assert n_params(model.decoder) - n_params(model.decoder.encoder) == decoder_core


def test_branch_off_is_the_plain_sd_decoder():
    with torch.device("meta"):
        plain = AsymmetricDecoder(ch=128, num_res_blocks=2, use_condition=False)
    assert plain.encoder is None and n_params(plain) == 49_490_179


def test_condition_encoder_feature_shapes():
    feats = ConditionEncoder([32, 64, 128, 128, 128])(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 64, 96), (2, 64, 64, 96), (2, 128, 32, 48), (2, 128, 16, 24), (2, 128, 8, 12)]


def test_features_are_pre_relu():
    feats = ConditionEncoder([32, 64, 128, 128, 128])(torch.randn(1, 3, 32, 32))
    assert all((f < 0).any() for f in feats)


@pytest.mark.parametrize("h,w", [(64, 96), (40, 24)])
def test_shapes_non_square(tiny, h, w):
    x = torch.rand(2, 3, h, w) * 2 - 1
    with torch.no_grad():
        post = tiny.encode(x)
        assert post.mean.shape == (2, 4, h // 8, w // 8) and post.sample().shape == post.mean.shape
        out = tiny.decode(post.mean, x, random_mask((2, 1, h, w)))
        assert out.shape == (2, 3, h, w)
        assert tiny.decode(post.mean).shape == (2, 3, h, w)


def test_all_ones_mask_equals_branch_off(tiny):
    z = torch.randn(2, 4, 8, 12)
    image = torch.rand(2, 3, 64, 96) * 2 - 1
    plain = AsymmetricAutoencoderKL(**TINY, use_condition=False).eval()
    missing, unexpected = plain.load_state_dict(tiny.state_dict(), strict=False)
    assert not missing and all(k.startswith("decoder.encoder.") for k in unexpected)
    with torch.no_grad():
        gated = tiny.decode(z, image, torch.ones(2, 1, 64, 96))
        torch.testing.assert_close(gated, tiny.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(gated, plain.decode(z, image, torch.ones(2, 1, 64, 96)), rtol=0, atol=0)
        # and the branch matters once there are known pixels
        assert (gated - tiny.decode(z, image, torch.zeros(2, 1, 64, 96))).abs().max() > 1e-3


def test_branch_sees_only_the_known_region(tiny):
    z = torch.randn(1, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1  # a square hole
    with torch.no_grad():
        base = tiny.decode(z, image, mask)
        in_hole = image.clone()
        in_hole[..., 20:40, 20:40] = -image[..., 20:40, 20:40]
        torch.testing.assert_close(tiny.decode(z, in_hole, mask), base, rtol=0, atol=0)
        in_known = image.clone()
        in_known[..., :8, :8] = -image[..., :8, :8]
        assert (tiny.decode(z, in_known, mask) - base).abs().max() > 1e-4


def test_known_region_features_come_from_the_branch(tiny):
    """Changing the latent changes the known region only through layers after the last injection."""
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:, :] = 1
    dec = tiny.decoder
    captured = []
    hook = dec.norm_out.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    with torch.no_grad():
        for seed in (1, 2):
            tiny.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), image, mask)
    hook.remove()
    a, b = captured  # (1, ch, 64, 64): the input of norm_out, after the last injection
    torch.testing.assert_close(a[..., :32, :], b[..., :32, :], rtol=0, atol=0)  # known rows: branch features
    assert (a[..., 32:, :] - b[..., 32:, :]).abs().max() > 1e-4  # hole rows follow the latent


def test_batch_one_condition_broadcasts(tiny):
    z = torch.randn(3, 4, 8, 8)
    image, mask = torch.rand(1, 3, 64, 64), random_mask((1, 1, 64, 64))
    with torch.no_grad():
        out = tiny.decode(z, image, mask)
        ref = tiny.decode(z, image.expand(3, -1, -1, -1), mask.expand(3, -1, -1, -1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(image=torch.rand(1, 3, 60, 64)), "multiples of 8"),
])
def test_encode_rejects_bad_size(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode(kwargs["image"])


@pytest.mark.parametrize("image,mask,message", [
    (torch.rand(2, 3, 64, 64), torch.ones(2, 1, 32, 64), r"mask must be \(B,1,64,64\)"),
    (torch.rand(2, 3, 64, 64), torch.ones(2, 3, 64, 64), r"mask must be \(B,1,64,64\)"),
    (torch.rand(2, 3, 64, 64), torch.full((2, 1, 64, 64), 255.0), r"mask values must lie in \[0, 1\]"),
    (torch.rand(2, 3, 64, 64), -torch.ones(2, 1, 64, 64), r"mask values must lie in \[0, 1\]"),
    (torch.rand(2, 3, 56, 64), torch.ones(2, 1, 56, 64), r"image must be \(B,3,64,64\)"),
    (torch.rand(3, 3, 64, 64), torch.ones(3, 1, 64, 64), "batch 3 does not match latent batch 2"),
    (torch.rand(2, 3, 64, 64), None, "pass both image and mask"),
    (None, torch.ones(2, 1, 64, 64), "pass both image and mask"),
])
def test_decode_rejects_bad_condition(tiny, image, mask, message):
    with pytest.raises(ValueError, match=message):
        tiny.decode(torch.randn(2, 4, 8, 8), image, mask)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = AsymmetricAutoencoderKL(**TINY)
    b = AsymmetricAutoencoderKL(**TINY, gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    z, image, mask = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32), random_mask((2, 1, 32, 32))
    for m, forwards in ((a, 1), (b, 2)):  # checkpointed: the block runs again in the backward
        calls = []
        m.decoder.up[0].block[0].register_forward_hook(lambda *_: calls.append(1))
        m.decode(z, image, mask).square().mean().backward()
        assert len(calls) == forwards
    for (name, pa), pb in zip(a.decoder.named_parameters(), b.decoder.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("p_hole", [1.0, 0.5])
def test_branch_gradients_only_where_pixels_are_known(p_hole):
    torch.manual_seed(0)
    model = AsymmetricAutoencoderKL(**TINY)
    z, image = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32)
    model.decode(z, image, random_mask((2, 1, 32, 32), p=p_hole)).square().mean().backward()
    branch = {n: p.grad for n, p in model.decoder.encoder.named_parameters()}
    core = [p.grad for n, p in model.decoder.named_parameters() if not n.startswith("encoder.")]
    assert all(g is not None and g.abs().sum() > 0 for g in core)
    if p_hole == 1.0:  # all hole: the blend takes the latent path everywhere, the branch gets exact zeros
        assert all(g is not None and not g.any() for g in branch.values()), branch.keys()
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in branch.values())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_runs_on_a_fused_kernel(memory_format):
    """The mid-block attention is the decode's one global operation: on SDPA's math kernel it holds the (HW)^2
    scores (32 GiB at 2048 px). Restricted to the flash kernel (O(HW) memory) it must still run, and equal
    softmax(q k^T / sqrt(C)) v computed in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from ldm.modules.sd.vae import AttnBlock
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=memory_format)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = block(x)
    block, x = block.double(), x.double()
    with torch.no_grad():
        y = block.norm(x)
        q, k, v = (p(y).flatten(2) for p in (block.q, block.k, block.v))  # (B, C, HW)
        weights = torch.softmax(q.transpose(1, 2) @ k / 64 ** 0.5, dim=-1)  # (B, HW, HW)
        ref = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
