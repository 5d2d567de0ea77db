"""Golden equality with upstream: our AutoencoderKL loaded with upstream's weights reproduces upstream's outputs.

`golden/small.pt` in the shared folder (see conftest.py: $RADIODIFF_SHARED, else ../shared) holds a small upstream
model's state dict, an input batch and what upstream's AutoencoderKL computed for it. Missing: skipped, or in CI failed.
"""
from pathlib import Path

import pytest
import torch

from radiodiff_vae.core import CheckpointError
from radiodiff_vae.model import AutoencoderKL, load_upstream_state_dict



@pytest.fixture(scope='module')
def golden_file(golden_path):
    return golden_path('golden', 'small.pt')


@pytest.fixture(scope='module')
def golden(golden_file):
    "The golden file's contents, read with the safe loader (it holds tensors and plain values only)."
    return torch.load(golden_file, map_location='cpu', weights_only=True)


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


def test_golden_file_loads_directly(golden, golden_file):
    "small.pt carries its config, so from_checkpoint needs no architecture arguments."
    model = AutoencoderKL.from_checkpoint(golden_file).eval()
    with torch.no_grad(): kl = model.encode(golden['input']).kl()
    assert_rel_close(kl, golden['outputs']['kl'])


def test_default_architecture_rejects_small_golden(golden, tmp_path):
    "Loading the ch=32 golden weights into the default ch=128 model names the first differing tensor."
    path = tmp_path / 'model-2.pt'
    torch.save({'model': golden['state_dict'], 'step': 0}, path)
    with pytest.raises(CheckpointError, match=r'model-2\.pt: checkpoint of another architecture: encoder\.conv_in\.weight has shape \[32, 1, 3, 3\], model expects \[128, 1, 3, 3\]'):
        AutoencoderKL.from_checkpoint(path)


# ---------- the resolver: a missing golden file is a skip on a laptop and a failure in CI ----------

_PROBE = """
def test_needs_golden(golden_path):
    assert golden_path('golden', 'small.pt').read_bytes() == b'x'
"""


@pytest.mark.parametrize('ci,present,outcome', [('', False, 'skipped'), ('true', False, 'failed'), ('true', True, 'passed'),
                                                ('', True, 'passed')])
def test_missing_golden_file_fails_in_ci(pytester, monkeypatch, tmp_path, ci, present, outcome):
    pytester.makeconftest((Path(__file__).parent / 'conftest.py').read_text().replace("pytest_plugins = ['pytester']", ''))
    pytester.makepyfile(_PROBE)
    shared = tmp_path / 'elsewhere'
    if present: (shared / 'golden').mkdir(parents=True); (shared / 'golden' / 'small.pt').write_bytes(b'x')
    monkeypatch.setenv('RADIODIFF_SHARED', str(shared))
    monkeypatch.setenv('CI', ci)
    result = pytester.runpytest_inprocess('-q', '-rs')
    result.assert_outcomes(**{outcome: 1})
    if outcome == 'failed': result.stdout.fnmatch_lines(['*CI=true: a missing golden file is a failure, not a skip*'])
    if outcome == 'skipped': result.stdout.fnmatch_lines(['*RADIODIFF_SHARED*'])


def test_one_path_rule(monkeypatch, tmp_path):
    "$RADIODIFF_SHARED wins; without it, the folder shared beside the repository root."
    import conftest
    monkeypatch.setenv('RADIODIFF_SHARED', str(tmp_path))
    assert conftest.shared_dir() == tmp_path
    monkeypatch.delenv('RADIODIFF_SHARED')
    assert conftest.shared_dir() == Path(__file__).resolve().parents[1].parent / 'shared'
