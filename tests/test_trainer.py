"Trainer: exact resume, logs, checkpoints, run-folder safety, numerical faults, write failures, upstream checkpoints."
import ast, copy, errno, json, math, os, re, shutil, socket
from pathlib import Path
import pytest, torch
from torch.utils._python_dispatch import TorchDispatchMode
from radiodiff_vae import trainer as tr, stream, checkpoints
from radiodiff_vae.trainer import train, Trainer, NonFiniteLossError
from radiodiff_vae.run_folder import list_checkpoints
from radiodiff_vae.ema import EMA
from radiodiff_vae.config import resolve_config, tiny_config
from radiodiff_vae.core import RunFolderError, CheckpointError, ConfigError, RadioDiffError
from radiodiff_vae.schedules import lr_at

# a 12-step run: warm-up 2, GAN from step 6, checkpoints every 3 steps, 24 maps, batch 4, cosine schedule
TINY_RUN = ('model.lossconfig.disc_start=6', 'data.n_maps=24', 'data.val_maps=2', 'data.batch_size=4', 'trainer.lr=1e-3',
            'trainer.min_lr=1e-5', 'trainer.schedule=cosine', 'trainer.warmup_steps=2', 'trainer.train_num_steps=12',
            'trainer.save_and_sample_every=3', 'trainer.ema_update_every=1', 'trainer.learn_logvar=true')
TINY = tiny_config(*TINY_RUN)

def tiny(**changes):
    "TINY with dotted-key changes, e.g. tiny(**{'trainer.seed': 3}) (values as Python objects; JSON is YAML)."
    return tiny_config(*TINY_RUN, *(f'{key}={json.dumps(value)}' for key, value in changes.items()))

def with_raw(section, key, value):
    "TINY with `section.key` set to `value` unchecked: for what train itself must refuse or note."
    return TINY | {section: TINY[section] | {key: value}}

def snapshot(folder):
    "name -> (size, mtime) of every file under `folder`."
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob('*') if p.is_file()}

@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    "An uninterrupted 12-step run (TensorBoard on)."
    out = tmp_path_factory.mktemp('runs')/'straight'
    summary = train(tiny(**{'trainer.log_with': ['tensorboard']}), out, progress=False)
    return out, summary

def load(path): return torch.load(path, map_location='cpu', weights_only=True)   # checkpoints hold tensors and plain values only

def test_interrupted_run_resumes_to_identical_weights(straight, tmp_path):
    out, _ = straight
    first = train(TINY, tmp_path/'b', progress=False, stop_at=6)
    assert first['step'] == 6 and [m for m, _ in list_checkpoints(tmp_path/'b')] == [1, 2]
    second = train(TINY, tmp_path/'b', progress=False, resume='latest')
    assert second['start_step'] == 6 and second['step'] == 12
    a, b = load(out/'model-4.pt'), load(tmp_path/'b'/'model-4.pt')
    for key in ('model', 'loss', 'ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]: assert torch.equal(a[key][k], b[key][k]), f'{key}.{k} differs'
    for opt in ('opt_ae', 'opt_disc'):
        for pid, st in a[opt]['state'].items():
            for k, v in st.items(): assert torch.equal(v, b[opt]['state'][pid][k]), f'{opt} state {pid}.{k} differs'
    assert a['lr_scheduler_ae'] == b['lr_scheduler_ae'] and a['data_state'] == b['data_state'] and a['step'] == b['step'] == 12
    assert torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])

def test_checkpoint_has_upstream_and_our_keys(straight):
    out, summary = straight
    ck = load(out/'model-4.pt')
    upstream = {'model', 'opt_ae', 'opt_disc', 'lr_scheduler_ae', 'lr_scheduler_disc', 'ema', 'scaler', 'step'}
    assert upstream | {'config', 'rng', 'data_state', 'loss', 'version'} <= set(ck)
    assert ck['config'] == resolve_config(TINY | {'trainer': TINY['trainer'] | {'log_with': ['tensorboard']}})
    assert all(k.startswith('ema_model.') for k in ck['ema'] if k not in ('step', 'initted', 'updates'))
    assert 'logvar' in ck['loss'] and any(k.startswith('discriminator.') for k in ck['loss'])
    assert sorted(p.name for p in out.glob('sample-*.png')) == [f'sample-{i}.png' for i in range(1, 5)]
    assert not list(out.glob('.*.tmp')) and not (out/'.lock').exists()
    from radiodiff_vae.model import AutoencoderKL
    ema = AutoencoderKL.from_checkpoint(out/'model-4.pt', use_ema=True)
    assert torch.equal(ema.decoder.conv_out.weight, ck['ema']['ema_model.decoder.conv_out.weight'])
    assert summary['val'] is not None and summary['val']['val/psnr'] > 0

def test_text_log_upstream_format_and_readable_lr(straight):
    out, _ = straight
    lines = next(out.glob('*_.log')).read_text().splitlines()
    assert re.fullmatch(r'\d{4}-\d\d-\d\d-\d\d-\d\d_\.log', next(out.glob('*_.log')).name)
    stamp = r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} '
    assert re.match(stamp + r'\{', lines[0])
    assert ast.literal_eval(lines[0][24:]) == load(out/'model-4.pt')['config']
    steps = [l for l in lines if '[Train Step]' in l]
    assert len(steps) == 2 * 12
    ae_keys = ['train/total_loss', 'train/logvar', 'train/kl_loss', 'train/nll_loss', 'train/rec_loss', 'train/d_weight',
               'train/disc_factor', 'train/g_loss', 'lr']
    for i in range(12):
        ae, disc = steps[2 * i], steps[2 * i + 1]
        assert re.match(stamp + rf'\[Train Step\] {i}/12: ', ae) and ae.endswith(', ')
        assert re.findall(r'([\w/]+): ', ae.split(': ', 1)[1]) == ae_keys
        assert re.findall(r'([\w/]+): ', disc.split(': ', 1)[1]) == ['train/disc_loss', 'train/logits_real', 'train/logits_fake', 'lr']
        lr = float(re.search(r'lr: ([^,]+),', ae).group(1))
        assert lr > 0 and lr == pytest.approx(lr_at('cosine', i, 12, base_lr=1e-3, min_lr=1e-5, warmup_steps=2), rel=1e-9)
    assert 'train/disc_factor: 1' in steps[2 * 6] and 'train/disc_factor: 0' in steps[2 * 5]
    from radiodiff_vae.logs import read_text_log       # the project's (upstream-compatible) log reader
    records, info = read_text_log(next(out.glob('*_.log')))
    assert info['config'] == load(out/'model-4.pt')['config'] and info['total_steps'] == 12
    assert sorted({r['step'] for r in records}) == list(range(12))
    assert all(r['lr'] > 0 for r in records if 'lr' in r)

def test_metrics_jsonl_and_tensorboard(straight):
    out, _ = straight
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    train_recs = [r for r in recs if 'train/total_loss' in r]
    assert [r['step'] for r in train_recs] == list(range(12))
    for r in train_recs:
        assert {'lr_ae', 'lr_disc', 'wall_time', 'steps_per_s', 'train/disc_loss', 'train/logits_real', 'grad_norm_ae'} <= set(r)
    assert all(r['train/rec_loss'] is not None for r in train_recs)
    assert [r['step'] for r in recs if 'val/psnr' in r] == [3, 6, 9, 12]
    assert list((out/'tb').glob('events.out.tfevents.*'))
    from radiodiff_vae.logs import read_run
    df, info = read_run(out)
    assert list(df.index) == list(range(13)) and df.loc[5, 'lr'] == pytest.approx(train_recs[5]['lr_ae'])

