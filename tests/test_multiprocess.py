"Two processes on the CPU (gloo) through `accelerate launch --multi_gpu`: files written once, identical weights."
import hashlib, json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch

CONFIG = '''
model:
  ddconfig: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, resolution: 32}
  lossconfig: {disc_start: 2, perceptual_weight: 0.0, lpips_pretrained: false, disc_ndf: 8}
data: {source: synthetic, size: 32, n_maps: 16, val_maps: 2, batch_size: 4}
trainer: {lr: 0.001, min_lr: 0.00001, schedule: cosine, train_num_steps: 4, save_and_sample_every: 2, log_freq: 1,
          ema_update_every: 1, tensorboard: false, num_threads: 1, learn_logvar: true}
'''

# each process trains, then writes a digest of every tensor it holds (weights, discriminator incl. BatchNorm buffers)
WORKER = '''
import hashlib, json, sys, torch
from radiodiff_vae.trainer import Trainer
from radiodiff_vae.config import load_config
cfg, out = sys.argv[1], sys.argv[2]
t = Trainer(load_config(cfg), out, progress=False)
summary = t.fit()
def digest(sd): return hashlib.sha256(b''.join(v.detach().cpu().contiguous().numpy().tobytes() for _, v in sorted(sd.items()))).hexdigest()
json.dump({'rank': t.rank, 'world': t.world, 'ae': digest(t.ae.state_dict()), 'loss': digest(t.loss.state_dict()),
           'step': summary['step'], 'finite': all(bool(torch.isfinite(v).all()) for v in t.ae.state_dict().values())},
          open(f'{out}/rank{t.rank}.json', 'w'))
'''

def test_two_processes_gloo(tmp_path):
    (tmp_path/'cfg.yaml').write_text(CONFIG)
    (tmp_path/'worker.py').write_text(WORKER)
    out = tmp_path/'run'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', str(tmp_path/'worker.py'), str(tmp_path/'cfg.yaml'), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out/f'rank{i}.json').read_text()) for i in range(2)]
    assert [r['world'] for r in ranks] == [2, 2] and all(r['step'] == 4 and r['finite'] for r in ranks)
    assert ranks[0]['ae'] == ranks[1]['ae'] and ranks[0]['loss'] == ranks[1]['loss']
    logs = list(out.glob('*_.log'))
    assert len(logs) == 1
    lines = logs[0].read_text().splitlines()
    assert sum('[Train Step]' in l for l in lines) == 2 * 4 and sum(l.count('{') > 0 and "'model'" in l for l in lines) == 1
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    train_recs = [r for r in recs if 'train/total_loss' in r]
    assert [r['step'] for r in train_recs] == [0, 1, 2, 3]
    assert all(r[k] is not None for r in train_recs for k in ('train/total_loss', 'train/disc_loss', 'train/rec_loss'))
    assert sorted(p.name for p in out.glob('model-*.pt')) == ['model-1.pt', 'model-2.pt'] and not list(out.glob('.*.tmp'))
    ck = torch.load(out/'model-2.pt', map_location='cpu', weights_only=False)
    assert ck['world_size'] == 2 and len(ck['rng']) == 2 and ck['data_state']['batches_drawn'] == 4
