"""Loss components: reconstruction/NLL, adaptive weight, discriminator, LPIPS (weights handling), the loss module."""
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from radiodiff_vae.adaptive import adopt_weight, calculate_adaptive_weight
from radiodiff_vae.config import tiny_config
from radiodiff_vae.core import CheckpointError, ConfigError, RadioDiffError
from radiodiff_vae.discriminator import (ActNorm, NLayerDiscriminator, get_disc_loss, hinge_d_loss, vanilla_d_loss,
                                         weights_init)
from radiodiff_vae.losses import LPIPSWithDiscriminator, load_loss_state_dict
from radiodiff_vae.model import AutoencoderKL
from radiodiff_vae.nll import (LearnableLogVar, gaussian_nll, logvar_parameters, nll_loss, optimal_logvar,
                               reconstruction_loss)
from radiodiff_vae.perceptual import (LIN_WEIGHTS_PATH, LPIPS1ch, LPIPSWeightsMissing, VGG_WEIGHTS_NAME,
                                      vgg_weights_path)

KEYS_JSON = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "state_dict_keys.json"


def upstream_keys(prefix):
    if not KEYS_JSON.exists():
        pytest.skip(f"{KEYS_JSON} not found (expected ../shared beside the repository)")
    return {k[len(prefix):]: v for k, v in json.loads(KEYS_JSON.read_text()).items() if k.startswith(prefix)}


@pytest.fixture
def no_download(monkeypatch):
    "Any attempt to download from the torch hub fails the test."
    def refuse(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------------------------------------- reconstruction / NLL

def test_reconstruction_loss_values_and_perceptual_broadcast():
    x = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]]]).repeat(2, 1, 1, 1)
    xh = torch.tensor([[[[0.0, -1.0], [1.0, 0.5]]]]).repeat(2, 1, 1, 1)
    rec = reconstruction_loss(x, xh)
    torch.testing.assert_close(rec[0, 0], torch.tensor([[0.75, 0.0], [2.0, 0.75]]))
    per_image = lambda a, b: torch.tensor([0.0, 4.0]).view(2, 1, 1, 1)
    rec_p = reconstruction_loss(x, xh, per_image, perceptual_weight=0.25)
    torch.testing.assert_close(rec_p - rec, torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand_as(rec))
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(x, xh[:, :, :1])


def test_nll_sum_over_pixels_mean_over_batch_and_weights():
    rec = torch.rand(3, 1, 4, 5)
    nll, weighted = nll_loss(rec, torch.tensor(0.4))
    per_pixel = rec / math.exp(0.4) + 0.4
    assert nll.item() == pytest.approx(per_pixel.sum().item() / 3, rel=1e-6) and weighted.item() == nll.item()
    w = torch.zeros_like(rec); w[1] = 3.0
    nll2, weighted2 = nll_loss(rec, torch.tensor(0.4), w)
    assert nll2.item() == nll.item()  # the log keeps the unweighted value
    assert weighted2.item() == pytest.approx(3 * per_pixel[1].sum().item() / 3, rel=1e-6)


@pytest.mark.parametrize("r", [1e-4, 0.03, 0.5, 2.0])
def test_nll_minimum_at_log_rec(r):
    s = torch.tensor(math.log(r), dtype=torch.float64, requires_grad=True)
    gaussian_nll(torch.tensor(r, dtype=torch.float64), s).backward()
    assert abs(s.grad.item()) < 1e-12
    for ds in (-1e-3, 1e-3):
        assert gaussian_nll(torch.tensor(r), torch.tensor(math.log(r) + ds)) > gaussian_nll(torch.tensor(r), torch.tensor(math.log(r)))