def test_other_run_in_folder_is_refused_untouched(straight):
    out, _ = straight
    before = snapshot(out)
    with pytest.raises(RunFolderError, match='model.ddconfig.ch'):
        train(tiny(**{'model.ddconfig.ch': 64}), out, progress=False, resume='latest')
    with pytest.raises(RunFolderError, match='--resume latest'):
        train(TINY | {'trainer': TINY['trainer'] | {'log_with': ['tensorboard']}}, out, progress=False)
    assert snapshot(out) == before

def test_checkpoint_of_another_architecture(straight, tmp_path):
    out, _ = straight
    with pytest.raises(CheckpointError, match='another architecture'):
        train(tiny(**{'model.ddconfig.ch': 64}), tmp_path/'new', progress=False, resume=str(out/'model-4.pt'))
    assert not (tmp_path/'new').exists()

def test_damaged_latest_checkpoint(straight, tmp_path):
    out, _ = straight
    run = tmp_path/'copy'; shutil.copytree(out, run)
    (run/'model-4.pt').write_bytes(b'\x00garbage')
    before = snapshot(run)
    with pytest.raises(CheckpointError, match='model-4.pt'):
        train(TINY | {'trainer': TINY['trainer'] | {'log_with': ['tensorboard']}}, run, progress=False, resume='latest')
    assert snapshot(run) == before
    s = train(TINY | {'trainer': TINY['trainer'] | {'log_with': ['tensorboard']}}, run, progress=False, resume='latest',
              skip_damaged=True, stop_at=9)
    assert s['resumed_from'].endswith('model-3.pt') and s['step'] == 9

def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
    out = tmp_path/'locked'; out.mkdir()
    from radiodiff_vae.run_folder import RunLock
    with RunLock(out):                                   # another holder of the folder (an OS lock)
        with pytest.raises(RunFolderError, match=f'pid {os.getpid()}'):
            train(TINY, out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == ['.lock']
    s = train(tiny(**{'trainer.train_num_steps': 2, 'trainer.warmup_steps': 0, 'model.lossconfig.disc_start': 1}), out, progress=False)
    assert s['step'] == 2 and not RunLock(out).acquire().release()

class PoisonedMaps(torch.utils.data.Dataset):
    "Synthetic-like maps; every item drawn after the first `clean` draws is NaN (or only at draws in `at`)."
    def __init__(self, n=16, clean=8, at=None): self.n, self.clean, self.at, self.draws = n, clean, at, 0
    def __len__(self): return self.n
    def __getitem__(self, i):
        self.draws += 1
        g = torch.Generator().manual_seed(i)
        x = torch.rand(1, 32, 32, generator=g) * 2 - 1
        bad = (self.draws in self.at) if self.at is not None else self.draws > self.clean
        return {'image': x * float('nan') if bad else x, 'name': f'map{i}'}

def test_nan_stops_with_step_term_and_diagnostic(tmp_path):
    out = tmp_path/'nan'
    cfg = tiny(**{'trainer.save_and_sample_every': 2, 'data.val_maps': 0})
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, out, progress=False, dataset=PoisonedMaps(clean=8))
    msg = str(e.value)
    assert 'step 2' in msg and 'train/nll_loss' in msg and 'model-1.pt' in msg and 'trainer.max_nonfinite_skips=N' in msg
    diag = json.loads((out/'nonfinite-step2.json').read_text())
    assert diag['step'] == 2 and diag['terms'][0] == 'train/nll_loss' and len(diag['batch']) == 4 and 'train/rec_loss' in diag['losses']
    assert [m for m, _ in list_checkpoints(out)] == [1] and load(out/'model-1.pt')['step'] == 2
    assert not (out/'.lock').exists()
    assert '[Stop] step 2' in next(out.glob('*_.log')).read_text()

def test_skip_nonfinite_counts_skips(tmp_path):
    "trainer.max_nonfinite_skips: N > 0 skips a NaN batch (before issue 29 it also needed trainer.skip_nonfinite: true)."
    out = tmp_path/'skip'
    cfg = tiny(**{'trainer.max_nonfinite_skips': 100, 'trainer.train_num_steps': 6, 'trainer.save_and_sample_every': 6, 'model.lossconfig.disc_start': 3, 'data.val_maps': 0})
    s = train(cfg, out, progress=False, dataset=PoisonedMaps(at={5, 14}))   # draws 5 and 14: steps 1 and 3
    assert s['step'] == 6 and s['nonfinite_skips'] == 2
    log = next(out.glob('*_.log')).read_text()
    assert log.count('[Skip]') == 2 and 'skipped 2 so far' in log
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert max(r['nonfinite_skips'] for r in recs) == 2 and {1, 3}.isdisjoint(r['step'] for r in recs)
    assert all(torch.isfinite(v).all() for v in load(out/'model-1.pt')['model'].values())

def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path/'full'
    real, calls = tr.atomic_torch_save, []
    def failing(obj, path):
        calls.append(path)
        if len(calls) == 2: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(obj, path)
    monkeypatch.setattr(tr, 'atomic_torch_save', failing)
    with pytest.raises(RunFolderError, match=r'model-2\.pt.*No space left.*model-1\.pt is intact'):
        train(TINY, out, progress=False)
    assert [m for m, _ in list_checkpoints(out)] == [1] and load(out/'model-1.pt')['step'] == 3
    assert not list(out.glob('.*.tmp')) and not (out/'.lock').exists()

def test_failed_log_write_is_a_run_folder_error(tmp_path, monkeypatch):
    out = tmp_path/'ro'
    def failing_open(path, mode='r', *a, **k):
        if 'a' in mode and str(path).endswith('_.log') and failing_open.appends >= 5: raise OSError(errno.EROFS, 'Read-only file system')
        failing_open.appends += 'a' in mode and str(path).endswith('_.log')
        return open(path, mode, *a, **k)
    failing_open.appends = 0
    import radiodiff_vae.logs as logs_module
    monkeypatch.setattr(logs_module, 'open', failing_open, raising=False)   # the log writer's `open` only
    with pytest.raises(RunFolderError, match=r'_\.log: cannot write the log \(Read-only file system\)'):
        train(TINY, out, progress=False)
    assert not (out/'.lock').exists()

def make_upstream_checkpoint(ours: dict, path):
    "An upstream-style model-N.pt (no config/rng; loss inside `model`; EMA of the whole model, LPIPS tensors) from one of ours."
    model = dict(ours['model'])
    model.update({f'loss.{k}': v for k, v in ours['loss'].items()})
    model['loss.perceptual_loss.net.slice1.0.weight'] = torch.zeros(64, 3, 3, 3)
    ema = {k: v for k, v in ours['ema'].items() if k.startswith('ema_model.')}
    ema.update({'ema_model.loss.logvar': torch.tensor(0.), 'initted': torch.tensor(True), 'step': torch.tensor(12)})
    opt_ae = copy.deepcopy(ours['opt_ae'])
    logvar_id = opt_ae['param_groups'][1]['params'][0]
    opt_ae['param_groups'] = opt_ae['param_groups'][:1]; opt_ae['state'].pop(logvar_id, None)
    up = {'step': ours['step'], 'model': model, 'opt_ae': opt_ae, 'lr_scheduler_ae': ours['lr_scheduler_ae'],
          'opt_disc': ours['opt_disc'], 'lr_scheduler_disc': ours['lr_scheduler_disc'], 'ema': ema, 'scaler': None}
    torch.save(up, path)
    return up

