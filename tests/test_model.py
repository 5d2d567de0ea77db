"""AutoencoderKL: shapes, names against upstream's key list, checkpointing, channels_last, loading and its errors."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from radiodiff_vae.config import tiny_config
from radiodiff_vae.core import CheckpointError, ConfigError
from radiodiff_vae.distributions import DiagonalGaussianDistribution
from radiodiff_vae.model import (DEFAULT_DDCONFIG, DEFAULT_EMBED_DIM, MODEL_PREFIXES, AttnBlock, AutoencoderKL,
                                 load_checkpoint, load_upstream_state_dict, model_from_checkpoint, reconstruct,
                                 save_autoencoder, upstream_loss_state_dict)

TINY = tiny_config('model.ddconfig.attn_resolutions=[16]')['model']['ddconfig']   # with one attention block


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(TINY, 3)


def test_names_and_shapes_equal_upstream(golden_path):
    upstream = json.loads(golden_path('golden', 'state_dict_keys.json').read_text())
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
    "Our trainer's files carry config.model.ddconfig, an EMA and state kept as tensors and plain values: safe to read."
    import random
    ema = {'ema_model.' + k: v + 1 for k, v in tiny.state_dict().items()}
    ckpt = {'model': tiny.state_dict(), 'ema': ema, 'step': 10, 'rng': {'python': random.getstate(), 'torch': torch.get_rng_state()},
            'config': {'model': {'ddconfig': TINY, 'embed_dim': 3, 'lossconfig': {}}, 'trainer': {}}}
    torch.save(ckpt, tmp_path / 'model-1.pt')
    m = AutoencoderKL.from_checkpoint(tmp_path / 'model-1.pt', use_ema=True)
    assert torch.equal(m.quant_conv.bias, tiny.quant_conv.bias + 1)


def test_numpy_objects_are_refused_unless_trusted(tiny, tmp_path):
    "A NumPy array is built by calling a function the pickle names: the safe reader refuses it; trust=True reads it."
    import numpy as np
    torch.save({'model': tiny.state_dict(), 'rng': {'numpy': np.random.get_state()}}, tmp_path / 'np.pt')
    with pytest.raises(CheckpointError, match=r'np.pt: refused to load: it holds the global numpy.*--trust-checkpoint') as e:
        model_from_checkpoint(tmp_path / 'np.pt', ddconfig=TINY, embed_dim=3)
    assert len(str(e.value).splitlines()) == 1
    assert isinstance(load_checkpoint(tmp_path / 'np.pt', trust=True)['rng']['numpy'][1], np.ndarray)


class _Payload:
    "Unpickling it runs a shell command (what a hostile model-N.pt can do)."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return (os.system, (self.cmd,))


def test_a_pickle_that_runs_code_is_refused(tiny, tmp_path):
    marker = tmp_path / 'it-ran'
    torch.save({'model': tiny.state_dict(), 'x': _Payload(f'touch {marker}')}, tmp_path / 'evil.pt')
    for call in (lambda: load_checkpoint(tmp_path / 'evil.pt'), lambda: AutoencoderKL.from_checkpoint(tmp_path / 'evil.pt', ddconfig=TINY),
                 lambda: model_from_checkpoint(tmp_path / 'evil.pt', 'raw', ddconfig=TINY)):
        with pytest.raises(CheckpointError, match=r'evil.pt: refused to load: it holds the global \w+\.system') as e: call()
        assert len(str(e.value).splitlines()) == 1 and '--trust-checkpoint' in str(e.value)
        assert not marker.exists()
    m = model_from_checkpoint(tmp_path / 'evil.pt', 'raw', trust=True, ddconfig=TINY)
    assert marker.exists() and torch.equal(m.encoder.conv_in.weight, tiny.encoder.conv_in.weight)


def upstream_save(model, path, step=35000, accumulate_loss=True):
    """A faithful re-creation of upstream's Trainer.save: real AdamW optimizers that have stepped, LambdaLR with
    upstream's polynomial rule (a lambda), an EMA wrapper's state dict, a GradScaler's, and the whole model
    (with its loss copies) as 'model'."""
    from radiodiff_vae.discriminator import NLayerDiscriminator
    disc = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=3)
    sd = {**model.state_dict(), 'loss.logvar': torch.zeros(()), **{f'loss.discriminator.{k}': v for k, v in disc.state_dict().items()},
          'loss_pinn.logvar': torch.zeros(())}
    opt_ae = torch.optim.AdamW(list(model.encoder.parameters()) + list(model.decoder.parameters()) + list(model.quant_conv.parameters())
                               + list(model.post_quant_conv.parameters()), lr=5e-6, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=5e-6, betas=(0.5, 0.9))
    rule = lambda it: max((1 - it / 150000) ** 0.95, 5e-7)
    s_ae, s_d = torch.optim.lr_scheduler.LambdaLR(opt_ae, lr_lambda=rule), torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda=rule)
    x = torch.randn(2, 1, 32, 32)
    model(x)[0].abs().mean().backward(); disc(x).mean().backward()
    opt_ae.step(); opt_d.step(); s_ae.step(); s_d.step()
    ema = {'initted': torch.tensor(True), 'step': torch.tensor(step),
           **{f'ema_model.{k}': v.clone() for k, v in model.state_dict().items()},
           **{f'online_model.{k}': v for k, v in model.state_dict().items()}}
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 16)
    torch.save({'step': step, 'model': sd, 'opt_ae': opt_ae.state_dict(), 'opt_d': opt_d.state_dict(),
                'lr_scheduler_ae': s_ae.state_dict(), 'lr_scheduler_d': s_d.state_dict(), 'ema': ema,
                'scaler': scaler.state_dict()}, path)
    return path


def test_upstream_trainer_checkpoint_loads_safely(tiny, tmp_path):
    path = upstream_save(tiny, tmp_path / 'model-7.pt')
    ckpt = load_checkpoint(path)                     # weights_only=True: no refusal
    assert sorted(ckpt) == ['ema', 'lr_scheduler_ae', 'lr_scheduler_d', 'model', 'opt_ae', 'opt_d', 'scaler', 'step']
    assert ckpt['step'] == 35000 and ckpt['lr_scheduler_ae']['last_epoch'] == 1 and ckpt['opt_ae']['state']
    assert ckpt['scaler']['scale'] == 2. ** 16
    raw = model_from_checkpoint(path, 'raw', ddconfig=TINY, embed_dim=3)
    ema = model_from_checkpoint(ckpt, 'ema', ddconfig=TINY, embed_dim=3, source=path)
    for k, v in tiny.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v) and torch.equal(ema.state_dict()[k], v), k
    assert 'loss.logvar' in raw.load_report['ignored']


def test_reconstruct_is_the_deterministic_mode(tiny):
    tiny.train()
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    r = reconstruct(tiny, x)
    assert tiny.training and not r.requires_grad
    with torch.no_grad(): assert torch.equal(r, tiny.eval()(x, sample_posterior=False)[0])
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(reconstruct(tiny, x, sample=True, generator=g()), reconstruct(tiny, x, sample=True, generator=g()))
    assert not torch.equal(reconstruct(tiny, x, sample=True, generator=g()), r)


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
    with pytest.raises(CheckpointError, match="noema.pt: EMA weights asked for but the checkpoint has no 'ema' entry"):
        AutoencoderKL.from_checkpoint(tmp_path / 'noema.pt', use_ema=True, ddconfig=TINY)


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
