"""Derived quantities against values computed independently here, the report outputs, and the CLI."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from radiodiff_vae.analysis import (UPSTREAM_RADIODIFF_CONFIG, analyze_run, debiased_ema, d_weight_clamp, logvar_movement,
                                    phases, pixels_per_image, steps_and_gaps, training_params, write_analysis)
from radiodiff_vae.core import ConfigError, reference_run_dir
from radiodiff_vae.logs import read_run


def synthetic_table(n=200, every=100, pixels=48 * 48, disc_start=5001, seed=0, pause_after=None):
    "A run table as upstream would log it: 5-decimal values, consistent loss composition."
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1) * every
    rec = np.round(rng.uniform(0.005, 0.05, n), 5)
    nll = np.round(rec * pixels, 5)
    kl = np.round(rng.uniform(1e5, 2e5, n), 5)
    g = np.round(rng.normal(-0.45, 0.05, n), 5)
    fac = (steps >= disc_start).astype(float)
    dw = np.where(rng.random(n) < 0.2, np.round(rng.uniform(100, 4000, n), 5), 5000.0)
    total = np.round(nll + 1e-6 * kl + dw * fac * g, 5)
    seconds = np.arange(n) * 20.0
    if pause_after is not None: seconds[pause_after:] += 3600
    t = pd.Timestamp('2025-01-01') + pd.to_timedelta(seconds, unit='s')
    df = pd.DataFrame({'train/total_loss': total, 'train/logvar': 0.0, 'train/kl_loss': kl, 'train/nll_loss': nll,
                       'train/rec_loss': rec, 'train/d_weight': dw, 'train/disc_factor': fac, 'train/g_loss': g,
                       'lr': 0.0, 'timestamp': t}, index=pd.Index(steps, name='step'))
    return df


def config(**trainer):
    cfg = json.loads(json.dumps(UPSTREAM_RADIODIFF_CONFIG))
    cfg['model']['lossconfig']['disc_start'] = 5001
    cfg['trainer'].update(trainer)
    return cfg


def test_debiased_ema_matches_a_plain_loop():
    x = np.array([3.0, np.nan, 1.0, np.inf, 2.0, 5.0])
    s, m, n, expected = 0.7, 0.0, 0, []
    for v in x:
        if not np.isfinite(v): expected.append(np.nan); continue
        n += 1; m = s * m + (1 - s) * v; expected.append(m / (1 - s ** n))
    np.testing.assert_allclose(debiased_ema(x, s), expected, equal_nan=True)
    with pytest.raises(ConfigError): debiased_ema(x, -0.1)


def test_pixels_per_image_recovers_the_map_size():
    df = synthetic_table(pixels=48 * 48)
    px = pixels_per_image(df, training_params(config()))
    assert px['pixels'] == 2304 and px['square_side'] == 48 and px['config_pixels'] == 320 * 320
    ratios = df['train/nll_loss'] / df['train/rec_loss']
    assert px['bound_low'] <= 2304 <= px['bound_high'] and abs(px['median'] - ratios.median()) < 1e-9


def test_phases_follow_disc_factor_and_check_the_config():
    df = synthetic_table()
    ph = phases(df, training_params(config()))
    assert [(p['first_step'], p['last_step'], p['rows']) for p in ph['phases']] == [(100, 5000, 50), (5100, 20000, 150)]
    assert ph['consistent_with_config'] is True and ph['first_logged_on'] == 5100
    cfg = config(); cfg['model']['lossconfig']['disc_start'] = 4801
    wrong = phases(df, training_params(cfg))
    assert wrong['consistent_with_config'] is False and wrong['rows_disagreeing_with_config'] == 2   # steps 4900, 5000


def test_learning_rate_is_recomputed_where_the_log_shows_zero():
    df = synthetic_table()
    a, table = analyze_run(df, {'sources': ['x'], 'kinds': ['text'], 'records': 200, 'skipped_lines': 0}, config(train_num_steps=20000))
    steps = table.index.to_numpy()
    expected = [5e-6 * max(max(1 - s / 20000, 0) ** 0.95, 5e-7) for s in steps]
    np.testing.assert_allclose(table['lr_recomputed'], expected, rtol=1e-12)
    assert a['learning_rate']['rows_zero_or_missing'] == 200 and a['learning_rate']['log_print_step'] == 1e-5
    assert a['learning_rate']['floor'] == pytest.approx(5e-6 * 5e-7)
    assert any('lr column is zero at all 200 rows' in s for s in a['statements'])


def test_d_weight_clamp_logvar_and_kl_weight():
    df = synthetic_table()
    p = training_params(config())
    c = d_weight_clamp(df, p)
    at = df['train/d_weight'] == 5000.0
    on = df['train/disc_factor'] > 0
    assert c['clamp'] == 5000.0 and c['rows_at_clamp'] == at.sum()
    assert c['fraction_at_clamp_adversarial'] == pytest.approx(at[on].mean())
    assert logvar_movement(df)['moved'] is False
    moved = df.copy(); moved.loc[moved.index[-1], 'train/logvar'] = -0.01
    assert logvar_movement(moved)['moved'] is True
    a, _ = analyze_run(df, {}, config())
    assert a['loss_composition']['implied_kl_weight'] == pytest.approx(1e-6, rel=1e-3)
    adv = (df['train/d_weight'] * df['train/disc_factor'] * df['train/g_loss'])[on].mean()
    assert a['loss_composition']['mean_adversarial_term'] == pytest.approx(adv)


def test_throughput_and_pauses():
    df = synthetic_table(pause_after=120)
    st = steps_and_gaps(df)
    assert st['log_interval'] == 100 and st['step_gaps'] == []
    assert [(g['after_step'], g['next_step'], g['seconds']) for g in st['time_gaps']] == [(12000, 12100, 3620.0)]
    assert st['throughput']['median_steps_per_hour'] == pytest.approx(100 / 20 * 3600)
    assert st['throughput']['hours_in_gaps'] == pytest.approx(3620 / 3600)
    gappy = df.drop(index=[3000, 3100])
    assert steps_and_gaps(gappy)['step_gaps'] == [{'after_step': 2900, 'next_step': 3200}]


def test_nan_and_inf_are_counted():
    df = synthetic_table(n=20)
    df.loc[300, 'train/g_loss'] = np.inf; df.loc[400, 'train/g_loss'] = np.nan; df.loc[500, 'train/kl_loss'] = -np.inf
    a, _ = analyze_run(df, {}, config())
    g = a['metrics']['train/g_loss']
    assert (g['pos_inf'], g['missing_or_nan'], g['first_nonfinite_step']) == (1, 1, 300)
    assert a['metrics']['train/kl_loss']['neg_inf'] == 1
    assert g['mean'] == pytest.approx(df['train/g_loss'][np.isfinite(df['train/g_loss'])].mean())
    assert any(s.startswith('Infinite values: train/kl_loss 1, train/g_loss 1') for s in a['statements'])


def test_reference_run_derivations_match_pandas():
    raw = pd.read_csv(reference_run_dir() / 'training_data_parsed.csv')
    df, info = read_run(reference_run_dir())
    a, _ = analyze_run(df, info, UPSTREAM_RADIODIFF_CONFIG)
    assert a['pixels_per_image']['pixels'] == 256 * 256
    assert a['d_weight']['rows_at_clamp'] == int((raw['train/d_weight'] == 5000.0).sum())
    assert a['phases']['first_logged_on'] == int(raw.loc[raw['train/disc_factor'] > 0, 'step'].min())
    dt = pd.to_datetime(raw['timestamp']).diff().dt.total_seconds().iloc[1:] / raw['step'].diff().iloc[1:]
    assert a['steps']['throughput']['median_steps_per_hour'] == pytest.approx(3600 / dt.median())
    assert a['metrics']['train/rec_loss']['final'] == raw['train/rec_loss'].iloc[-1]
    assert a['metrics']['train/total_loss']['min'] == raw['train/total_loss'].min()


def _write_upstream_log(folder, disc_start, n=60, seed=0):
    df = synthetic_table(n=n, disc_start=disc_start, seed=seed)
    cfg = config(train_num_steps=n * 100); cfg['model']['lossconfig']['disc_start'] = disc_start
    lines = ['2025-01-01 00:00:00,000 ' + repr(cfg)]
    for step, r in df.iterrows():
        t = r['timestamp'].strftime('%Y-%m-%d %H:%M:%S') + ',000'
        body = ''.join(f'{k}: {r[k]:.5f}, ' for k in df.columns if k != 'timestamp')
        lines.append(f'{t} [Train Step] {step}/{n * 100}: {body}')
        lines.append(f'{t} [Train Step] {step}/{n * 100}: train/disc_loss: 0.50000, lr: 0.00000, ')
    folder.mkdir()
    (folder / '2025-01-01-00-00_.log').write_text('\n'.join(lines) + '\n')
    return df


def test_cli_writes_every_output_and_overlays_runs(tmp_path):
    from radiodiff_vae.cli import main
    _write_upstream_log(tmp_path / 'run_a', 2001)
    _write_upstream_log(tmp_path / 'run_b', 3001, seed=1)
    out = tmp_path / 'out'
    assert main(['analyze', str(tmp_path / 'run_a'), str(tmp_path / 'run_b'), '--out', str(out), '--smoothing', '0.6']) == 0
    names = {p.name for p in out.iterdir()}
    assert {'REPORT.md', 'training_analysis.json', 'training_data_parsed.csv', 'training_summary.txt',
            'figure_1_training_phases.png', 'figure_5_dashboard.png'} <= names
    doc = json.loads((out / 'training_analysis.json').read_text())
    assert [r['name'] for r in doc['runs']] == ['run_a', 'run_b'] and doc['aligned_by'] == 'step'
    assert [r['phases']['disc_start'] for r in doc['runs']] == [2001, 3001]     # each run's own config line
    assert all(r['pixels_per_image']['pixels'] == 2304 for r in doc['runs'])
    csv = pd.read_csv(out / 'training_data_parsed.csv')
    assert csv.groupby('run').size().to_dict() == {'run_a': 60, 'run_b': 60} and 'lr_recomputed' in csv
    report = (out / 'REPORT.md').read_text()
    assert 'Run `run_a`' in report and '![figure_1_training_phases.png](figure_1_training_phases.png)' in report
    for word in ('excellent', 'production-ready', 'radio astronomy', 'cosine'):
        assert word not in report.lower()


def test_cli_user_errors_exit_2(tmp_path, capsys):
    from radiodiff_vae.cli import main
    assert main(['analyze', str(tmp_path / 'missing.log'), '--out', str(tmp_path / 'o')]) == 2
    assert 'missing.log: no such file' in capsys.readouterr().err
    (tmp_path / 'a.log').write_text('nothing here\n')
    assert main(['analyze', str(tmp_path / 'a.log'), '--out', str(tmp_path / 'o'), '--smoothing', '1.5']) == 2
    assert main(['analyze', str(tmp_path / 'a.log'), '--out', str(tmp_path / 'o')]) == 2
    assert 'a.log: nothing parseable' in capsys.readouterr().err


def test_trainer_style_run_folder(tmp_path):
    "What the trainer writes: metrics.jsonl with a held-out-scores-only row and nulls, config.yaml, `.6g` text logs."
    run = tmp_path / 'run'; run.mkdir()
    t0, recs = 1755288000.0, []
    for i, step in enumerate(range(0, 40, 10)):
        rec = 0.5 - 0.01 * i
        recs.append({'step': step, 'total_steps': 40, 'train/total_loss': rec * 1024 + 1e-6 * 100 + (0.5 if step >= 20 else 0),
                     'train/logvar': 0.0, 'train/kl_loss': 100.0, 'train/nll_loss': rec * 1024, 'train/rec_loss': rec,
                     'train/d_weight': 1.0, 'train/disc_factor': float(step >= 20), 'train/g_loss': 0.5,
                     'grad_norm_disc': None if step < 20 else 1.0, 'lr_ae': 1e-3, 'lr_disc': 1e-3, 'wall_time': t0 + 2 * step, 'session': 0})
    recs.append({'step': 40, 'milestone': 1, 'val/psnr': 20.0, 'wall_time': t0 + 90})   # held-out scores only
    (run / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
    (run / 'config.yaml').write_text('model:\n  lossconfig:\n    disc_start: 20\n    kl_weight: 1.0e-06\n    disc_weight: 0.5\n'
                                     'trainer:\n  lr: 0.001\n  train_num_steps: 40\n  schedule: constant\n')
    df, info = read_run(run)
    a, _ = analyze_run(df, info)
    assert [(p['first_step'], p['last_step']) for p in a['phases']['phases']] == [(0, 10), (20, 30)]   # step 40 row ignored
    assert a['phases']['consistent_with_config'] is True
    assert a['metrics']['train/total_loss']['missing_or_nan'] == 0 and a['metrics']['grad_norm_disc']['missing_or_nan'] == 2
    assert a['learning_rate']['rows_zero_or_missing'] == 0 and a['learning_rate']['max_rel_deviation_logged_vs_schedule'] == 0
    assert a['pixels_per_image']['pixels'] == 1024
    # the KL term (1e-4) is below float32 rounding of a total near 500: not determinable, and said so
    assert a['loss_composition']['kl_weight_resolvable'] is False
    assert any('cannot determine the KL weight' in s for s in a['statements'])


def test_pipeline_notebook_runs_with_papermill(tmp_path):
    import papermill as pm
    from pathlib import Path
    _write_upstream_log(tmp_path / 'run', 401, n=12)
    out = tmp_path / 'out'
    nb = Path(__file__).resolve().parents[1] / 'nbs' / 'pipelines' / 'analyze.ipynb'
    pm.execute_notebook(str(nb), str(tmp_path / 'executed.ipynb'), cwd=str(tmp_path), progress_bar=False,
                        parameters=dict(inputs=[str(tmp_path / 'run')], out_dir=str(out), smoothing=0.5, config=None))
    doc = json.loads((out / 'training_analysis.json').read_text())
    assert doc['rows'] == 12 and doc['smoothing'] == 0.5 and doc['phases']['disc_start'] == 401
    assert (out / 'figure_5_dashboard.png').stat().st_size > 10_000