def test_resume_from_upstream_checkpoint(straight, tmp_path):
    out, _ = straight
    up = make_upstream_checkpoint(load(out/'model-4.pt'), tmp_path/'model-4.pt')
    cfg = tiny(**{'trainer.train_num_steps': 14, 'trainer.save_and_sample_every': 7})
    t = Trainer(resolve_config(cfg), tmp_path/'cont', resume=str(tmp_path/'model-4.pt'), progress=False)
    try:
        assert t.step == 12 and t.batches_drawn == 12
        for k, v in t.ae.state_dict().items(): assert torch.equal(v, up['model'][k])
        assert torch.equal(t.loss.logvar.detach(), up['model']['loss.logvar'])
        assert torch.equal(t.ema.ema_model.decoder.conv_out.weight, up['ema']['ema_model.decoder.conv_out.weight'])
        assert len(t.opt_ae.param_groups) == 2 and t.sched_ae.scheduler.last_epoch == 12
        s = t.fit()
    finally: t.lock.release()
    assert s['step'] == 14 and (tmp_path/'cont'/'model-2.pt').exists()

def upstream_optimizer_states(cfg: dict, steps: int):
    "opt_ae / lr_scheduler_ae as upstream's Trainer.save writes them: one AdamW group (no logvar), LambdaLR stepped `steps` times."
    ae, _ = tr.build_model_and_loss(cfg['model'])
    t = cfg['trainer']
    opt = torch.optim.AdamW(tr.ae_parameters(ae), lr=t['lr'], betas=tuple(t['betas']), weight_decay=t['weight_decay'])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.1, 1 - s / t['train_num_steps']))
    for k in range(steps):
        for p in tr.ae_parameters(ae): p.grad = torch.full_like(p, 0.01 * (k + 1))
        opt.step(); sched.step()
    return opt.state_dict(), sched.state_dict()

def test_resume_from_faithful_upstream_checkpoint_with_learn_logvar(straight, tmp_path):
    "Upstream's optimizer and scheduler have one group; ours two (logvar learnable): resumed, the logvar group fresh."
    out, _ = straight
    cfg = resolve_config(tiny(**{'trainer.train_num_steps': 14, 'trainer.save_and_sample_every': 7}))
    opt_ae, sched_ae = upstream_optimizer_states(cfg, 12)
    assert len(opt_ae['param_groups']) == 1 and len(sched_ae['base_lrs']) == 1
    up = make_upstream_checkpoint(load(out/'model-4.pt'), tmp_path/'model-4.pt')
    up.update(opt_ae=opt_ae, lr_scheduler_ae=sched_ae)
    torch.save(up, tmp_path/'model-4.pt')
    t = Trainer(cfg, tmp_path/'cont', resume=str(tmp_path/'model-4.pt'), progress=False)
    try:
        assert t.step == 12 and len(t.opt_ae.param_groups) == 2
        want = lr_at(cfg['trainer']['schedule'], 12, 14, base_lr=cfg['trainer']['lr'], min_lr=cfg['trainer']['min_lr'], power=cfg['trainer']['power'], warmup_steps=cfg['trainer']['warmup_steps'])
        assert opt_ae['param_groups'][0]['lr'] != pytest.approx(want)     # upstream's own schedule stored another rate
        assert [g['lr'] for g in t.opt_ae.param_groups] == pytest.approx([want] * 2)   # both groups (logvar's new): the config's schedule at step 12
        s = t.fit()
    finally: t.lock.release()
    assert s['step'] == 14

def test_final_checkpoint_when_steps_are_not_a_multiple_of_the_interval(tmp_path):
    "5 steps saved every 2: model-1 (step 2), model-2 (step 4) and a final model-3 (step 5)."
    s = train(tiny(**{'trainer.train_num_steps': 5, 'trainer.save_and_sample_every': 2, 'model.lossconfig.disc_start': 3,
                      'trainer.warmup_steps': 1}), tmp_path/'run', progress=False)
    assert [(n, load(p)['step']) for n, p in list_checkpoints(tmp_path/'run')] == [(1, 2), (2, 4), (3, 5)]
    assert s['last_checkpoint'].endswith('model-3.pt') and (tmp_path/'run'/'sample-3.png').exists()

def mixed_precision_run(tmp_path, mode, **changes):
    "4 steps (GAN on from step 2) under `mode`; the metrics records."
    train(tiny(**{'trainer.mixed_precision': mode, 'trainer.train_num_steps': 4, 'trainer.save_and_sample_every': 2,
                  'model.lossconfig.disc_start': 2, 'trainer.warmup_steps': 1, **changes}), tmp_path/mode, progress=False)
    return [json.loads(l) for l in (tmp_path/mode/'metrics.jsonl').read_text().splitlines() if '"train/nll_loss"' in l]

def test_bf16_training_on_cpu(tmp_path):
    "bf16 autocast on the CPU: the discriminator's output is bf16-rounded, the losses finite, both optimizers step."
    recs = mixed_precision_run(tmp_path, 'bf16')
    assert [r['step'] for r in recs] == [0, 1, 2, 3]
    for r in recs: assert all(math.isfinite(r[k]) for k in ('train/nll_loss', 'train/kl_loss', 'train/total_loss', 'grad_norm_ae'))
    g = torch.tensor([r['train/g_loss'] for r in recs])
    assert torch.equal(g.to(torch.bfloat16).double(), g.double())          # autocast really ran in bf16
    assert all(math.isfinite(r['grad_norm_disc']) for r in recs[2:])       # the GAN trained after disc_start

def test_auto_precision_is_printed_and_recorded(tmp_path, monkeypatch, capsys):
    "mixed_precision: auto follows the CPU's flags (faked both ways); the choice and reason go to stderr, config.yaml and the log."
    from radiodiff_vae import distributed
    for flags, mode, text in ((['avx2', 'avx512_bf16'], 'bf16', 'precision: bf16 autocast (auto: the CPU has avx512_bf16)'),
                              (['avx2', 'fma'], 'no', 'precision: fp32 (auto: the CPU has neither amx_bf16 nor avx512_bf16, so fp32)')):
        monkeypatch.setattr(distributed, 'read_cpu_flags', lambda flags=flags: flags)
        out = tmp_path/mode
        t = Trainer(resolve_config(tiny(**{'trainer.mixed_precision': 'auto'})), out, progress=False)
        assert t.precision[0] == mode and t.acc.mixed_precision == mode
        t.logs.close(); t.lock.release()
        assert text in capsys.readouterr().err
        assert (out/'config.yaml').read_text().splitlines()[0] == f'# session 0: {text}'
        assert f'[Precision] {text}' in next(out.glob('*.log')).read_text()
        assert resolve_config(tiny())['trainer']['mixed_precision'] is None     # unset: fp32 (upstream's fp16: true reads as fp16)

