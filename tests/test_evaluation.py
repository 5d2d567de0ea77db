"""Evaluation: metric functions against plain NumPy, end-to-end evaluations of tiny checkpoints, and bad input."""
import math
import numpy as np
import pytest
import torch
from scipy import stats

from radiodiff_vae.core import DataError
from radiodiff_vae.evaluation import map_metrics, nmse_per_map, rmse_per_map, psnr_per_map, ssim_per_map, summarize


# ---------- independent NumPy references (no torch, no torchmetrics) ----------

def np_gaussian_window(size=11, sigma=1.5):
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def np_filter_valid(img, window):
    """Weighted mean of every window-sized patch wholly inside `img` (a 'valid' correlation)."""
    patches = np.lib.stride_tricks.sliding_window_view(img, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def np_ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of two 2-D maps, Wang et al. (2004), Gaussian window centred on every pixel (borders reflected)."""
    pad = (size - 1) // 2
    x = np.pad(x.astype(np.float64), pad, mode="reflect")
    y = np.pad(y.astype(np.float64), pad, mode="reflect")
    w = np_gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = np_filter_valid(x, w), np_filter_valid(y, w)
    vx = np_filter_valid(x * x, w) - mx ** 2
    vy = np_filter_valid(y * y, w) - my ** 2
    cxy = np_filter_valid(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


def np_metrics(pred, target):
    err = pred.astype(np.float64) - target.astype(np.float64)
    mse = np.mean(err ** 2)
    return dict(nmse=np.sum(err ** 2) / np.sum(target.astype(np.float64) ** 2), rmse=np.sqrt(mse),
                psnr=10 * np.log10(1.0 / mse), ssim=np_ssim(pred, target))


def _pair(seed, h=24, w=20, noise=0.1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    target = np.clip(0.5 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + 0.05 * rng.standard_normal((h, w)), 0, 1)
    pred = np.clip(target + noise * rng.standard_normal((h, w)), 0, 1)
    return pred, target


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None]


# ---------- metric functions ----------

@pytest.mark.parametrize("seed,noise", [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_metrics_match_numpy(seed, noise):
    pred, target = _pair(seed, noise=noise)
    ours = map_metrics(_t(pred), _t(target))
    ref = np_metrics(pred, target)
    for k in ("nmse", "rmse"):
        assert ours[k].item() == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    assert ours["ssim"].item() == pytest.approx(ref["ssim"], abs=2e-6)     # computed in float32 for speed
    assert ours["psnr"].item() == pytest.approx(ref["psnr"], abs=1e-4)   # torchmetrics takes log10 in float32


def test_metrics_per_map_in_a_batch():
    pairs = [_pair(s, noise=0.05 * (s + 1)) for s in range(4)]
    pred = torch.cat([_t(p) for p, _ in pairs]); target = torch.cat([_t(t) for _, t in pairs])
    ours = map_metrics(pred, target)
    for i, (p, t) in enumerate(pairs):
        ref = np_metrics(p, t)
        assert ours["ssim"][i].item() == pytest.approx(ref["ssim"], abs=2e-6)
        assert ours["nmse"][i].item() == pytest.approx(ref["nmse"], rel=1e-9)
    # noisier maps score worse on every metric
    assert (ours["psnr"].diff() < 0).all() and (ours["ssim"].diff() < 0).all() and (ours["rmse"].diff() > 0).all()


def test_numpy_ssim_reference_is_sane():
    pred, target = _pair(3)
    assert np_ssim(target, target) == pytest.approx(1.0)
    assert np_ssim(pred, target) < 0.95
    assert np_ssim(1 - target, target) < 0


def test_metrics_clamp_reconstruction_and_psnr_identity():
    pred, target = _pair(4, noise=0.2)
    over = _t(pred) * 1.5 - 0.25            # values outside [0, 1]
    m = map_metrics(over, _t(target))
    ref = np_metrics(np.clip(pred * 1.5 - 0.25, 0, 1), target)
    assert m["rmse"].item() == pytest.approx(ref["rmse"], rel=1e-9)
    assert m["psnr"].item() == pytest.approx(-20 * math.log10(m["rmse"].item()), abs=1e-4)


def test_metrics_bad_shapes():
    with pytest.raises(DataError, match="one shape"):
        map_metrics(torch.zeros(2, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(DataError, match="SSIM window"):
        map_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_summarize_against_scipy():
    rng = np.random.default_rng(0)
    v = rng.normal(30, 2, size=17)
    s = summarize(list(v) + [float("nan"), float("inf")])
    assert s["n"] == 17 and s["n_nonfinite"] == 2
    lo, hi = stats.t.interval(0.95, 16, loc=v.mean(), scale=stats.sem(v))
    assert s["ci_low"] == pytest.approx(lo) and s["ci_high"] == pytest.approx(hi)
    assert s["std"] == pytest.approx(np.std(v, ddof=1))