def test_learnt_logvar_reaches_log_mean_error_and_switch():
    rec = torch.rand(2, 1, 8, 8) * 0.2
    lv = LearnableLogVar(0.0)
    opt = torch.optim.Adam(lv.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad(); lv(rec)[0].backward(); opt.step()
    assert lv.logvar.item() == pytest.approx(optimal_logvar(rec).item(), abs=1e-3)
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=8)
    assert logvar_parameters(loss, False) == [] and logvar_parameters(loss, True)[0] is loss.logvar
    with pytest.raises(TypeError):
        logvar_parameters(loss, "false")


# ---------------------------------------------------------------------------------------------- adaptive weight

class _TinyDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.conv_out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, z):
        return self.conv_out(torch.tanh(self.body(z)))


def test_adaptive_weight_ratio_clamp_and_graph():
    torch.manual_seed(0)
    dec, critic = _TinyDec(), nn.Conv2d(1, 1, 3, padding=1)
    z, x = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    xh = dec(z)
    nll = ((x - xh).abs() + (x - xh) ** 2).sum() / 2
    g = -critic(xh).mean()
    w, clamped = calculate_adaptive_weight(nll, g, dec.conv_out.weight, disc_weight=0.5)
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx(0.5 * (gn / (gg + 1e-4)).item(), rel=1e-5)
    assert not clamped and not w.requires_grad and dec.conv_out.weight.grad is None
    (nll + w * g).backward()  # the graph was retained
    xh = dec(z)
    w, clamped = calculate_adaptive_weight(((x - xh) ** 2).sum(), -critic(xh).mean() * 1e-9, dec.conv_out.weight, 0.5)
    assert clamped and w.item() == 0.5e4
    w, clamped = calculate_adaptive_weight(((x - dec(z)) ** 2).sum(), -critic(dec(z)).mean(), dec.conv_out.weight, 1.0, max_weight=1e-3)
    assert clamped and w.item() == pytest.approx(1e-3)


def test_adopt_weight_gate():
    assert [adopt_weight(1.0, s, threshold=50001) for s in (0, 50000, 50001, 10**6)] == [0.0, 0.0, 1.0, 1.0]
    assert adopt_weight(2.0, 5, threshold=10, value=0.5) == 0.5


# ---------------------------------------------------------------------------------------------- discriminator

def test_discriminator_names_and_shapes_equal_upstream():
    disc = NLayerDiscriminator(input_nc=1, ndf=64, n_layers=3)
    ours = {k: list(v.shape) for k, v in disc.state_dict().items()}
    assert ours == upstream_keys("loss.discriminator.")


@pytest.mark.parametrize("side,grid", [(256, 30), (64, 6), (32, 2)])
def test_discriminator_patch_grid(side, grid):
    disc = NLayerDiscriminator(input_nc=1, ndf=4).apply(weights_init)
    assert disc(torch.zeros(2, 1, side, side)).shape == (2, 1, grid, grid)