@pytest.mark.parametrize('mode,lpips', [('default', False), ('reduce-overhead', True)])
def test_compiled_step_equals_eager_on_cpu(tmp_path, mode, lpips):
    "trainer.compile (any mode; LPIPS compiled too): the same losses as eager on the first steps (GAN on from step 1), the same checkpoint keys."
    changes = {'trainer.train_num_steps': 2, 'trainer.save_and_sample_every': 2, 'model.lossconfig.disc_start': 1, 'trainer.warmup_steps': 1,
               'model.lossconfig.perceptual_weight': 1.0 if lpips else 0.0}
    eager = mixed_precision_run(tmp_path/'eager', 'fp32', **changes)
    compiled = mixed_precision_run(tmp_path/'compiled', 'fp32', **changes, **{'trainer.compile': mode})
    keys = ('train/total_loss', 'train/nll_loss', 'train/rec_loss', 'train/kl_loss', 'train/g_loss', 'train/d_weight', 'train/disc_loss', 'train/logits_real')
    for e, c in zip(eager, compiled, strict=True):
        for k in keys:
            if k in e: assert math.isclose(e[k], c[k], rel_tol=1e-4, abs_tol=1e-6), (e['step'], k, e[k], c[k])
    a, b = load(tmp_path/'eager'/'fp32'/'model-1.pt'), load(tmp_path/'compiled'/'fp32'/'model-1.pt')
    assert a['model'].keys() == b['model'].keys() and a['loss'].keys() == b['loss'].keys()

@pytest.mark.skipif(not torch.cuda.is_available(), reason='fp16 needs a CUDA GPU (the config refuses fp16 on the CPU)')
def test_fp16_training_with_skip_nonfinite_on_gpu(tmp_path):
    "fp16 with the grad scaler and trainer.max_nonfinite_skips: 4 steps run (the scaler may skip overflowing steps itself)."
    recs = mixed_precision_run(tmp_path, 'fp16', **{'trainer.max_nonfinite_skips': 100})
    assert [r['step'] for r in recs] == [0, 1, 2, 3] and all(math.isfinite(r['train/nll_loss']) for r in recs)

def fp16_scaler_on_cpu(monkeypatch, init_scale=2.0**24):
    "Emulate a CUDA fp16 run on the CPU: accelerate's fp16 autocast and a real torch GradScaler (accelerate makes one only on GPUs)."
    make = tr.make_accelerator
    def fp16_accelerator(t, mixed=None):
        acc = make(t, 'fp16')
        acc.native_amp, acc.scaler = True, torch.amp.GradScaler('cpu', init_scale=init_scale)
        return acc
    monkeypatch.setattr(tr, 'make_accelerator', fp16_accelerator)

@pytest.mark.parametrize('skip_nonfinite', [False, True])
def test_fp16_overflow_is_left_to_the_grad_scaler(tmp_path, monkeypatch, skip_nonfinite):
    """fp16 with a grad scaler (emulated on the CPU) whose first scale overflows the gradients: the scaler skips those
    updates and lowers its scale, the run logs it and goes on. Before the fix the autoencoder's NaN gradient norm reached
    the discriminator's check: the run stopped ("non-finite loss at step 0: grad_norm_ae = nan") or, with
    skip_nonfinite, skipped the batch."""
    fp16_scaler_on_cpu(monkeypatch)
    recs = mixed_precision_run(tmp_path, 'fp32', **{'trainer.max_nonfinite_skips': 100 if skip_nonfinite else 0})
    assert [r['step'] for r in recs] == [0, 1, 2, 3]
    g = torch.tensor([r['train/g_loss'] for r in recs])
    assert torch.equal(g.half().double(), g.double())                        # autocast really ran in fp16
    assert 'grad_norm_ae' in recs[0] and recs[0]['grad_norm_ae'] is None     # the overflowing step (NaN, written null)
    log = next((tmp_path/'fp32').glob('*.log')).read_text()
    assert '[Scaler] step 0: fp16 gradients of the autoencoder overflowed' in log and '[Skip]' not in log
    scale = load(tmp_path/'fp32'/'model-2.pt')['scaler']['scale']
    assert scale < 2.0**24 and not list((tmp_path/'fp32').glob('nonfinite-*.json'))

def test_one_fp16_overflow_halves_the_scale_once(tmp_path, monkeypatch):
    """A real GradScaler (on the CPU) in the trainer's call order, one overflow injected into the autoencoder's gradients
    (step 2) and one into the discriminator's (step 4): each halves the scale once, 4 -> 2 -> 1 (a small first scale: this
    tiny model's own gradients overflow fp16 at 1024), and the [Scaler] line names the scale the run goes on with. Before
    the fix clipping unscaled both optimizers, so the other one's gradients reached the next update again: 4 -> 1 at
    step 2, then 1 -> 0.5 at step 4 and -> 0.25 at step 5."""
    fp16_scaler_on_cpu(monkeypatch, init_scale=4.0)
    t = Trainer(resolve_config(tiny(**{'model.lossconfig.disc_start': 1, 'trainer.train_num_steps': 6, 'data.val_maps': 0})),
                tmp_path/'fp16', progress=False)
    poison = {2: t.ae.encoder.conv_in.weight, 4: t.loss.discriminator.main[0].weight}
    for step, p in poison.items(): p.register_hook(lambda g, step=step: g * math.inf if t.step == step else g)
    scales = []
    try:
        for _ in range(6):
            t.train_step(); scales.append(t.acc.scaler.get_scale()); t.step += 1
    finally: t.logs.close(); t.lock.release()
    assert scales == [4, 4, 2, 2, 1, 1]
    lines = [l for l in t.logs.text_path.read_text().splitlines() if '[Scaler]' in l]
    assert [l[l.index('[Scaler]'):] for l in lines] == [
        '[Scaler] step 2: fp16 gradients of the autoencoder overflowed; the grad scaler skipped this update and lowered its scale to 2',
        '[Scaler] step 4: fp16 gradients of the discriminator overflowed; the grad scaler skipped this update and lowered its scale to 1']

def test_gradient_clipping_clips_before_the_step(tmp_path):
    "The gradient the optimizer sees has norm <= grad_clip_norm, while the logged (pre-clip) norm is larger."
    cfg = resolve_config(tiny(**{'trainer.grad_clip_norm': 1e-3, 'trainer.train_num_steps': 3, 'model.lossconfig.disc_start': 1, 'trainer.save_and_sample_every': 3}))
    t = Trainer(cfg, tmp_path/'clip', progress=False)
    seen, inner = [], t.opt_ae.optimizer.step
    def step(*a, **k):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.ae_params if p.grad is not None])).item())
        return inner(*a, **k)
    t.opt_ae.optimizer.step = step
    try: t.fit()
    finally: t.lock.release()
    logged = [json.loads(l)['grad_norm_ae'] for l in (tmp_path/'clip'/'metrics.jsonl').read_text().splitlines() if 'grad_norm_ae' in l]
    assert len(seen) == 3 and all(n <= 1e-3 * 1.001 for n in seen) and all(n > 1e-2 for n in logged)

