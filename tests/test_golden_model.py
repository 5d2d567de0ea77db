"""Golden equality with upstream: our AutoencoderKL loaded with upstream's weights reproduces upstream's outputs.

`shared/golden/small.pt` (beside the repository, or $RADIODIFF_SHARED) holds a small upstream model's state
dict, an input batch and what upstream's AutoencoderKL computed for it.
"""
import os
from pathlib import Path

import pytest
import torch

from radiodiff_vae.core import CheckpointError
from radiodiff_vae.model import AutoencoderKL, load_upstream_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('RADIODIFF_SHARED', REPO_ROOT.parent / 'shared'))
GOLDEN = SHARED / 'golden' / 'small.pt'
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f'shared folder with the golden files not found at {SHARED} (set RADIODIFF_SHARED)')


@pytest.fixture(scope='module')
def golden():
    assert GOLDEN.exists(), f'{GOLDEN} missing although {SHARED} exists'
    return torch.load(GOLDEN, map_location='cpu', weights_only=False)


def assert_rel_close(actual, expected, rtol=1e-4):
    "Elementwise relative tolerance, with an absolute floor scaled to the tensor's magnitude (values near 0)."
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _model(golden):
    cfg = golden['config']
    model = AutoencoderKL(cfg['ddconfig'], cfg['embed_dim'])
    report = load_upstream_state_dict(model, golden['state_dict'])
    return model.eval(), report


@pytest.mark.parametrize('fused', [True, False])
def test_outputs_equal_upstream(golden, fused):
    model, report = _model(golden)
    assert report['missing'] == [] and report['unexpected'] == [] and report['mismatched'] == []
    assert report['ignored'] and all(k.startswith('loss.') for k in report['ignored'])
    for m in model.modules():
        if hasattr(m, 'fused'): m.fused = fused
    with torch.no_grad():
        posterior = model.encode(golden['input'])
        xrec = model.decode(posterior.mode())
    out = golden['outputs']
    assert_rel_close(posterior.mean, out['mean'])
    assert_rel_close(posterior.logvar, out['logvar'])
    assert_rel_close(posterior.kl(), out['kl'])
    assert_rel_close(xrec, out['xrec_mode'])
    with torch.no_grad():  # forward(sample_posterior=False) is the same path
        assert_rel_close(model(golden['input'], sample_posterior=False)[0], out['xrec_mode'])


def test_outputs_differ_with_other_weights(golden):
    "The golden comparison can fail: a freshly initialised model does not reproduce upstream's numbers."
    cfg = golden['config']
    torch.manual_seed(123)
    model = AutoencoderKL(cfg['ddconfig'], cfg['embed_dim']).eval()
    with torch.no_grad(): mean = model.encode(golden['input']).mean
    with pytest.raises(AssertionError): assert_rel_close(mean, golden['outputs']['mean'])


def test_upstream_checkpoint_layout(golden, tmp_path):
    "The golden weights inside an upstream-style model-N.pt load raw and from the EMA entry."
    sd = golden['state_dict']
    ema_scale = 0.5
    ckpt = {'model': sd, 'ema': {**{'ema_model.' + k: v * ema_scale if v.is_floating_point() else v for k, v in sd.items()},
                                 'initted': torch.tensor(True), 'step': torch.tensor(5)}, 'step': 5}
    path = tmp_path / 'model-1.pt'
    torch.save(ckpt, path)
    cfg = golden['config']
    raw = AutoencoderKL.from_checkpoint(path, ddconfig=cfg['ddconfig'], embed_dim=cfg['embed_dim']).eval()
    ema = AutoencoderKL.from_checkpoint(path, use_ema=True, ddconfig=cfg['ddconfig'], embed_dim=cfg['embed_dim'])
    with torch.no_grad(): mean = raw.encode(golden['input']).mean
    assert_rel_close(mean, golden['outputs']['mean'])
    torch.testing.assert_close(ema.decoder.conv_out.weight, sd['decoder.conv_out.weight'] * ema_scale)
    assert {'initted', 'step'} <= set(ema.load_report['ignored'])
    assert any(k.startswith('loss.discriminator.') for k in raw.load_report['ignored'])


def test_golden_file_loads_directly(golden):
    "small.pt carries its config, so from_checkpoint needs no architecture arguments."
    model = AutoencoderKL.from_checkpoint(GOLDEN).eval()
    with torch.no_grad(): kl = model.encode(golden['input']).kl()
    assert_rel_close(kl, golden['outputs']['kl'])


def test_default_architecture_rejects_small_golden(golden, tmp_path):
    "Loading the ch=32 golden weights into the default ch=128 model names the first differing tensor."
    path = tmp_path / 'model-2.pt'
    torch.save({'model': golden['state_dict'], 'step': 0}, path)
    with pytest.raises(CheckpointError, match=r'model-2\.pt: checkpoint of another architecture: encoder\.conv_in\.weight has shape \[32, 1, 3, 3\], model expects \[128, 1, 3, 3\]'):
        AutoencoderKL.from_checkpoint(path)