def test_weights_init_statistics():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(input_nc=1, ndf=64).apply(weights_init)
    conv = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    bn_w = torch.cat([m.weight for m in disc.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in disc.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn_w.mean().item() == pytest.approx(1.0, abs=3e-3) and bn_w.std().item() == pytest.approx(0.02, rel=0.15)
    assert bn_b.abs().sum().item() == 0.0


def test_actnorm_variant():
    disc = NLayerDiscriminator(input_nc=1, ndf=4, use_actnorm=True).apply(weights_init)
    assert isinstance(disc.main[3], ActNorm) and disc.main[2].bias is not None
    an = ActNorm(3)
    y = an(torch.randn(4, 3, 8, 8) * 3 + 1)
    torch.testing.assert_close(y.mean((0, 2, 3)).detach(), torch.zeros(3), atol=1e-5, rtol=0)
    assert an.initialized.item() == 1


def test_disc_losses():
    r, f = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    assert hinge_d_loss(r, f).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    bce = 0.5 * (nn.functional.binary_cross_entropy_with_logits(r, torch.ones(3))
                 + nn.functional.binary_cross_entropy_with_logits(f, torch.zeros(3)))
    assert vanilla_d_loss(r, f).item() == pytest.approx(bce.item(), rel=1e-6)
    assert get_disc_loss("hinge") is hinge_d_loss
    with pytest.raises(ConfigError, match="'foo' is unknown; valid: hinge, vanilla"):
        get_disc_loss("foo")
    with pytest.raises(ConfigError, match="valid: hinge, vanilla"):
        LPIPSWithDiscriminator(disc_start=0, disc_loss="foo", perceptual_weight=0.0)


# ---------------------------------------------------------------------------------------------- LPIPS

def test_lpips_missing_weights_fails_fast_with_instructions(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / VGG_WEIGHTS_NAME
    assert vgg_weights_path() == expected
    t0 = time.perf_counter()
    with pytest.raises(LPIPSWeightsMissing) as info:
        LPIPS1ch()
    assert time.perf_counter() - t0 < 2.0
    msg = str(info.value)
    assert str(expected) in msg and "perceptual_weight: 0" in msg
    assert isinstance(info.value, RadioDiffError)
    with pytest.raises(LPIPSWeightsMissing):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)  # lpips_pretrained defaults to True


def test_loss_without_perceptual_needs_no_weights(empty_torch_home):
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=8)
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS1ch(pretrained_backbone=False)


def test_random_backbone_lpips(random_lpips):
    lp = random_lpips
    torch.manual_seed(1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        same, diff = lp(x, x), lp(x, y)
    assert same.shape == (3, 1, 1, 1) and diff.shape == (3, 1, 1, 1)
    assert torch.all(same == 0) and torch.all(diff > 0)
    assert torch.equal(lp(x, y), lp(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))  # 1 channel = repeated to 3
    assert all(not p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training and not any(m.training for m in lp.modules())
    shipped = torch.load(LIN_WEIGHTS_PATH, map_location="cpu")
    for i in range(5):
        assert torch.equal(getattr(lp, f"lin{i}").model[1].weight, shipped[f"lin{i}.model.1.weight"])
    with pytest.raises(ValueError, match="same shape"):
        lp(x, y[:, :, :16])


def test_lpips_names_equal_upstream(random_lpips):
    ours = {k: list(v.shape) for k, v in random_lpips.state_dict().items()}
    assert ours == upstream_keys("loss.perceptual_loss.")


def test_lpips_loads_backbone_from_hub_cache(tmp_path, monkeypatch, no_download):
    "With a file at $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth, that file is the backbone (no download)."
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    planted = {k: torch.full(s, 0.001 * (i + 1)) for i, (k, s) in enumerate(shapes.items())}
    planted["features.0.weight"] = torch.arange(planted["features.0.weight"].numel(), dtype=torch.float32).view(shapes["features.0.weight"])
    vgg_weights_path().parent.mkdir(parents=True)
    torch.save(planted, vgg_weights_path())
    del planted
    lp = LPIPS1ch(pretrained_backbone=True)
    w = lp.net.slice1[0].weight
    assert torch.equal(w, torch.arange(w.numel(), dtype=torch.float32).view(w.shape))
    assert getattr(lp.net.slice5, "28").bias[0].item() == pytest.approx(0.001 * (list(shapes).index("features.28.bias") + 1))


# ---------------------------------------------------------------------------------------------- the loss module

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(tiny_config()['model']['ddconfig'], embed_dim=3), torch.rand(2, 1, 32, 32) * 2 - 1


LOG_KEYS = ["train/total_loss", "train/logvar", "train/kl_loss", "train/nll_loss", "train/rec_loss", "train/d_weight",
            "train/disc_factor", "train/g_loss", "train/d_weight_clamped"]


def test_loss_module_state_dict_equals_upstream_loss_keys():
    # build with LPIPS (random backbone) and compare every name and shape with upstream's `loss.*`
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, lpips_pretrained=False)
    ours = {k: list(v.shape) for k, v in loss.state_dict().items()}
    assert ours == upstream_keys("loss.")


def test_log_keys_values_and_gate(tiny):
    ae, x = tiny
    loss = LPIPSWithDiscriminator(disc_start=10, kl_weight=1e-3, disc_weight=0.5, perceptual_weight=0.0, disc_ndf=16)
    xrec, post = ae(x)
    for step, factor in ((9, 0.0), (10, 1.0)):
        total, log = loss.autoencoder_loss(x, xrec, post, step, last_layer=ae.get_last_layer(), split="val")
        assert list(log) == [k.replace("train/", "val/") for k in LOG_KEYS]
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in log.values())
        assert log["val/disc_factor"].item() == factor and log["val/d_weight"].item() > 0
        expect = log["val/nll_loss"] + 1e-3 * log["val/kl_loss"] + log["val/d_weight"] * factor * log["val/g_loss"]
        assert total.item() == pytest.approx(expect.item(), rel=1e-5)
        assert log["val/rec_loss"].item() == pytest.approx(((x - xrec).abs() + (x - xrec) ** 2).mean().item(), rel=1e-6)
        d_loss, dlog = loss.discriminator_loss(x, xrec, step)
        assert list(dlog) == ["train/disc_loss", "train/logits_real", "train/logits_fake"]
        assert (d_loss.item() == 0.0) == (factor == 0.0)


def test_discriminator_pass_detaches_reconstruction(tiny):
    ae, x = tiny
    ae.zero_grad(set_to_none=True)
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=16)
    xrec, post = ae(x)
    ae_loss, _ = loss.autoencoder_loss(x, xrec, post, 5, last_layer=ae.get_last_layer())
    d_loss, _ = loss.discriminator_loss(x, xrec, 5)
    d_loss.backward()
    assert all(p.grad is None for p in ae.parameters())
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    ae_loss.backward()  # the autoencoder graph is still intact
    assert ae.get_last_layer().grad is not None and ae.encoder.conv_in.weight.grad is not None
    assert loss.logvar.grad is not None  # it has a gradient; whether it is optimised is the trainer's choice