class HostReads(TorchDispatchMode):
    "Counts the host's reads of tensor values (`.item()`, `bool()`, `float()`, `.tolist()`): on a GPU each waits for it."
    def __init__(self, ignored):
        super().__init__(); self.ignored, self.n = ignored, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.ignored(): self.n += 1
        return func(*args, **(kwargs or {}))
    def __enter__(self):
        self.tolist = torch.Tensor.tolist      # the CPU's tolist reads memory without dispatching: count it here
        def counted(t): self.n += 1; return self.tolist(t)
        torch.Tensor.tolist = counted
        return super().__enter__()
    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)

def test_a_step_reads_the_device_once_per_update(tmp_path):
    "One host read per optimizer update (losses and gradient norm together); none in the forward (the adaptive weight's cap)."
    cfg = resolve_config(tiny(**{'trainer.log_freq': 4, 'model.lossconfig.disc_start': 2, 'trainer.train_num_steps': 8}))
    t = Trainer(cfg, tmp_path/'reads', progress=False)
    counters = lambda: {s['step'].data_ptr() for o in (t.opt_ae, t.opt_disc) for s in o.state.values() if 'step' in s}
    reads = []   # AdamW's step counters live on the CPU (fused: beside the weights, unread): not waits for the device
    try:
        for _ in range(6):
            with HostReads(counters) as h: t.train_step()
            reads.append(h.n); t.step += 1
    finally: t.lock.release()
    # step 0: logged, GAN off (AE update + D's logged values); 1: AE update only; 2-5: both updates (4: also logged)
    assert reads == [2, 1, 2, 2, 2, 2], reads

def test_fused_adamw_matches_and_resumes_across_kernels(tmp_path):
    "The fused AdamW (what a CUDA run uses) steps like the default one; a checkpoint of either loads into the other."
    cfg = resolve_config(tiny())
    t = Trainer(cfg, tmp_path/'fused', progress=False)
    try:
        plain = tr.build_optimizers(t.ae, t.loss, t.t)[0]
        for p in t.ae_params: p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in t.ae_params]
        plain.step(); after_plain = [p.detach().clone() for p in t.ae_params]
        for p, b in zip(t.ae_params, before): p.data.copy_(b)
        fused = tr.build_optimizers(t.ae, t.loss, t.t, fused=True)[0]
        fused.step()
        assert all(g['fused'] for g in fused.param_groups) and not any(g['fused'] for g in plain.param_groups)
        for a, b in zip(after_plain, t.ae_params): torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)
        checkpoints.load_optimizer(plain, fused.state_dict(), 'fused.pt', 'opt_ae', extra_group=False)
        assert not any(g['fused'] for g in plain.param_groups)     # the machine's kernel, not the writer's
        checkpoints.load_optimizer(fused, plain.state_dict(), 'plain.pt', 'opt_ae', extra_group=False)
        assert all(g['fused'] for g in fused.param_groups)
        plain.step(); fused.step()                                  # both still step after the swap
    finally: t.lock.release()

@pytest.mark.parametrize('learn', [True, False])
def test_logvar_moves_only_when_learnable(tmp_path, learn):
    # logvar starts at 1, away from its optimum (log of the per-pixel loss, about 0 on these maps), where the
    # sign of its gradient would be left to the batches' noise
    t = Trainer(resolve_config(tiny(**{'trainer.learn_logvar': learn, 'trainer.train_num_steps': 3, 'model.lossconfig.disc_start': 1, 'trainer.lr': 1e-2,
                                       'trainer.save_and_sample_every': 3, 'model.lossconfig.logvar_init': 1.0})), tmp_path/'lv', progress=False)
    before = t.loss.logvar.detach().clone()
    try: t.fit()
    finally: t.lock.release()
    assert (abs(t.loss.logvar.item() - before.item()) > 1e-4) == learn

def test_gradient_accumulation_and_loader_workers(tmp_path):
    "gradient_accumulate_every 2 (upstream's setting) with num_workers 2: two batches per step, the run completes."
    s = train(tiny(**{'trainer.gradient_accumulate_every': 2, 'data.num_workers': 2, 'trainer.train_num_steps': 3,
                      'trainer.save_and_sample_every': 3, 'model.lossconfig.disc_start': 1}), tmp_path/'ga', progress=False)
    ck = load(tmp_path/'ga'/'model-1.pt')
    assert s['step'] == 3 and ck['data_state']['batches_drawn'] == 6
    assert ck['opt_disc']['state'], 'the discriminator optimizer stepped'

def test_changed_lr_on_resume_takes_effect(straight, tmp_path, capsys):
    "--resume PATH with a lower trainer.lr: the resumed step runs at the new schedule's rate (it kept the old one)."
    out, _ = straight
    cfg = resolve_config(tiny(**{'trainer.lr': 2e-4, 'trainer.train_num_steps': 14, 'trainer.save_and_sample_every': 7}))
    t = Trainer(cfg, tmp_path/'lower', resume=str(out/'model-4.pt'), progress=False)
    try:
        T = cfg['trainer']
        want = lr_at(T['schedule'], 12, 14, base_lr=2e-4, min_lr=T['min_lr'], power=T['power'], warmup_steps=T['warmup_steps'])
        assert t.step == 12 and all(g['lr'] == pytest.approx(want) for g in t.opt_ae.param_groups)
        t.fit()
    finally: t.lock.release()
    assert 'replaced by the config' in capsys.readouterr().err

@pytest.mark.parametrize('change', [{'trainer.train_num_steps': 200}, {'trainer.min_lr': 1e-4}])
def test_changed_schedule_on_resume_takes_effect_at_the_resumed_step(tmp_path, change):
    """A cosine run of 100 steps checkpointed at step 60, resumed with 200 steps (or another min_lr; both allowed on
    resume): every group's rate is the new schedule's at step 60 from the first resumed step. Before the fix the rates
    were re-derived only when the base rates differed, so step 60 ran at the old schedule's 3.64e-4 instead of 8.05e-4."""
    base = {'trainer.train_num_steps': 100, 'trainer.save_and_sample_every': 50, 'data.val_maps': 0}
    t = Trainer(resolve_config(tiny(**base)), tmp_path/'run', progress=False)
    for _ in range(60): t.sched_ae.step(); t.sched_disc.step()
    t.step = t.batches_drawn = 60
    torch.save(checkpoints.checkpoint_state(t), tmp_path/'step60.pt'); t.logs.close(); t.lock.release()
    cfg = resolve_config(tiny(**{**base, **change}))
    r = Trainer(cfg, tmp_path/'resumed', resume=str(tmp_path/'step60.pt'), progress=False)
    r.logs.close(); r.lock.release()
    T = cfg['trainer']
    want = lr_at('cosine', 60, T['train_num_steps'], base_lr=T['lr'], min_lr=T['min_lr'], warmup_steps=T['warmup_steps'])
    old = lr_at('cosine', 60, 100, base_lr=T['lr'], min_lr=1e-5, warmup_steps=T['warmup_steps'])
    assert abs(want - old) > 1e-5
    assert [g['lr'] for g in r.opt_ae.param_groups + r.opt_disc.param_groups] == pytest.approx([want] * 3, rel=1e-12)
    assert r.sched_ae.get_last_lr() == pytest.approx([want] * 2, rel=1e-12)

