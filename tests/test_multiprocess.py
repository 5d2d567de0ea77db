"""Two processes on the CPU (gloo) under `accelerate launch --multi_gpu`, as a user starts them: the launch itself,
world-size invariance (2 processes x batch/2 = 1 process x batch), exact resume on 2 processes, resume on another
process count, a NaN on one process only, and the gradient as the mean (not the sum) over processes."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest, torch
from radiodiff_vae.trainer import train
from radiodiff_vae.stream import BatchStream
from radiodiff_vae.config import load_config, tiny_config, dump_config

SETS = ('data.n_maps=32', 'data.val_maps=2', 'data.batch_size=4', 'trainer.lr=0.001', 'trainer.min_lr=0.00001', 'trainer.schedule=cosine',
        'trainer.train_num_steps=10', 'trainer.save_and_sample_every=5', 'trainer.ema_update_every=1', 'trainer.learn_logvar=true')
CONFIG = dump_config(tiny_config(*SETS))   # the tiny run, 32 maps of 32x32 in batches of 4, 10 steps, the GAN on from step 2
LOSSES = ('train/total_loss', 'train/rec_loss', 'train/nll_loss', 'train/kl_loss', 'train/g_loss', 'train/d_weight',
          'train/disc_loss', 'train/logits_real', 'train/logits_fake', 'grad_norm_ae')

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def launch(args, cwd, timeout=240, n=2):
    "`accelerate launch --multi_gpu` of `args` as a user types it: a free port, no ACCELERATE_USE_CPU, no CUDA."
    env = {k: v for k, v in os.environ.items() if not k.startswith('ACCELERATE_')}
    env.update(CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(n), '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(free_port()), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

def cli_train(cfg, out, *extra):
    return ['-m', 'radiodiff_vae.cli', 'train', '--config', cfg, '--out', out, '--no-progress', *extra]

def load(p): return torch.load(p, map_location='cpu', weights_only=True)

def records(out):
    return {r['step']: r for r in map(json.loads, (Path(out)/'metrics.jsonl').read_text().splitlines()) if 'train/total_loss' in r}

def rel_l2(a: dict, b: dict) -> float:
    "Relative L2 distance of two state dicts (float tensors only)."
    keys = [k for k, v in a.items() if v.is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    return (num / sum(float(a[k].double().pow(2).sum()) for k in keys)) ** 0.5

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The config file and an uninterrupted 2-process run of 10 steps, launched through the CLI."
    d = tmp_path_factory.mktemp('mp')
    (d/'cfg.yaml').write_text(CONFIG)
    r = launch(cli_train(d/'cfg.yaml', d/'two'), d)
    return d, r

def test_cli_launch_writes_once(runs):
    "The launch that failed 3 times in 4: without ACCELERATE_USE_CPU every process believed it was process 0."
    d, r = runs
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = d/'two'
    assert r.stdout.count('"out_dir"') == 1                       # one summary: only process 0 prints it
    assert len(list(out.glob('*_.log'))) == 1 and sorted(records(out)) == list(range(10))
    lines = next(out.glob('*_.log')).read_text().splitlines()
    assert sum('[Train Step]' in l for l in lines) == 2 * 10
    assert sorted(p.name for p in out.glob('model-*.pt')) == ['model-1.pt', 'model-2.pt'] and not list(out.glob('.*.tmp'))
    ck = load(out/'model-2.pt')
    assert ck['world_size'] == 2 and len(ck['rng']) == 2 and ck['data_state']['batches_drawn'] == 10 and ck['step'] == 10

def test_world_size_invariance(runs):
    "1 process with batch 4 = 2 processes with 2 maps each: losses and weights, GAN on from step 2 (BatchNorm over the global batch)."
    d, r = runs
    assert r.returncode == 0, r.stderr[-3000:]
    one = train(load_config(d/'cfg.yaml'), d/'one', progress=False)
    assert one['processes'] == 1
    a, b = records(d/'one'), records(d/'two')
    for step in range(10):
        for k in LOSSES:
            if a[step].get(k) is None: continue
            tol = 1e-5 if step == 0 else 1e-3
            assert abs(a[step][k] - b[step][k]) <= tol * max(abs(a[step][k]), 1e-3), (step, k, a[step][k], b[step][k])
    ca, cb = load(d/'one'/'model-2.pt'), load(d/'two'/'model-2.pt')
    assert rel_l2(ca['model'], cb['model']) <= 1e-3 and rel_l2(ca['loss'], cb['loss']) <= 1e-3
    assert a[9]['train/disc_factor'] == 1.0 and a[9]['grad_norm_disc'] is not None   # the GAN did train

def test_exact_resume_on_two_processes(runs):
    "Killed after a checkpoint (stop at 5) and resumed on 2 processes: bit for bit the uninterrupted 2-process run."
    d, _ = runs
    for extra in (['--stop-at', '5'], ['--resume', 'latest']):
        r = launch(cli_train(d/'cfg.yaml', d/'resumed', *extra), d)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = load(d/'two'/'model-2.pt'), load(d/'resumed'/'model-2.pt')
    for key in ('model', 'loss', 'ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]: assert torch.equal(a[key][k], b[key][k]), f'{key}.{k} differs'
    for opt in ('opt_ae', 'opt_disc'):
        for pid, st in a[opt]['state'].items():
            for k, v in st.items(): assert torch.equal(v, b[opt]['state'][pid][k]), f'{opt} {pid}.{k}'
    assert a['lr_scheduler_ae'] == b['lr_scheduler_ae'] and a['data_state'] == b['data_state']
    assert all(torch.equal(x['torch'], y['torch']) for x, y in zip(a['rng'], b['rng']))
    assert b['session'] == 1

def test_resume_two_process_checkpoint_on_one(runs):
    "The run does not depend on the process count (BatchNorm over the global batch): 2 -> 1 process continues the same run."
    d, _ = runs
    s = train(load_config(d/'cfg.yaml'), d/'two-to-one', resume=str(d/'two'/'model-1.pt'), progress=False)
    assert s['start_step'] == 5 and s['step'] == 10
    a, b = load(d/'two'/'model-2.pt'), load(d/'two-to-one'/'model-2.pt')
    assert rel_l2(a['model'], b['model']) <= 1e-3 and rel_l2(a['loss'], b['loss']) <= 1e-3

def two_against_one(d, name, sets):
    "A 6-step run with `sets` on 2 processes (launched through the CLI) and on 1: their records and final checkpoints."
    sets = ['trainer.train_num_steps=6', 'trainer.save_and_sample_every=3', *sets]
    r = launch(cli_train(d/'cfg.yaml', d/f'{name}-two', *[a for s in sets for a in ('--set', s)]), d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    train(load_config(d/'cfg.yaml', sets), d/f'{name}-one', progress=False)
    return (records(d/f'{name}-one'), records(d/f'{name}-two'), load(d/f'{name}-one'/'model-2.pt'), load(d/f'{name}-two'/'model-2.pt'),
            next((d/f'{name}-two').glob('*_.log')).read_text())

def assert_same_run(one, two, ca, cb):
    "The same losses at every step (up to float summation order) and nearly the same weights."
    assert sorted(one) == sorted(two) == list(range(6))
    for step in range(6):
        for k in LOSSES:
            if one[step].get(k) is None: continue
            assert abs(one[step][k] - two[step][k]) <= 1e-3 * max(abs(one[step][k]), 1e-3), (step, k, one[step][k], two[step][k])
    assert rel_l2(ca['model'], cb['model']) <= 1e-3 and rel_l2(ca['ema'], cb['ema']) <= 1e-3

def test_crop_on_two_processes(runs):
    "data.crop in the main phase: each process cuts its maps' windows by their places in the global batch, so 2 processes train what 1 does."
    one, two, ca, cb, _ = two_against_one(runs[0], 'crop', ['data.crop=24'])
    assert_same_run(one, two, ca, cb)
    train(load_config(runs[0]/'cfg.yaml', ['trainer.train_num_steps=6', 'trainer.save_and_sample_every=3']), runs[0]/'crop-whole', progress=False)
    assert rel_l2(load(runs[0]/'crop-whole'/'model-2.pt')['model'], cb['model']) > 1e-3     # the windows changed the run

def test_finishing_phase_on_two_processes(runs):
    "A finishing phase (the last 2 of 6 steps on 64x64 maps, one per process): entered once, at the same step, with the same result as on 1 process."
    one, two, ca, cb, log = two_against_one(runs[0], 'finish', ['data.finish={size: 64, steps: 2, batch_size: 2}'])
    assert_same_run(one, two, ca, cb)
    assert log.count('[Finish] step 4: the last 2 steps train on the same maps at 64x64, 2 per batch') == 1

WORKER = '''
import json, sys, torch
from pathlib import Path
from accelerate.utils import gather_object
from radiodiff_vae.config import load_config
from radiodiff_vae.trainer import Trainer
cfg_path, out, bad = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))

# 1. plain SGD on the decoder's last layer: the synchronised gradient is the mean of the processes' own gradients
cfg = load_config(cfg_path, ['model.lossconfig.disc_start=9'])
t = Trainer(cfg, out + '-sgd', progress=False)
x, eps, _ = t._next_batch()
p = t.ae.decoder.conv_out.weight
own = torch.autograd.grad(t.acc.unwrap_model(t.gen)(x, eps, 0, False)[0], p)[0]
grads = torch.stack(gather_object([own]))
loss = t.gen(x, eps, 0, False)[0]
t.acc.backward(loss)
w0 = p.detach().clone(); torch.optim.SGD([p], lr=1.0).step()
Path(f'{out}-sgd-rank{t.rank}.json').write_text(json.dumps({'rank': t.rank, 'mean': torch.allclose(p.grad, grads.mean(0), atol=1e-7, rtol=1e-5),
      'sum': torch.allclose(p.grad, grads.sum(0), atol=1e-7, rtol=1e-5), 'step': torch.allclose(w0 - p.detach(), grads.mean(0), atol=1e-6, rtol=1e-5),
      'differ': not torch.allclose(grads[0], grads[1])}))   # a file: two processes' prints interleave on one pipe
if t.main: t.logs.close(); t.lock.release()

# 2. a NaN in the maps of process 1 only, at step 2
class Poisoned(torch.utils.data.Dataset):
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        item = dict(self.ds[i])
        if i in bad: item['image'] = item['image'] * float('nan')
        return item
t = Trainer(load_config(cfg_path), out, progress=False)
t.train_ds = Poisoned(t.train_ds); t._open_stream()
t.fit()
'''

def test_nan_on_one_process_stops_all_and_gradient_is_the_mean(runs):
    d, _ = runs
    (d/'worker.py').write_text(WORKER)
    cfg = load_config(d/'cfg.yaml')
    bad = BatchStream(cfg['data']['n_maps'], cfg['data']['batch_size'], cfg['trainer']['seed'], rank=1, world=2).batch(2)
    r = launch([d/'worker.py', d/'cfg.yaml', d/'nan', json.dumps(bad)], d, timeout=240)   # a hang would time out
    sgd = [json.loads((d/f'nan-sgd-rank{i}.json').read_text()) for i in range(2) if (d/f'nan-sgd-rank{i}.json').exists()]
    assert len(sgd) == 2 and all(s['mean'] and s['step'] and s['differ'] and not s['sum'] for s in sgd), r.stdout + r.stderr[-3000:]
    assert r.returncode != 0
    assert r.stderr.count('NonFiniteLossError: non-finite loss at step 2') == 2, r.stderr[-4000:]
    diag = json.loads((d/'nan'/'nonfinite-step2.json').read_text())
    assert diag['step'] == 2 and {f'{i}_0' for i in bad} <= set(diag['batch']) and len(diag['batch']) == 4
    assert '[Stop] step 2' in next((d/'nan').glob('*_.log')).read_text()