def test_compute_d_weight_switch_and_eval_without_graph(tiny):
    ae, x = tiny
    loss = LPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, disc_ndf=16)
    xrec, post = ae(x)
    _, log = loss.autoencoder_loss(x, xrec, post, 3, last_layer=None, compute_d_weight=False)
    assert log["train/d_weight"].item() == 0.0
    _, log = loss.autoencoder_loss(x, xrec, post, 10, last_layer=ae.get_last_layer(), compute_d_weight=False)
    assert log["train/d_weight"].item() > 0  # gate open: needed, so computed
    with pytest.raises(ValueError, match="last_layer"):
        loss.autoencoder_loss(x, xrec, post, 3, last_layer=None)
    with torch.no_grad():
        xr, p = ae(x)
    loss.eval()
    _, log = loss.autoencoder_loss(x, xr, p, 20, last_layer=ae.get_last_layer())
    assert log["train/d_weight"].item() == 0.0
    loss.train()
    with pytest.raises(RuntimeError):
        loss.autoencoder_loss(x, xr, p, 20, last_layer=ae.get_last_layer())
    off = LPIPSWithDiscriminator(disc_start=0, disc_factor=0.0, perceptual_weight=0.0, disc_ndf=16)
    _, log = off.autoencoder_loss(x, xrec, post, 20, last_layer=None)
    assert log["train/d_weight"].item() == 0.0 and log["train/disc_factor"].item() == 0.0


def test_eval_mode_keeps_real_errors_of_the_adaptive_weight(tiny):
    "Only the no-graph case gives 0 in eval mode; any other RuntimeError (a wrong last layer, out of memory) propagates."
    ae, x = tiny
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=16).eval()
    xrec, post = ae(x)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        loss.autoencoder_loss(x, xrec, post, 5, last_layer=torch.zeros(3, requires_grad=True))