def test_changed_lr_in_the_same_folder_takes_effect_and_is_recorded(tmp_path):
    "--resume latest in the same folder with a lower lr: accepted (it was refused), the new rate from the resumed step, the change in config_history.jsonl and the log; a change of the experiment is still refused."
    out = tmp_path/'run'
    train(TINY, out, progress=False, stop_at=6)
    with pytest.raises(RunFolderError, match='model.lossconfig.kl_weight'):
        train(tiny(**{'model.lossconfig.kl_weight': 1e-3}), out, progress=False, resume='latest')
    cfg = resolve_config(tiny(**{'trainer.lr': 2e-4}))
    t = Trainer(cfg, out, resume='latest', progress=False)
    try:
        T = cfg['trainer']
        want = lr_at(T['schedule'], 6, T['train_num_steps'], base_lr=2e-4, min_lr=T['min_lr'], power=T['power'], warmup_steps=T['warmup_steps'])
        assert t.step == 6 and all(g['lr'] == pytest.approx(want) for g in t.opt_ae.param_groups)
        t.fit()
    finally: t.lock.release()
    history = [json.loads(l) for l in (out/'config_history.jsonl').read_text().splitlines()]
    assert [(h['session'], h['start_step'], h['changed']) for h in history] == [(0, 0, {}), (1, 6, {'trainer.lr': [1e-3, 2e-4]})]
    assert history[1]['precision'] == 'no' and history[1]['resumed_from'].endswith('model-2.pt')
    assert any('[Config] trainer.lr: 0.001 -> 0.0002 from step 6' in p.read_text() for p in out.glob('*.log'))

def test_upstream_switches(straight, tmp_path):
    """trainer.upstream_faithful, one switch for upstream's three details: idle discriminator steps, the EMA's copy phase,
    %.5f losses (before issue 29 three keys). And model.ckpt_path initialises from the EMA weights where the checkpoint
    holds them, as upstream (before: from its raw weights unless model.ckpt_weights=ema)."""
    out, _ = straight
    common = {'trainer.train_num_steps': 3, 'trainer.save_and_sample_every': 3, 'model.lossconfig.disc_start': 3}
    params = {}
    for idle in (False, True):
        t = Trainer(resolve_config(tiny(**common, **{'trainer.upstream_faithful': idle})), tmp_path/f'idle{idle}', progress=False)
        before = [p.detach().clone() for p in t.disc_params]
        t.fit(); t.lock.release()
        params[idle] = [(b, p.detach()) for b, p in zip(before, t.disc_params)]
        if idle:    # upstream's EMA is a copy of the weights for its first 100 steps
            assert all(torch.equal(e, m) for e, m in zip(t.ema.ema_model.state_dict().values(), t.ae.state_dict().values()))
    assert all(torch.equal(b, p) for b, p in params[False])                        # no update before disc_start
    assert all(p.norm() < b.norm() for b, p in params[True] if b.norm() > 0)       # weight decay shrank every weight
    line = next(l for l in next((tmp_path/'idleTrue').glob('*.log')).read_text().splitlines() if '[Train Step] 0/3' in l)
    assert re.search(r'train/total_loss: -?\d+\.\d{5}, ', line), line
    ck = load(out/'model-4.pt')
    torch.save({'model': ck['model']}, tmp_path/'weights-only.pt')
    ema = {k[len('ema_model.'):]: v for k, v in ck['ema'].items() if k.startswith('ema_model.')}
    for path, source in ((out/'model-4.pt', ema), (tmp_path/'weights-only.pt', ck['model'])):
        t = Trainer(resolve_config(tiny(**{'model.ckpt_path': str(path)})), tmp_path/f'init-{path.stem}', progress=False)
        t.logs.close(); t.lock.release()
        assert all(torch.equal(v, source[k]) for k, v in t.ae.state_dict().items()), path
    assert not torch.equal(ck['model']['decoder.conv_out.weight'], ck['ema']['ema_model.decoder.conv_out.weight'])

class UpstreamEMA:
    """Upstream's EMA wrapper's rule (the `EMA` of the ema-pytorch package its trainer makes with beta=0.995, every
    10 steps; update_after_step=100, inv_gamma=1, power=2/3, min_value=0), written out independently of ours."""
    def __init__(self, model, beta=0.995, update_after_step=100, update_every=10, power=2 / 3):
        self.ema_model, self.beta, self.after, self.every, self.power = copy.deepcopy(model), beta, update_after_step, update_every, power
        self.step, self.initted = 0, False
    def copy_from(self, model):
        for e, p in zip(self.ema_model.parameters(), model.parameters()): e.data.copy_(p.data)
    def get_current_decay(self):
        epoch = max(self.step - self.after - 1, 0)
        return 0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** -self.power, 0.0), self.beta)
    def update(self, model):       # called once after every optimizer step
        step = self.step; self.step += 1
        if step % self.every: return
        if step <= self.after: self.copy_from(model); return
        if not self.initted: self.copy_from(model); self.initted = True
        decay = self.get_current_decay()
        for e, p in zip(self.ema_model.parameters(), model.parameters()): e.data.lerp_(p.data, 1 - decay)

