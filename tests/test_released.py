"""The released models (MODEL.md: the current one, v2; MODEL-v1.md): the shipped weights load safely, match their cards, v2 beats v1 on the same maps, and `released` works as a checkpoint name."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from radiodiff_vae.cli import main
from radiodiff_vae.core import CheckpointError, pretrained_path, repo_dir
from radiodiff_vae.data import unscale_gain
from radiodiff_vae.data_spec import dataset_from_spec
from radiodiff_vae.evaluation import map_metrics
from radiodiff_vae.formats import release_record
from radiodiff_vae.model import load_checkpoint, reconstruct
from radiodiff_vae import pretrained
from radiodiff_vae.pretrained import build_release, export_release, load_pretrained, score_model
from radiodiff_vae.config import resolve_config, tiny_config
from radiodiff_vae.trainer import train

CARD, RECORD = repo_dir() / 'MODEL.md', pretrained_path('released').with_suffix('.json')    # the current release
RELEASES = {'released-v2': ('MODEL.md', 'released-v2_run'), 'released-v1': ('MODEL-v1.md', 'released_run')}   # card, run logs
SUBSET = range(8)


def card_record(name: str = 'released') -> dict:
    return release_record(name)


def test_released_weights_load_with_the_safe_loader_in_fp16_under_25_mb():
    path = pretrained_path('released')
    assert path.stat().st_size < 25 * 2**20
    state = torch.load(path, weights_only=True)      # raises if the file needs the unsafe unpickler
    assert {v.dtype for v in state['model'].values() if v.is_floating_point()} == {torch.float16}
    assert state['config']['model']['ddconfig']['ch_mult'] == [1, 2, 4]      # f = 4: 3x64x64 latents for 256x256 maps
    model = load_pretrained()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.encode(torch.zeros(1, 1, 256, 256)).mode().shape == (1, 3, 64, 64)


@pytest.mark.parametrize('name', RELEASES)
def test_released_real_map_psnr_matches_the_card_within_0_1_db_on_a_subset(name):
    model, real = load_pretrained(name), dataset_from_spec('real')[0]
    x = torch.stack([real[i]['image'] for i in SUBSET])
    psnr = map_metrics(unscale_gain(reconstruct(model, x)), unscale_gain(x))['psnr'].numpy()
    per_map = card_record(name)['per_map']['real']
    assert [real[i]['name'] for i in SUBSET] == [per_map[i]['name'] for i in SUBSET]
    card_subset = np.array([per_map[i]['mode_psnr'] for i in SUBSET])
    assert abs(psnr.mean() - card_subset.mean()) < 0.1
    np.testing.assert_allclose(psnr, card_subset, atol=0.1)


@pytest.mark.parametrize('name', RELEASES)
def test_the_card_states_the_measured_numbers(name):
    rec, card = card_record(name), (repo_dir() / RELEASES[name][0]).read_text()
    real = rec['metrics']['real']['metrics']['mode']
    assert f"{real['psnr']['mean']:.2f} [{real['psnr']['ci_low']:.2f}, {real['psnr']['ci_high']:.2f}]" in card
    assert f"{rec['latents']['scale_factor']:.4f}" in card
    assert np.isclose(np.mean([m['mode_psnr'] for m in rec['per_map']['real']]), real['psnr']['mean'])
    assert len(rec['per_map']['real']) == 26
    assert load_pretrained(name).release['chosen_step'] == rec['chosen_step']


@pytest.mark.parametrize('name', RELEASES)
def test_the_chosen_step_was_chosen_by_the_recorded_synthetic_maps_not_the_real_ones(name):
    rec = card_record(name)
    spec, n_real = rec['selection_spec'], rec['metrics']['real']['n_maps']
    assert spec.startswith('synthetic:') and f'({spec}:' in rec['selection_label']
    n_spec = int(spec.split(':')[1])
    assert {r['n_maps'] for r in rec['selection']} == {n_spec} and n_spec != n_real     # scored on those maps, not on the 26 real ones
    real_by_step = {r['step']: r['psnr'] for r in rec['real_curve_table']}
    assert all(abs(r['psnr'] - real_by_step[r['step']]) > 1e-6 for r in rec['selection'])   # another curve than the real maps'
    best_synthetic = max(rec['selection'], key=lambda r: r['psnr'])
    assert best_synthetic['step'] == rec['chosen_step']
    assert f"chosen on `{spec}`" in (repo_dir() / RELEASES[name][0]).read_text()


def test_released_v1_stays_loadable_by_its_own_name():
    v1, v2, current = load_pretrained('released-v1'), load_pretrained('released-v2'), load_pretrained('released')
    assert v1.release['weights_sha256'] == card_record('released-v1')['weights_sha256'] != current.release['weights_sha256']
    assert v2.release['weights_sha256'] == card_record('released-v2')['weights_sha256'] == current.release['weights_sha256']


def test_v2_beats_v1_on_the_real_maps_held_out_from_every_choice():
    "Issue 32's bar: paired over the same maps, interval above zero, mean >= 36.5 dB; v1's side is v1's own record."
    c, v1 = card_record('released-v2')['comparison'], card_record('released-v1')
    assert c['baseline'] == 'released-v1' and c['paired']['ci_low'] > 0 and c['new_mean'] >= 36.5
    assert [m['baseline'] for m in c['per_map']] == [m['mode_psnr'] for m in v1['per_map']['real']]
    assert [m['new'] for m in c['per_map']] == [m['mode_psnr'] for m in card_record('released-v2')['per_map']['real']]
    assert f"paired difference {c['paired']['mean']:+.2f} dB [{c['paired']['ci_low']:+.2f}, {c['paired']['ci_high']:+.2f}]" in CARD.read_text()


def test_a_release_whose_weights_differ_from_its_record_is_refused(tmp_path):
    models = tmp_path / 'models'; models.mkdir()
    shutil.copy(RECORD, models / 'released.json')
    state = torch.load(pretrained_path('released'), weights_only=True)
    edited = state | {'model': {k: v * 1.05 for k, v in state['model'].items()}}
    torch.save(edited, models / 'released.pt')
    with pytest.raises(CheckpointError, match='are not the ones its own release record describes'):
        load_pretrained(models / 'released.pt')
    torch.save(edited | {'release': {k: v for k, v in state['release'].items() if k != 'weights_sha256'}}, models / 'released.pt')
    with pytest.raises(CheckpointError, match='are not the ones .*released.json describes'):     # the record beside it
        load_pretrained(models / 'released.pt')
    torch.save(state, models / 'released.pt')
    assert load_pretrained(models / 'released.pt').release['weights_sha256'] == card_record()['weights_sha256']


def test_release_select_real_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / 'run').mkdir()      # a run folder, so that the shared argument checks pass and --select is what is refused
    assert main(['release', str(tmp_path / 'run'), '--select', 'real', '--out', str(tmp_path / 'repo')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'must never choose it' in err
    assert not (tmp_path / 'repo').exists()


def test_released_is_a_checkpoint_name_for_evaluate(tmp_path, capsys):
    assert main(['evaluate', '--checkpoint', 'released', '--data', 'real', '--limit', '2', '--out', str(tmp_path / 'ev'),
                 '--no-progress']) == 0
    summary = json.loads(next((tmp_path / 'ev').rglob('summary.json')).read_text())
    assert 'released' in json.dumps(summary['checkpoint'])
    assert load_checkpoint('released')['release']['chosen_step'] > 0


def test_a_file_that_is_not_a_release_is_refused_by_load_pretrained(tmp_path):
    with pytest.raises(CheckpointError, match='no such checkpoint file'):
        load_pretrained(tmp_path / 'missing.pt')
    evil = tmp_path / 'evil.pt'
    torch.save({'model': {}, 'x': subprocess.Popen}, evil)
    with pytest.raises(CheckpointError, match='refused to load'):
        load_pretrained(evil)


@pytest.mark.slow
def test_build_release_on_a_tiny_run_writes_a_consistent_card(tmp_path, monkeypatch):
    # f = 8 (ch_mult [1, 2, 4, 4]): the mid block's attention on a real 256x256 map spans 32x32 latent positions, not
    # 64x64 (16x less work in each of the 26 real maps' scorings; what is checked does not depend on the architecture)
    cfg = tiny_config('model.ddconfig.ch_mult=[1,2,4,4]', 'model.lossconfig.disc_start=4', 'model.lossconfig.disc_ndf=16',
                      'data.size=64', 'data.crop=32', 'data.n_maps=16', 'data.val_maps=4', 'data.batch_size=4',
                      'trainer.train_num_steps=8', 'trainer.save_and_sample_every=4', 'trainer.log_freq=4', 'trainer.lr=1e-3',
                      'trainer.min_lr=1e-5', 'trainer.schedule=cosine', 'trainer.ema_update_every=1', 'trainer.num_threads=null')
    # The first 6 of the 26 bundled real maps: what is checked (one card, record, weights and figures of one chosen
    # checkpoint; a killed release leaves the first whole) holds for any number of maps, and 6 still give the real-maps
    # figure three different maps (worst, median, best); the released model's own 26 are checked in test_released_*.
    def first_real_maps(spec, *args, **kw):
        dataset, info = dataset_from_spec(spec, *args, **kw)
        return (torch.utils.data.Subset(dataset, range(6)), info) if spec == 'real' else (dataset, info)
    monkeypatch.setattr(pretrained, 'dataset_from_spec', first_real_maps)
    scored = {}
    def recorded(model, cfg, spec, **kw):           # the last scores per data spec: the chosen model's, at the end
        scored[spec] = score_model(model, cfg, spec, **kw); return scored[spec]
    monkeypatch.setattr(pretrained, 'score_model', recorded)
    train(cfg, tmp_path / 'run', progress=False)
    r = build_release(tmp_path / 'run', tmp_path / 'repo', select_spec='synthetic:4', card_spec='synthetic:4:1', progress=False)
    card = (tmp_path / 'repo' / 'MODEL.md').read_text()
    assert 'random 32x32 windows' in card and f"checkpoint of step {r['chosen_step']} is released" in card
    assert torch.load(tmp_path / 'repo' / 'models' / 'released.pt', weights_only=True)['release']['chosen_step'] == r['chosen_step']
    assert len(r['per_map']['real']) == 6 and len(set(r['per_map']['real'][i]['name'] for i in range(6))) == 6
    for name in ('released_checkpoints.png', 'released_real_maps.png'):
        assert (tmp_path / 'repo' / 'figures' / name).stat().st_size > 10_000
    with pytest.raises(Exception, match='over the 0.001 MB limit'):
        export_release(tmp_path / 'run' / 'model-2.pt', tmp_path / 'big.pt', max_mb=0.001)
    # killed while writing a second release (its card): the first stays whole (weights, record and card of one model).
    # The second release reuses the first one's scores (the slow part: 26 real maps per model) and scores other card maps.
    scores = {}
    def cached(run, spec, weights='ema', progress=True):
        return scores.setdefault((spec, weights), r['selection_table'] if spec == 'synthetic:4' else r['real_table'])
    r['selection_table'] = pd.DataFrame(r['selection']); r['real_table'] = pd.DataFrame(r['real_curve_table'])
    monkeypatch.setattr(pretrained, 'checkpoint_scores', cached)
    monkeypatch.setattr(pretrained, 'score_model', lambda model, cfg, spec, **kw: scored['real'] if spec == 'real' else score_model(model, cfg, spec, **kw))
    monkeypatch.setattr(pretrained, 'plot_reconstructions', lambda *a, **kw: pretrained.plot_checkpoint_curves(
        r['selection_table'], r['real_table'], r['chosen_step']))   # its real-maps figure: drawn already (decodes), not the point here
    before = {p: p.read_bytes() for p in (tmp_path / 'repo').rglob('*') if p.is_file()}
    def killed(record): raise KeyboardInterrupt
    monkeypatch.setattr(pretrained, 'model_card', killed)
    with pytest.raises(KeyboardInterrupt):
        build_release(tmp_path / 'run', tmp_path / 'repo', select_spec='synthetic:4', card_spec='synthetic:3:1', progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / 'repo').rglob('*') if p.is_file()} == before
    assert not list((tmp_path / 'repo').glob('.release-*'))
    assert load_pretrained(tmp_path / 'repo' / 'models' / 'released.pt').release['chosen_step'] == r['chosen_step']


@pytest.mark.parametrize('name', RELEASES)
def test_every_card_fact_comes_from_the_runs_config(name):
    import yaml
    from radiodiff_vae.pretrained import card_facts, model_card
    rec = card_record(name)
    assert model_card(rec) == (repo_dir() / RELEASES[name][0]).read_text()
    cfg = resolve_config(yaml.safe_load((repo_dir() / 'models' / RELEASES[name][1] / 'config.yaml').read_text()))
    cfg['model']['ddconfig']['attn_resolutions'] = [16]
    cfg['model']['lossconfig']['perceptual_weight'] = 1.0
    cfg['trainer']['schedule'] = 'constant'
    cfg['data']['size'] = 128
    card = model_card(rec | {'card_facts': card_facts(cfg, 'raw')})
    assert 'the raw (not averaged) weights in float16' in card and 'the EMA weights' not in card
    assert 'attention in the mid block and at resolutions [16]' in card and 'attention in the mid block only' not in card
    assert 'LPIPS term with weight 1.0' in card and 'no LPIPS term' not in card.lower()
    assert 'constant schedule' in card and 'cosine' not in card
    assert '1x128x128 path-gain map <-> a 3x32x32 latent' in card