def test_adaptive_weight_norms_in_float32():
    "fp16 gradients whose norm exceeds fp16's range (65504) still give the right ratio."
    w = torch.full((100, 100), 1.0, dtype=torch.float16, requires_grad=True)
    nll, g = (w * 1000).sum(), (w * 500).sum()       # gradients 1000 and 500 per element: norms 1e5 and 5e4
    d, clamped = calculate_adaptive_weight(nll, g, w)
    assert torch.isfinite(d) and d.dtype == torch.float32 and not clamped
    assert abs(d.item() - 2.0) < 1e-3


def test_clamp_flag_logged(tiny):
    ae, x = tiny
    loss = LPIPSWithDiscriminator(disc_start=0, disc_weight=0.5, perceptual_weight=0.0, disc_ndf=16)
    with torch.no_grad():
        loss.discriminator.main[-1].weight.mul_(1e-9)  # a critic that barely reacts: tiny generator gradient
    xrec, post = ae(x)
    _, log = loss.autoencoder_loss(x, xrec, post, 0, last_layer=ae.get_last_layer())
    assert log["train/d_weight_clamped"].item() == 1.0 and log["train/d_weight"].item() == 5000.0
    loss2 = LPIPSWithDiscriminator(disc_start=0, disc_weight=0.5, perceptual_weight=0.0, disc_ndf=16, d_weight_max=1e9)
    loss2.load_state_dict(loss.state_dict())
    _, log2 = loss2.autoencoder_loss(x, xrec, post, 0, last_layer=ae.get_last_layer())
    assert log2["train/d_weight_clamped"].item() == 0.0 and log2["train/d_weight"].item() > 5000.0


def test_conditional_discriminator(tiny):
    ae, x = tiny
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_in_channels=2, disc_conditional=True, disc_ndf=8)
    xrec, post = ae(x)
    cond = torch.rand_like(x)
    _, log = loss.autoencoder_loss(x, xrec, post, 0, last_layer=ae.get_last_layer(), cond=cond)
    d_loss, dlog = loss(x, xrec, post, 1, 0, cond=cond)
    assert d_loss.item() > 0
    with pytest.raises(ValueError, match="needs `cond`"):
        loss.discriminator_loss(x, xrec, 0)
    plain = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=8)
    with pytest.raises(ValueError, match="disc_conditional=False"):
        plain.discriminator_loss(x, xrec, 0, cond=cond)


def test_load_loss_state_dict_reports_and_errors():
    src = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, lpips_pretrained=False, logvar_init=0.3)
    upstream_like = {f"loss.{k}": v for k, v in src.state_dict().items()}
    upstream_like["encoder.conv_in.weight"] = torch.zeros(1)  # model keys beside the loss keys are not the loss's
    dst = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    report = load_loss_state_dict(dst, upstream_like)
    assert dst.logvar.item() == pytest.approx(0.3)
    assert report["ignored"] and all(k.startswith("perceptual_loss.") for k in report["ignored"])
    assert torch.equal(dst.discriminator.main[0].weight, src.discriminator.main[0].weight)
    broken = {k: v for k, v in upstream_like.items() if k != "loss.discriminator.main.8.weight"}
    with pytest.raises(CheckpointError, match="discriminator.main.8.weight"):
        load_loss_state_dict(dst, broken, source="model-3.pt")
    small = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_ndf=8)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_loss_state_dict(small, upstream_like)

def test_adaptive_weight_float32_under_bf16_autocast():
    "Under CPU bf16 autocast the decoder's output is bf16, yet the adaptive weight comes out float32 and matches fp32 within bf16 rounding."
    conv = torch.nn.Conv2d(4, 1, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    def weight():
        y = conv(x)
        return calculate_adaptive_weight((y - 1).abs().mean(), -(y ** 2).mean(), conv.weight)[0], y.dtype
    with torch.autocast('cpu', dtype=torch.bfloat16): d16, dtype16 = weight()
    d32, _ = weight()
    assert dtype16 == torch.bfloat16 and d16.dtype == torch.float32
    assert math.isclose(d16.item(), d32.item(), rel_tol=0.05)