def test_upstream_ema_is_upstreams_rule_past_step_111():
    """trainer.upstream_faithful's EMA against upstream's rule on a drifting model for 400 steps: equal at every step. Before the fix
    ours averaged from the step-101 copy at step 111 (decay 0.798) where upstream copies again (its `initted` flag): 2.9
    apart at step 111. The flag is saved, and a state of an earlier version (which always wrote initted=True) resumed
    inside the copy phase still copies at step 111."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ours, ref = EMA(model, 0.995, 10, upstream=True), UpstreamEMA(model)
    for step in range(1, 401):
        with torch.no_grad():
            for p in model.parameters(): p.add_(0.1 + 0.05 * torch.randn_like(p))
        ours.update(model, step); ref.update(model)
        gap = max(float((a - b).abs().max()) for a, b in zip(ours.ema_model.parameters(), ref.ema_model.parameters()))
        assert gap <= 1e-5, (step, gap)
        if step in (105, 200):          # resume from the saved state; at 105 as an earlier version wrote it
            sd = ours.state_dict()
            assert bool(sd['initted']) == (step == 200)
            if step == 105: sd['initted'] = torch.tensor(True)
            ours = EMA(model, 0.995, 10, upstream=True); ours.load_state_dict(sd)

def test_radiomapseer_held_out_maps_follow_the_folders_size(tmp_path):
    """The maps scored at each checkpoint come from the split of the folder's own map count (make_data.json's n), like the
    training maps. Before the fix they came from the 700-map split: with 20 maps in the folder, ids past 20 (missing files)."""
    import numpy as np
    from PIL import Image
    from radiodiff_vae.data import radiomapseer_split
    root = tmp_path/'rms'
    (root/'gain'/'DPM').mkdir(parents=True)
    for m in range(1, 21): Image.fromarray(np.full((8, 8), m, np.uint8)).save(root/'gain'/'DPM'/f'{m}_0.png')
    (root/'make_data.json').write_text(json.dumps({'n': 20, 'num_tx': 1}))
    data = resolve_config({'data': {'source': 'radiomapseer', 'root': str(root), 'size': 8, 'num_tx': 1, 'val_maps': 3}})['data']
    train_ds, val_ds = stream.build_datasets(data)
    assert val_ds.maps == radiomapseer_split('test', 20)[:3] and not set(val_ds.maps) & set(train_ds.maps)

def test_trainer_maps_are_the_data_spec_factorys(tmp_path):
    """The trainer's synthetic training and held-out maps are, tensor for tensor, the maps `dataset_from_spec` gives for
    `synthetic:n_maps` from map 0 and `synthetic:val_maps` from map n_maps (one factory: a seed, side or generator setting
    read differently by the trainer than by evaluation and studies would fail here)."""
    from radiodiff_vae.data_spec import dataset_from_spec
    cfg = tiny(**{'data.n_maps': 5, 'data.val_maps': 2, 'data.data_seed': 11, 'data.synthetic': {'park_prob': 0.3, 'tx_lo': 0.3}})
    t = Trainer(cfg, tmp_path/'run', progress=False)
    t.logs.close(); t.lock.release()
    for ds, spec, offset in ((t.train_ds, 'synthetic:5', 0), (t.val_ds, 'synthetic:2', 5)):
        ref = dataset_from_spec(spec, cfg, offset=offset)[0]
        assert len(ds) == len(ref) and all(a['name'] == b['name'] and torch.equal(a['image'], b['image']) for a, b in zip(ds, ref))

def test_map_cache_is_budgeted_across_data_workers(tmp_path, monkeypatch, capsys):
    """Each DataLoader worker keeps its own map cache: with 4 workers reading every map, the caches together stay within
    the budget (here 64 KiB: the 12 training maps of 4 KiB fit once, not 4 times), and the start says what they hold.
    Before the fix every worker cached every map: 4 x 48 KiB."""
    monkeypatch.setattr(stream, 'MAP_CACHE_BYTES', 2**16)
    data = resolve_config(tiny(**{'data.n_maps': 12, 'data.num_workers': 4}))['data']
    train_ds, val_ds = stream.build_datasets(data)
    workers = [copy.deepcopy(train_ds) for _ in range(4)]    # what each worker process gets, then reads every map of
    for w in workers:
        for i in range(len(w)): w[i]
    for _ in range(2): val_ds[0]; val_ds[1]                       # the held-out maps: in the main process only
    held = sum(len(getattr(ds, 'cache', {})) for ds in workers + [val_ds]) * 32 * 32 * 4
    assert 0 < held <= 2**16
    t = Trainer(resolve_config(tiny(**{'data.n_maps': 12, 'data.num_workers': 2})), tmp_path/'run', progress=False)
    t.logs.close(); t.lock.release()
    note = 'map cache: 7 of the 12 training maps (the others are made again at each use), 28 KB in each of 2 data workers, 56 KB in all'
    assert note in capsys.readouterr().err and f'[Data] {note}' in t.logs.text_path.read_text()

def test_quickstart_trains_with_steps_alone(tmp_path, capsys):
    """`radiodiff-vae train --config configs/quickstart.yaml --steps 6` and nothing else: the warm-up, GAN start, finishing
    phase, checkpoint and log intervals scaled to 6 steps, printed, and recorded (config.yaml, log, config_history.jsonl).
    Before, --steps 40 failed on trainer.warmup_steps, then on data.finish_steps."""
    config = Path(__file__).resolve().parent.parent/'configs'/'quickstart.yaml'
    assert tr.main(['--config', str(config), '--steps', '6', '--out', str(tmp_path/'qs'), '--no-progress']) == 0
    scaled = ('trainer.train_num_steps 1188 -> 6, trainer.warmup_steps 60 -> 0, model.lossconfig.disc_start 1050 -> 5, '
              'data.finish.steps 108 -> 1, trainer.save_and_sample_every 594 -> 3, trainer.log_freq 10 -> 1')
    assert f'steps: {scaled}' in capsys.readouterr().err
    out = tmp_path/'qs'
    assert f'[Steps] {scaled}' in next(out.glob('*.log')).read_text()
    history = json.loads((out/'config_history.jsonl').read_text().splitlines()[0])
    assert history['steps_scaled']['model.lossconfig.disc_start'] == [1050, 5]
    ck = load(out/'model-2.pt')
    assert ck['step'] == 6 and ck['config']['data']['finish']['steps'] == 1 and ck['config']['trainer']['warmup_steps'] == 0
    assert '[Finish] step 5: the last 1 steps train on the same maps at 192x192, 1 per batch' in next(out.glob('*.log')).read_text()

def test_upstream_only_keys_are_noted_at_start(tmp_path, capsys):
    "A config holding a key of upstream's files only (latent-diffusion's monitor) trains, and says at start that it is read and not used."
    cfg = tiny(**{'trainer.train_num_steps': 1, 'model.lossconfig.disc_start': 1, 'trainer.warmup_steps': 0, 'data.val_maps': 0})
    train(cfg | {'model': cfg['model'] | {'monitor': 'val/rec_loss'}}, tmp_path/'run', progress=False)
    note = 'model.monitor: val/rec_loss read and not used: '
    assert f'note: {note}' in capsys.readouterr().err and f'[Config] {note}' in next((tmp_path/'run').glob('*.log')).read_text()
    assert 'monitor' not in (tmp_path/'run'/'config.yaml').read_text()

def test_bad_input_is_clear(tmp_path):
    with pytest.raises(ConfigError, match='not found'): train(tmp_path/'nope.yaml', tmp_path/'x')
    with pytest.raises(ConfigError, match='trainer.lrate'): train(with_raw('trainer', 'lrate', 1), tmp_path/'x')
    with pytest.raises(ConfigError, match='trainer.lr'): train(with_raw('trainer', 'lr', 'fast'), tmp_path/'x')
    with pytest.raises(CheckpointError, match='model-7.pt'): train(TINY, tmp_path/'x', resume=7, progress=False)
    assert not (tmp_path/'x').exists()

def test_cli_exit_codes(tmp_path, capsys):
    assert tr.main(['--config', str(tmp_path/'missing.yaml')]) == 2
    assert 'missing.yaml' in capsys.readouterr().err
    from radiodiff_vae.cli import main as cli_main
    assert cli_main(['train', '--config', 'configs/quickstart.yaml', '--set', 'trainer.bogus=1']) == 2
    assert 'trainer.bogus' in capsys.readouterr().err

def test_checkpoint_of_another_process_count(straight, tmp_path):
    """A checkpoint of 2 processes resumes on 1: the discriminator's BatchNorm uses the global batch (before issue 29 only
    with trainer.sync_batchnorm: true); dropout, which draws per process, is still refused."""
    out, _ = straight
    ck = load(out/'model-2.pt'); ck['world_size'] = 2; torch.save(ck, tmp_path/'two.pt')
    s = train(TINY, tmp_path/'b', resume=str(tmp_path/'two.pt'), progress=False, stop_at=7)
    assert s['start_step'] == 6 and s['step'] == 7
    ck['config']['model']['ddconfig']['dropout'] = 0.1; torch.save(ck, tmp_path/'two-dropout.pt')
    with pytest.raises(CheckpointError, match=r'written by 2 processes, resumed on 1.*dropout.*--num_processes 2'):
        train(tiny(**{'model.ddconfig.dropout': 0.1}), tmp_path/'a', resume=str(tmp_path/'two-dropout.pt'), progress=False)

def test_frozen_discriminator(tmp_path):
    "trainer.train_discriminator: false: the discriminator's weights never move, the GAN term is still on."
    cfg = tiny(**{'trainer.train_discriminator': False, 'trainer.train_num_steps': 4, 'model.lossconfig.disc_start': 1,
                  'trainer.save_and_sample_every': 4, 'data.val_maps': 0})
    t = Trainer(resolve_config(cfg), tmp_path/'frozen', progress=False)
    before = {k: v.clone() for k, v in t.loss.discriminator.named_parameters()}
    t.fit()
    assert all(torch.equal(v, dict(t.loss.discriminator.named_parameters())[k]) for k, v in before.items())
    recs = [json.loads(l) for l in (tmp_path/'frozen'/'metrics.jsonl').read_text().splitlines() if 'train/g_loss' in l]
    assert recs[-1]['train/disc_factor'] == 1.0 and recs[-1]['grad_norm_disc'] is None and recs[-1]['train/d_weight'] > 0

def test_checkpoints_load_with_weights_only(straight):
    "Every checkpoint (RNG states included) is tensors and plain values: torch.load(weights_only=True) reads it."
    out, _ = straight
    for p in out.glob('model-*.pt'):
        ck = torch.load(p, weights_only=True)
        assert isinstance(ck['rng'][0]['numpy'][1], torch.Tensor) and ck['version'] == checkpoints.CHECKPOINT_VERSION


def test_wsd_schedule_drives_the_optimizers_and_the_analysis(tmp_path):
    "A run with `schedule: wsd` steps with lr_at('wsd', ...) at every step, and the log analysis rebuilds that curve from the run's config."
    from radiodiff_vae.analysis import training_params
    from radiodiff_vae.loss_analysis import schedule_lr
    kw = dict(base_lr=1e-3, min_lr=1e-5, warmup_steps=2, decay_fraction=0.25)
    out = tmp_path/'wsd'
    train(tiny(**{'trainer.schedule': 'wsd', 'trainer.decay_fraction': 0.25}), out, progress=False)
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    lrs = {r['step']: r['lr_ae'] for r in recs if 'train/total_loss' in r}
    want = [lr_at('wsd', s, 12, **kw) for s in range(12)]
    assert [lrs[s] for s in range(12)] == pytest.approx(want, rel=1e-9)
    assert want[2:10] == [1e-3] * 8 and want[11] < want[10] < 1e-3      # held, then the last 3 steps fall
    config = load(out/'model-4.pt')['config']
    assert schedule_lr(range(12), training_params(config)) == pytest.approx(want, rel=1e-9)

def test_crop_in_the_main_phase_resumes_to_identical_weights(tmp_path):
    "data.crop: random 24x24 windows of the 32x32 maps; killed at step 3 and resumed, the windows are replayed: the same weights as straight through, and not those of whole maps."
    cfg = tiny(**{'data.crop': 24, 'trainer.train_num_steps': 6, 'model.lossconfig.disc_start': 2})
    sides = []
    t = Trainer(resolve_config(cfg), tmp_path/'straight', progress=False)
    t.gen.register_forward_pre_hook(lambda m, args: sides.append(args[0].shape[-1]))
    t.fit()
    assert sides == [24] * 6                         # the crop reached the model at every step
    train(cfg, tmp_path/'b', progress=False, stop_at=3)
    assert train(cfg, tmp_path/'b', progress=False, resume='latest')['start_step'] == 3
    whole = train(tiny(**{'trainer.train_num_steps': 6, 'model.lossconfig.disc_start': 2}), tmp_path/'whole', progress=False)
    a, b, c = (load(tmp_path/n/'model-2.pt') for n in ('straight', 'b', 'whole'))
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), f'model.{k} differs'
    for k in a['ema']: assert torch.equal(a['ema'][k], b['ema'][k]), f'ema.{k} differs'
    assert not torch.equal(a['model']['decoder.conv_out.weight'], c['model']['decoder.conv_out.weight'])

@pytest.fixture(scope='module')
def finishing(tmp_path_factory):
    "Uninterrupted 12-step runs whose last `k` steps train on the same maps at 64x64 (one run per k, made on first use)."
    runs = {}
    def run(k, **extra):
        key = (k, *sorted(extra.items()))
        if key not in runs:
            out = tmp_path_factory.mktemp('runs')/f'finishing{k}'
            runs[key] = out, train(tiny(**{'data.finish': {'size': 64, 'steps': k, **extra}}), out, progress=False)
        return runs[key]
    return run

# killed before the finishing phase, inside it, and at its first step (checkpoint 3 is step 9, where 3 finishing steps begin)
@pytest.mark.parametrize('k,stop', [(4, 6), (4, 9), (3, 9)])
def test_finishing_phase_resumes_to_identical_weights(finishing, tmp_path, k, stop):
    out, _ = finishing(k)
    cfg = tiny(**{'data.finish': {'size': 64, 'steps': k}})
    train(cfg, tmp_path/'b', progress=False, stop_at=stop)
    assert train(cfg, tmp_path/'b', progress=False, resume='latest')['step'] == 12
    a, b = load(out/'model-4.pt'), load(tmp_path/'b'/'model-4.pt')
    for key in ('model', 'ema'):
        for k_ in a[key]: assert torch.equal(a[key][k_], b[key][k_]), f'{key}.{k_} differs'
    logs = ''.join(p.read_text() for p in sorted((tmp_path/'b').glob('*.log')))
    assert logs.count(f'[Finish] step {12 - k}: the last {k} steps train on the same maps at 64x64, 4 per batch') == 1   # entered once, by either session

def test_finishing_phase_with_its_own_batch_resumes_to_identical_weights(finishing, tmp_path):
    "A phase with its own batch size (2 maps per step, against 4): killed inside it, the run resumes to the same weights; the rate goes on with the schedule."
    out, _ = finishing(4, batch_size=2)
    cfg = tiny(**{'data.finish': {'size': 64, 'steps': 4, 'batch_size': 2}})
    train(cfg, tmp_path/'b', progress=False, stop_at=10)
    train(cfg, tmp_path/'b', progress=False, resume='latest')
    a, b = load(out/'model-4.pt'), load(tmp_path/'b'/'model-4.pt')
    for k_ in a['model']: assert torch.equal(a['model'][k_], b['model'][k_]), f'model.{k_} differs'
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    lrs = {r['step']: r['lr_ae'] for r in recs if 'lr_ae' in r}
    assert lrs[7] > lrs[8] > lrs[9] > lrs[11]    # no restart at the phase's first step (8 of 12): the cosine falls on
    logs = ''.join(p.read_text() for p in sorted((tmp_path/'b').glob('*.log')))
    assert logs.count('[Finish] step 8: the last 4 steps train on the same maps at 64x64, 2 per batch') == 1

def test_finishing_phase_changes_the_weights_and_needs_configured_maps(finishing, straight, tmp_path):
    a, b = load(finishing(4)[0]/'model-4.pt'), load(straight[0]/'model-4.pt')
    assert not torch.equal(a['model']['decoder.conv_out.weight'], b['model']['decoder.conv_out.weight'])
    c = load(finishing(4)[0]/'model-2.pt'), load(straight[0]/'model-2.pt')   # step 6: before the phase, the same run
    assert all(torch.equal(c[0]['model'][k], c[1]['model'][k]) for k in c[0]['model'])
    assert a['ema']['updates'] == 4 and b['ema']['updates'] == 12     # the EMA's warm-up restarted at the phase's first step
    with pytest.raises(ConfigError, match='finishing phase needs the configured maps'):
        train(tiny(**{'data.finish': {'size': 64, 'steps': 4}}), tmp_path/'c', progress=False, dataset=[])
