"""AutoencoderKL: shapes, names against upstream's key list, checkpointing, channels_last, loading and its errors."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from radiodiff_vae.core import CheckpointError, ConfigError
from radiodiff_vae.distributions import DiagonalGaussianDistribution
from radiodiff_vae.model import (DEFAULT_DDCONFIG, DEFAULT_EMBED_DIM, MODEL_PREFIXES, AttnBlock, AutoencoderKL,
                                 load_upstream_state_dict, save_autoencoder, upstream_loss_state_dict)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('RADIODIFF_SHARED', REPO_ROOT.parent / 'shared'))
TINY = dict(double_z=True, z_channels=3, resolution=[32, 32], in_channels=1, out_ch=1, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(TINY, 3)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f'shared folder not found at {SHARED} (set RADIODIFF_SHARED)')
def test_names_and_shapes_equal_upstream():
    upstream = json.loads((SHARED / 'golden' / 'state_dict_keys.json').read_text())
    model_part = {k: v for k, v in upstream.items() if k.startswith(MODEL_PREFIXES)}
    with torch.device('meta'):
        ours = {k: list(v.shape) for k, v in AutoencoderKL(DEFAULT_DDCONFIG, DEFAULT_EMBED_DIM).state_dict().items()}
    assert ours == model_part
    assert list(ours) == list(model_part)
    assert all(k.split('.')[0].startswith('loss') for k in upstream if k not in model_part)


def test_default_config_is_upstreams():
    assert DEFAULT_DDCONFIG == dict(double_z=True, z_channels=3, resolution=[320, 320], in_channels=1, out_ch=1, ch=128,
                                    ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    assert DEFAULT_EMBED_DIM == 3


def test_latent_shape_256():
    with torch.device('meta'):
        model = AutoencoderKL()
        post = model.encode(torch.empty(2, 1, 256, 256))
        assert isinstance(post, DiagonalGaussianDistribution)
        assert tuple(post.mean.shape) == (2, 3, 64, 64)
        assert tuple(model.decode(post.sample()).shape) == (2, 1, 256, 256)


@pytest.mark.parametrize('hw', [(32, 32), (64, 48), (36, 20)])
def test_shapes_any_size_divisible(tiny, hw):
    x = torch.randn(1, 1, *hw)
    with torch.no_grad(): xhat, post = tiny(x)
    assert xhat.shape == x.shape and post.mean.shape == (1, 3, hw[0] // 2, hw[1] // 2)


def test_forward_modes_and_generator(tiny):
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a, _ = tiny(x, generator=torch.Generator().manual_seed(3))
        b, _ = tiny(x, generator=torch.Generator().manual_seed(3))
        c, _ = tiny(x, generator=torch.Generator().manual_seed(4))
        mode, post = tiny(x, sample_posterior=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(mode, tiny.decode(post.mean))
    assert tiny.get_last_layer() is tiny.decoder.conv_out.weight


def test_fused_attention_equals_explicit():
    torch.manual_seed(1)
    block = AttnBlock(64)
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        block.fused = True; fused = block(x)
        block.fused = False; explicit = block(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_identical(tiny):
    x = torch.randn(1, 1, 16, 16)
    tiny.train()
    def run():
        tiny.zero_grad()
        xhat, post = tiny(x, generator=torch.Generator().manual_seed(0))
        ((xhat - x).pow(2).sum() + post.kl().sum()).backward()
        return xhat.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters()}
    out0, g0 = run()
    tiny.gradient_checkpointing = True
    assert tiny.encoder.gradient_checkpointing and tiny.decoder.gradient_checkpointing
    out1, g1 = run()
    assert torch.equal(out0, out1)
    for n in g0: torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)
    assert AutoencoderKL(TINY, 3, gradient_checkpointing=True).gradient_checkpointing


def test_channels_last_runs_and_agrees(tiny):
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = tiny(x, sample_posterior=False)[0]
        cl = tiny.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sample_posterior=False)[0]
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match='GroupNorm'): AutoencoderKL({**TINY, 'ch': 16}, 3)
    with pytest.raises(ConfigError, match='unknown key'): AutoencoderKL({**TINY, 'num_resblocks': 2}, 3)
    with pytest.raises(ConfigError, match='missing key'): AutoencoderKL({k: v for k, v in TINY.items() if k != 'ch'}, 3)
    with pytest.raises(ConfigError, match='resolution'): AutoencoderKL({**TINY, 'resolution': 'big'}, 3)
    assert AutoencoderKL({**TINY, 'resolution': 32}, 3).encoder.resolution == (32, 32)


def test_round_trip(tiny, tmp_path):
    save_autoencoder(tiny, tmp_path / 'ae.pt', step=12)
    back = AutoencoderKL.from_checkpoint(tmp_path / 'ae.pt')
    assert back.ddconfig == tiny.ddconfig and back.embed_dim == 3
    for k, v in tiny.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k


def test_our_trainer_style_checkpoint(tiny, tmp_path):
    "Our trainer's files carry config.model.ddconfig, an EMA and plain-Python state (RNG, config)."
    import numpy as np, random
    ema = {'ema_model.' + k: v + 1 for k, v in tiny.state_dict().items()}
    ckpt = {'model': tiny.state_dict(), 'ema': ema, 'step': 10, 'rng': {'python': random.getstate(), 'numpy': np.random.get_state()},
            'config': {'model': {'ddconfig': TINY, 'embed_dim': 3, 'lossconfig': {}}, 'trainer': {}}}
    torch.save(ckpt, tmp_path / 'model-1.pt')
    m = AutoencoderKL.from_checkpoint(tmp_path / 'model-1.pt', use_ema=True)
    assert torch.equal(m.quant_conv.bias, tiny.quant_conv.bias + 1)


def test_wrapped_and_lightning_layouts(tiny, tmp_path):
    sd = tiny.state_dict()
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, tmp_path / 'l.ckpt')
    torch.save(dict(sd), tmp_path / 'bare.pt')
    for name in ('l.ckpt', 'bare.pt'):
        m = AutoencoderKL.from_checkpoint(tmp_path / name, ddconfig=TINY, embed_dim=3)
        assert torch.equal(m.encoder.conv_in.weight, tiny.encoder.conv_in.weight)


def test_ignored_keys_are_reported(tiny, caplog):
    sd = {**tiny.state_dict(), 'loss.logvar': torch.tensor(0.), 'loss_pinn.logvar': torch.tensor(0.),
          'loss_pinn_dpm2irt4.discriminator.main.0.weight': torch.zeros(1)}
    with caplog.at_level(logging.WARNING, logger='radiodiff_vae.model'):
        report = load_upstream_state_dict(AutoencoderKL(TINY, 3), sd, source='x.pt')
    assert sorted(report['ignored']) == ['loss.logvar', 'loss_pinn.logvar', 'loss_pinn_dpm2irt4.discriminator.main.0.weight']
    assert 'x.pt: ignored 3 tensors' in caplog.text and 'loss_pinn_dpm2irt4.* (1)' in caplog.text


def test_upstream_loss_state_dict(tiny):
    sd = {**tiny.state_dict(), 'loss.logvar': torch.tensor(0.5), 'loss.discriminator.main.0.weight': torch.ones(2),
          'loss.perceptual_loss.lin0.model.1.weight': torch.ones(1), 'loss_pinn.logvar': torch.tensor(0.)}
    got = upstream_loss_state_dict(sd)
    assert sorted(got) == ['discriminator.main.0.weight', 'logvar'] and got['logvar'].item() == 0.5
    assert sorted(upstream_loss_state_dict({'model': sd, 'step': 1})) == sorted(got)


@pytest.mark.parametrize('content,match', [(b'', r'empty file \(0 bytes\)'), (b'\x00garbage' * 50, 'not a readable torch checkpoint'),
                                           (b'PK\x03\x04' + b'truncated zip' * 20, 'not a readable torch checkpoint')])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / 'model-9.pt'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e: AutoencoderKL.from_checkpoint(path)
    assert 'model-9.pt' in str(e.value)


def test_truncated_real_checkpoint(tiny, tmp_path):
    save_autoencoder(tiny, tmp_path / 'ok.pt')
    data = (tmp_path / 'ok.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.pt: not a readable torch checkpoint'): AutoencoderKL.from_checkpoint(tmp_path / 'cut.pt')


def test_structural_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match='no such checkpoint file'): AutoencoderKL.from_checkpoint(tmp_path / 'missing.pt')
    with pytest.raises(CheckpointError, match='is a folder'): AutoencoderKL.from_checkpoint(tmp_path)
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(CheckpointError, match='holds a list'): AutoencoderKL.from_checkpoint(tmp_path / 'list.pt')
    torch.save({'optimizer': {}, 'step': 3}, tmp_path / 'opt.pt')
    with pytest.raises(CheckpointError, match=r"no model weights found.*'optimizer'"): AutoencoderKL.from_checkpoint(tmp_path / 'opt.pt')
    torch.save({'model': tiny.state_dict()}, tmp_path / 'noema.pt')
    with pytest.raises(CheckpointError, match="no 'ema' entry"): AutoencoderKL.from_checkpoint(tmp_path / 'noema.pt', use_ema=True, ddconfig=TINY)


def test_another_architecture(tiny, tmp_path):
    torch.manual_seed(0)
    other = AutoencoderKL({**TINY, 'ch': 64, 'ch_mult': [1, 2, 2]}, 4)
    torch.save({'model': other.state_dict()}, tmp_path / 'model-5.pt')
    with pytest.raises(CheckpointError) as e:
        AutoencoderKL.from_checkpoint(tmp_path / 'model-5.pt', ddconfig=TINY, embed_dim=3)
    msg = str(e.value)
    assert 'model-5.pt: checkpoint of another architecture: encoder.conv_in.weight has shape [64, 1, 3, 3], model expects [32, 1, 3, 3]' in msg
    assert '28 unexpected key(s): encoder.down.1.downsample.conv.weight' in msg
    assert "'ch': 64, 'in_channels': 1, 'ch_mult': [1, 2, 2]" in msg and "'embed_dim': 4" in msg
    # and with the right architecture it loads
    m = AutoencoderKL.from_checkpoint(tmp_path / 'model-5.pt', ddconfig={**TINY, 'ch': 64, 'ch_mult': [1, 2, 2]}, embed_dim=4)
    assert torch.equal(m.post_quant_conv.weight, other.post_quant_conv.weight)


def test_missing_tensor_named(tiny, tmp_path):
    sd = {k: v for k, v in tiny.state_dict().items() if not k.startswith('decoder.mid.attn_1.')}
    torch.save({'model': sd}, tmp_path / 'model-6.pt')
    with pytest.raises(CheckpointError, match=r'model-6.pt: 10 missing key\(s\): decoder.mid.attn_1.norm.weight'):
        AutoencoderKL.from_checkpoint(tmp_path / 'model-6.pt', ddconfig=TINY)


def test_bad_input_shapes(tiny):
    from radiodiff_vae.core import DataError
    with pytest.raises(DataError, match=r'divisible by 2, got \[1, 1, 33, 32\]'): tiny.encode(torch.zeros(1, 1, 33, 32))
    with pytest.raises(DataError, match=r'expected \[B, 1, H, W\]'): tiny(torch.zeros(1, 32, 32))
    with torch.device('meta'):
        with pytest.raises(DataError, match='divisible by 4'): AutoencoderKL().encode(torch.empty(1, 1, 250, 256))


# --- an independent, functional transcription of latent-diffusion's forward pass, reading tensors by name ---
# It checks configurations the golden file does not cover (attention inside levels, 4 levels, 3 res blocks,
# non-square maps, z/embed channels that differ), and that our module tree applies blocks in upstream's order.

def _ref_norm(sd, p, x): return torch.nn.functional.group_norm(x, 32, sd[p + '.weight'], sd[p + '.bias'], eps=1e-6)
def _ref_conv(sd, p, x, stride=1, padding=None):
    w = sd[p + '.weight']
    return torch.nn.functional.conv2d(x, w, sd[p + '.bias'], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)
def _ref_swish(x): return x * torch.sigmoid(x)

def _ref_resblock(sd, p, x):
    h = _ref_conv(sd, p + '.conv1', _ref_swish(_ref_norm(sd, p + '.norm1', x)))
    h = _ref_conv(sd, p + '.conv2', _ref_swish(_ref_norm(sd, p + '.norm2', h)))
    if p + '.nin_shortcut.weight' in sd: x = _ref_conv(sd, p + '.nin_shortcut', x)
    return x + h

def _ref_attn(sd, p, x):
    h_ = _ref_norm(sd, p + '.norm', x)
    q, k, v = (_ref_conv(sd, f'{p}.{n}', h_) for n in 'qkv')
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    w_ = torch.softmax(torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5)), dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _ref_conv(sd, p + '.proj_out', h_)

def _ref_encode(sd, cfg, x):
    n_levels, n_blocks = len(cfg['ch_mult']), cfg['num_res_blocks']
    hs = [_ref_conv(sd, 'encoder.conv_in', x)]
    for i in range(n_levels):
        for j in range(n_blocks):
            h = _ref_resblock(sd, f'encoder.down.{i}.block.{j}', hs[-1])
            if f'encoder.down.{i}.attn.{j}.q.weight' in sd: h = _ref_attn(sd, f'encoder.down.{i}.attn.{j}', h)
            hs.append(h)
        if i != n_levels - 1:
            hs.append(_ref_conv(sd, f'encoder.down.{i}.downsample.conv', torch.nn.functional.pad(hs[-1], (0, 1, 0, 1)), stride=2, padding=0))
    h = _ref_resblock(sd, 'encoder.mid.block_2', _ref_attn(sd, 'encoder.mid.attn_1', _ref_resblock(sd, 'encoder.mid.block_1', hs[-1])))
    return _ref_conv(sd, 'quant_conv', _ref_conv(sd, 'encoder.conv_out', _ref_swish(_ref_norm(sd, 'encoder.norm_out', h))))

def _ref_decode(sd, cfg, z):
    n_levels, n_blocks = len(cfg['ch_mult']), cfg['num_res_blocks']
    h = _ref_conv(sd, 'decoder.conv_in', _ref_conv(sd, 'post_quant_conv', z))
    h = _ref_resblock(sd, 'decoder.mid.block_2', _ref_attn(sd, 'decoder.mid.attn_1', _ref_resblock(sd, 'decoder.mid.block_1', h)))
    for i in reversed(range(n_levels)):
        for j in range(n_blocks + 1):
            h = _ref_resblock(sd, f'decoder.up.{i}.block.{j}', h)
            if f'decoder.up.{i}.attn.{j}.q.weight' in sd: h = _ref_attn(sd, f'decoder.up.{i}.attn.{j}', h)
        if i != 0: h = _ref_conv(sd, f'decoder.up.{i}.upsample.conv', torch.nn.functional.interpolate(h, scale_factor=2.0, mode='nearest'))
    return _ref_conv(sd, 'decoder.conv_out', _ref_swish(_ref_norm(sd, 'decoder.norm_out', h)))


@pytest.mark.parametrize('cfg,embed_dim,hw', [
    (dict(TINY, ch_mult=[1, 2, 1, 2], num_res_blocks=1, attn_resolutions=[8, 4], resolution=[32, 32]), 3, (32, 24)),
    (dict(TINY, ch=32, ch_mult=[1, 1], num_res_blocks=3, z_channels=4, out_ch=2, in_channels=2, attn_resolutions=[16], resolution=16), 2, (16, 16)),
])
def test_other_configurations_equal_reference(cfg, embed_dim, hw):
    torch.manual_seed(7)
    model = AutoencoderKL(cfg, embed_dim).eval()
    with torch.no_grad():  # randomise norm affines so that every tensor matters
        for n, p in model.named_parameters():
            if 'norm' in n: p.add_(torch.randn_like(p) * 0.3)
    sd = model.state_dict()
    assert any('.attn.' in k and k.startswith('encoder.down.') for k in sd) and any('.attn.' in k and k.startswith('decoder.up.') for k in sd)
    x = torch.randn(2, cfg['in_channels'], *hw)
    with torch.no_grad():
        post = model.encode(x)
        moments = _ref_encode(sd, cfg, x)
        torch.testing.assert_close(post.parameters, moments, rtol=1e-4, atol=1e-5)
        z = post.sample(torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.decode(z), _ref_decode(sd, cfg, z), rtol=1e-4, atol=1e-5)
