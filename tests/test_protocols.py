"""The community's protocols beside ours: each computed as its source does it, all labelled in evaluate's outputs."""
import json

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from radiodiff_vae.cli import main
from radiodiff_vae.protocols import PROTOCOL_LABELS, protocol_metrics, ssim_uniform7


def skimage_default_ssim(x, y, data_range, win=7):
    "scikit-image's structural_similarity with its defaults, written out with SciPy's uniform_filter."
    f = lambda a: uniform_filter(a, size=win)
    n = win * win; cn = n / (n - 1)
    ux, uy = f(x), f(y)
    vx, vy, vxy = cn * (f(x * x) - ux * ux), cn * (f(y * y) - uy * uy), cn * (f(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s[3:-3, 3:-3].mean()


def test_rmdm_ssim_is_scikit_images_default():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(2, 1, 48, 48, generator=g, dtype=torch.float64)
    p = (t + 0.05 * torch.randn(2, 1, 48, 48, generator=g, dtype=torch.float64)).clamp(0, 1)
    r = t.flatten(1).amax(1) - t.flatten(1).amin(1)
    ours = ssim_uniform7(p, t, r).numpy()
    np.testing.assert_allclose(ours, [skimage_default_ssim(p[i, 0].numpy(), t[i, 0].numpy(), float(r[i])) for i in range(2)], rtol=1e-10)


def test_protocols_differ_where_their_definitions_do():
    t = torch.full((1, 1, 32, 32), 0.5); t[..., :16] = 0.25             # a map spanning 0.25..0.5: data range 0.25
    p = t + 0.01
    m = protocol_metrics(p, t)
    assert torch.allclose(m['ours']['nmse'], m['upstream']['nmse']) and torch.allclose(m['ours']['rmse'], m['rmdm']['rmse'])
    assert abs(float(m['ours']['psnr'] - m['rmdm']['psnr']) - 20 * np.log10(4)) < 1e-6     # 1 / 0.25
    assert abs(float(m['upstream']['psnr'] - m['rmdm']['psnr'])) < 1e-4


def test_evaluate_writes_every_protocol_labelled(tmp_path):
    assert main(['evaluate', '--checkpoint', 'released', '--data', 'real', '--limit', '3', '--out', str(tmp_path / 'ev'), '--no-progress']) == 0
    summary = json.loads(next((tmp_path / 'ev').rglob('summary.json')).read_text())
    protocols = next(iter(summary['results'].values()))['protocols']
    assert list(protocols) == ['ours', 'upstream', 'rmdm']
    assert all(protocols[k]['label'] == PROTOCOL_LABELS[k] for k in protocols)
    assert all(protocols[k]['metrics'][m]['n'] == 3 for k in protocols for m in ('nmse', 'rmse', 'psnr', 'ssim'))
    md = next((tmp_path / 'ev').rglob('evaluation.md')).read_text()
    assert all(label in md for label in PROTOCOL_LABELS.values())
