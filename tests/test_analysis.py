"""Derived quantities against values computed independently here, the report's sentences, the outputs and the CLI."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radiodiff_vae.analysis import debiased_ema, phases, coverage, training_params
from radiodiff_vae.loss_analysis import d_weight_clamp, logvar_movement, pixels_per_image
from radiodiff_vae.run_analysis import analyze_run, load_runs
from radiodiff_vae.core import ConfigError, reference_run_dir
from radiodiff_vae.logs import load_config_file, read_run
from radiodiff_vae.report import describe_discriminator, describe_throughput, describe_worked_example, statements

RUN_CONFIG = load_config_file(reference_run_dir() / 'first_radio_m.yaml')


def config(disc_start=5001, **trainer):
    cfg = copy.deepcopy(RUN_CONFIG)
    cfg['model']['lossconfig']['disc_start'] = disc_start
    cfg['trainer'].update(trainer)
    return cfg


def synthetic_table(n=200, every=100, pixels=48 * 48, disc_start=5001, seed=0, pause_after=None, first=1, g_shift=0.0):
    "A run table as upstream would log it: 5-decimal values, consistent loss composition."
    rng = np.random.default_rng(seed)
    steps = (np.arange(n) + first) * every
    rec = np.round(rng.uniform(0.005, 0.05, n), 5)
    nll = np.round(rec * pixels, 5)
    kl = np.round(rng.uniform(1e5, 2e5, n), 5)
    fac = (steps >= disc_start).astype(float)
    g = np.round(rng.normal(-0.45, 0.05, n) + g_shift * fac, 5)
    dw = np.where(rng.random(n) < 0.2, np.round(rng.uniform(100, 4000, n), 5), 5000.0)
    total = np.round(nll + 1e-6 * kl + dw * fac * g, 5)
    seconds = np.arange(n) * 20.0
    if pause_after is not None: seconds[pause_after:] += 3600
    t = pd.Timestamp('2025-01-01') + pd.to_timedelta(seconds, unit='s')
    return pd.DataFrame({'train/total_loss': total, 'train/logvar': 0.0, 'train/kl_loss': kl, 'train/nll_loss': nll,
                         'train/rec_loss': rec, 'train/d_weight': dw, 'train/disc_factor': fac, 'train/g_loss': g,
                         'lr': 0.0, 'timestamp': t}, index=pd.Index(steps, name='step'))


def _write_upstream_log(folder, disc_start, n=60, seed=0, ga=2, first=1, resume_milestone=None, g_shift=0.0, every=100):
    "An upstream-format log folder; the discriminator line is written only when upstream's loop would step it (ga >= 2)."
    df = synthetic_table(n=n, disc_start=disc_start, seed=seed, first=first, g_shift=g_shift, every=every)
    total = (n + first) * every
    cfg = config(disc_start, train_num_steps=total, gradient_accumulate_every=ga, save_and_sample_every=1000,
                 resume_milestone=resume_milestone or 0)
    lines = ['2025-01-01 00:00:00,000 ' + repr(cfg)]
    for step, r in df.iterrows():
        t = r['timestamp'].strftime('%Y-%m-%d %H:%M:%S') + ',000'
        lines.append(f'{t} [Train Step] {step}/{total}: ' + ''.join(f'{k}: {r[k]:.5f}, ' for k in df.columns if k != 'timestamp'))
        if ga >= 2: lines.append(f'{t} [Train Step] {step}/{total}: train/disc_loss: 0.50000, train/logits_real: 0.10000, '
                                 'train/logits_fake: -0.10000, lr: 0.00000, ')
    folder.mkdir()
    (folder / '2025-01-01-00-00_.log').write_text('\n'.join(lines) + '\n')
    return df


def test_debiased_ema_matches_a_plain_loop():
    x = np.array([3.0, np.nan, 1.0, np.inf, 2.0, 5.0])
    s, m, n, expected = 0.7, 0.0, 0, []
    for v in x:
        if not np.isfinite(v): expected.append(np.nan); continue
        n += 1; m = s * m + (1 - s) * v; expected.append(m / (1 - s ** n))
    np.testing.assert_allclose(debiased_ema(x, s), expected, equal_nan=True)
    with pytest.raises(ConfigError): debiased_ema(x, -0.1)


def test_smoothing_restarts_at_the_gate():
    df = synthetic_table(n=100, disc_start=5001)
    runs_cfg = config(5001)
    a, table = analyze_run(df, {'kinds': ['text']}, runs_cfg)
    assert a.smoothing_restarts == [5100]
    from radiodiff_vae.run_analysis import RunData
    sm = RunData('x', table, a).smoothed(df['train/total_loss'].to_numpy(), 0.9)
    after = df['train/total_loss'][df.index >= 5100].to_numpy()
    m, expected = 0.0, []
    for i, v in enumerate(after, 1): m = 0.9 * m + 0.1 * v; expected.append(m / (1 - 0.9 ** i))
    np.testing.assert_allclose(sm[df.index >= 5100], expected)
    assert sm[df.index == 5100][0] == after[0]          # no value carried over from before the gate
    assert (sm[df.index >= 5100] < 0).all() and (sm[df.index < 5100] > 0).all()


def test_pixels_per_image_recovers_the_map_size():
    df = synthetic_table(pixels=48 * 48)
    px = pixels_per_image(df, training_params(config()))
    assert px.pixels == 2304 and px.square_side == 48 and px.config_pixels == 320 * 320
    ratios = df['train/nll_loss'] / df['train/rec_loss']
    assert px.bound_low <= 2304 <= px.bound_high and abs(px.median - ratios.median()) < 1e-9


def test_phases_follow_disc_factor_and_check_the_config():
    df = synthetic_table()
    ph = phases(df, training_params(config()), trained=False)
    assert [(p.first_step, p.last_step, p.rows) for p in ph.phases] == [(100, 5000, 50), (5100, 20000, 150)]
    assert ph.consistent_with_config is True and ph.gate_step == 5100
    assert ph.phases[1].name.startswith('autoencoder against a frozen discriminator')
    assert ph.phases[0].hours == pytest.approx(50 * 20 / 3600) and ph.phases[1].hours == pytest.approx(149 * 20 / 3600)
    wrong = phases(df, training_params(config(4801)))
    assert wrong.consistent_with_config is False and wrong.rows_disagreeing == 2   # steps 4900, 5000


def test_learning_rate_is_inferred_where_the_log_shows_zero():
    df = synthetic_table()
    a, table = analyze_run(df, {'kinds': ['text'], 'sources': ['x']}, config(train_num_steps=20000))
    expected = [5e-6 * max(max(1 - s / 20000, 0) ** 0.95, 5e-7) for s in table.index]
    np.testing.assert_allclose(table['lr_inferred'], expected, rtol=1e-12)
    lr = a.learning_rate
    assert lr.inferred and lr.rows_zero_or_missing == 200 and lr.log_print_step == 1e-5 and lr.floor == pytest.approx(5e-6 * 5e-7)
    assert "power 0.95 (hard-coded in upstream's training script)" in lr.rests_on
    assert any(s.startswith("The log's lr column is zero at all 200 rows") for s in statements(a))
    assert any(s.startswith(f'Inferred learning rate (not logged): {expected[0]:.4g}') for s in statements(a))


def test_d_weight_clamp_logvar_and_kl_weight():
    df = synthetic_table()
    c = d_weight_clamp(df, training_params(config()))
    at, on = df['train/d_weight'] == 5000.0, df['train/disc_factor'] > 0
    assert c.clamp == 5000.0 and c.rows_at_clamp == at.sum() and c.fraction_at_clamp_after_gate == pytest.approx(at[on].mean())
    assert logvar_movement(df).moved is False
    moved = df.copy(); moved.loc[moved.index[-1], 'train/logvar'] = -0.01
    assert logvar_movement(moved).moved is True
    a, _ = analyze_run(df, {}, config())
    assert a.loss_composition.implied_kl_weight == pytest.approx(1e-6, rel=1e-3)
    adv = (df['train/d_weight'] * df['train/g_loss'])[on].mean()
    assert a.loss_composition.mean_after_gate['adversarial_term'] == pytest.approx(adv)


def test_worked_example_and_its_sentence():
    df = synthetic_table()
    a, _ = analyze_run(df, {}, config())
    r = df.loc[5100]
    computed = r['train/nll_loss'] + 1e-6 * r['train/kl_loss'] + r['train/d_weight'] * r['train/g_loss']
    w = a.worked_example
    assert w.step == 5100 and w.computed_total == pytest.approx(computed) and w.logged_total == r['train/total_loss']
    assert describe_worked_example(w) == [
        f"Worked example at step 5,100: nll {r['train/nll_loss']:,.2f} + 1e-06 x KL {r['train/kl_loss']:,.0f} ({1e-6 * r['train/kl_loss']:.3f}) "
        f"+ d_weight {r['train/d_weight']:,.4g} x disc_factor 1 x g_loss {r['train/g_loss']:.4f} ({r['train/d_weight'] * r['train/g_loss']:,.2f}) "
        f"= {computed:,.2f}; the log says {r['train/total_loss']:,.2f}."]


def test_throughput_is_the_overall_rate_and_pauses_are_found():
    df = synthetic_table(pause_after=120)
    cov = coverage(df)
    assert cov.log_interval == 100 and cov.step_gaps == []
    tp = cov.throughput
    assert [(g['after_step'], g['next_step'], g['seconds']) for g in tp.pauses] == [(12000, 12100, 3620.0)]
    assert tp.steps_per_hour == pytest.approx((20000 - 100) / ((199 * 20 + 3600) / 3600))
    assert tp.steps_per_hour_excluding_pauses == pytest.approx(100 / 20 * 3600)
    assert describe_throughput(cov)[0].startswith(f'Throughput: {(20000 - 100) / ((199 * 20 + 3600) / 3600):,.0f} steps/hour overall')
    assert coverage(df.drop(index=[3000, 3100])).step_gaps == [{'after_step': 2900, 'next_step': 3200}]


def test_nan_and_inf_are_counted():
    df = synthetic_table(n=20)
    df.loc[300, 'train/g_loss'] = np.inf; df.loc[400, 'train/g_loss'] = np.nan; df.loc[500, 'train/kl_loss'] = -np.inf
    a, _ = analyze_run(df, {}, config())
    g = a.metrics['train/g_loss']
    assert (g['pos_inf'], g['missing_or_nan'], g['first_nonfinite_step']) == (1, 1, 300)
    assert a.metrics['train/kl_loss']['neg_inf'] == 1
    assert g['mean'] == pytest.approx(df['train/g_loss'][np.isfinite(df['train/g_loss'])].mean())
    assert any(s.startswith('Infinite values: train/kl_loss 1, train/g_loss 1') for s in statements(a))


@pytest.mark.parametrize('ga, trained', [(1, False), (2, True)])
def test_discriminator_trained_follows_upstream_loop(tmp_path, ga, trained):
    "gradient_accumulate_every 1: no discriminator step, no discriminator line; 2: both."
    df = _write_upstream_log(tmp_path / 'run', 2001, ga=ga, g_shift=0.0 if ga == 1 else 0.3)
    run = load_runs([tmp_path / 'run'])[0]; d = run.analysis.discriminator
    assert run.analysis.loop.name == 'upstream'
    assert (run.analysis.discriminator_trained, d.from_config, d.from_lines) == (trained, trained, trained)
    assert run.analysis.phases.phases[1].name.startswith('autoencoder against a frozen discriminator' if not trained else 'adversarial')
    on = df.index >= 2001
    from scipy import stats
    t = stats.ttest_ind(df['train/g_loss'][~on], df['train/g_loss'][on], equal_var=False)
    assert d.g_loss.welch_t == pytest.approx(t.statistic) and d.g_loss.welch_p == pytest.approx(t.pvalue)
    assert d.g_loss.mean_after == pytest.approx(df['train/g_loss'][on].mean())
    sentence = describe_discriminator(d)[2]
    assert (t.pvalue > 0.05) == ('no change detected' in sentence)
    assert describe_discriminator(d)[0].startswith('The discriminator was trained' if trained else 'The discriminator was never updated')


def _write_samples(folder, n_first=3, n_replayed=3, n_later=2, size=32, seed=0):
    "Milestones 1..n: a first session's samples, the replaying session's (same maps, slightly changed), then new maps."
    rng = np.random.default_rng(seed); maps = [rng.integers(0, 256, (size, size)) for _ in range(n_first + n_later)]
    order = maps[:n_first] + [np.clip(m + rng.integers(-3, 4, m.shape), 0, 255) for m in maps[:n_replayed]] + maps[n_first:]
    for i, m in enumerate(order, 1): Image.fromarray(m.astype(np.uint8)).convert('RGB').save(folder / f'sample-{i}.png')
    return order


def test_resume_from_config_log_start_and_replayed_samples(tmp_path):
    _write_upstream_log(tmp_path / 'run', 5001, first=30, n=50, ga=1, resume_milestone=3)   # the log begins at step 3,000
    order = _write_samples(tmp_path / 'run')
    a = load_runs([tmp_path / 'run'])[0].analysis
    assert a.resumed_from_step == 3000 and a.resumes.sources_agree is True
    assert {e.source: e.step for e in a.resumes.evidence} == {'config': 3000, 'samples': 3000, 'log start': 3000}
    reps = a.sample_repeats
    assert [(r.sample, r.repeats) for r in reps.repeats] == [(4, 1), (5, 2), (6, 3)]
    assert reps.repeats[0].mean_abs_diff == pytest.approx(np.abs(order[3].astype(float) - order[0]).mean())
    assert a.smoothing_restarts == [5100]        # the gate; the resume is where the data begin


def test_reference_run_read_with_its_own_config():
    raw = pd.read_csv(reference_run_dir() / 'training_data_parsed.csv')
    run = load_runs([reference_run_dir()])[0]; a = run.analysis
    assert a.config_source == 'data/reference_run/first_radio_m.yaml'
    assert (a.discriminator_trained, a.resumed_from_step, a.completion.last_sample_step) == (False, 35000, 150000)
    assert a.map_size.pixels == 256 * 256
    on = raw['train/disc_factor'] > 0
    assert a.phases.gate_step == int(raw.loc[on, 'step'].min())
    assert a.discriminator.g_loss.mean_before == pytest.approx(raw.loc[~on, 'train/g_loss'].mean())
    t = pd.to_datetime(raw['timestamp'])
    assert a.coverage.throughput.steps_per_hour == pytest.approx((raw['step'].iloc[-1] - raw['step'].iloc[0]) / ((t.iloc[-1] - t.iloc[0]).total_seconds() / 3600))
    w = a.worked_example; row = raw.set_index('step').loc[50100]
    assert w.logged_total == row['train/total_loss']
    assert w.computed_total == pytest.approx(row['train/nll_loss'] + 1e-6 * row['train/kl_loss'] + 5000 * row['train/g_loss'])
    assert a.metrics['train/total_loss']['min'] == raw['train/total_loss'].min()



def test_committed_reference_report_is_the_generators_text():
    "reports/reference_run/REPORT.md holds what the generator writes today, with the g_loss test worded to what it can tell."
    from radiodiff_vae.report import run_section
    a = load_runs([reference_run_dir()])[0].analysis
    committed = (reference_run_dir().parent.parent / 'reports' / 'reference_run' / 'REPORT.md').read_text(encoding='utf-8')
    assert run_section(a) in committed, 'reports/reference_run is stale: radiodiff-vae analyze data/reference_run --out reports/reference_run'
    g_sentence = describe_discriminator(a.discriminator)[2]
    assert 'as expected of a discriminator that does not learn' not in committed
    assert 'only weakly: a frozen one still pushes the autoencoder' in g_sentence        # no change does not single out a frozen D
    assert 'treat the rows as independent draws' in g_sentence and 'lag-1 autocorrelation' in g_sentence
    assert 'randomly initialised discriminator) is an inference' in committed

def test_cli_writes_every_output_and_overlays_runs(tmp_path):
    from radiodiff_vae.cli import main
    _write_upstream_log(tmp_path / 'run_a', 2001)
    _write_upstream_log(tmp_path / 'run_b', 3001, seed=1, ga=1)
    out = tmp_path / 'out'
    assert main(['analyze', str(tmp_path / 'run_a'), str(tmp_path / 'run_b'), '--out', str(out), '--smoothing', '0.6']) == 0
    names = {p.name for p in out.iterdir()}
    assert {'REPORT.md', 'training_analysis.json', 'training_data_parsed.csv', 'training_summary.txt',
            'figure_1_training_phases.png', 'figure_4_loss_terms.png', 'figure_5_dashboard.png'} <= names
    doc = json.loads((out / 'training_analysis.json').read_text())
    assert [r['name'] for r in doc['runs']] == ['run_a', 'run_b'] and doc['aligned_by'] == 'step'
    assert [r['phases']['disc_start'] for r in doc['runs']] == [2001, 3001]     # each run's own config line
    assert [r['discriminator_trained'] for r in doc['runs']] == [True, False]
    assert all(r['map_size']['pixels'] == 2304 for r in doc['runs'])
    csv = pd.read_csv(out / 'training_data_parsed.csv')
    assert csv.groupby('run').size().to_dict() == {'run_a': 60, 'run_b': 60} and 'lr_inferred' in csv
    report = (out / 'REPORT.md').read_text()
    assert 'Run `run_a`' in report and '![figure_1_training_phases.png](figure_1_training_phases.png)' in report
    assert '### Limitations' in report
    for word in ('excellent', 'production-ready', 'radio astronomy', 'cosine', 'reference.md', 'issue '):
        assert word not in report.lower()


def test_cli_user_errors_exit_2(tmp_path, capsys):
    from radiodiff_vae.cli import main
    assert main(['analyze', str(tmp_path / 'missing.log'), '--out', str(tmp_path / 'o')]) == 2
    assert 'missing.log: no such file' in capsys.readouterr().err
    (tmp_path / 'a.log').write_text('nothing here\n')
    assert main(['analyze', str(tmp_path / 'a.log'), '--out', str(tmp_path / 'o'), '--smoothing', '1.5']) == 2
    assert main(['analyze', str(tmp_path / 'a.log'), '--out', str(tmp_path / 'o')]) == 2
    assert 'a.log: nothing parseable' in capsys.readouterr().err
    assert main(['analyze', str(reference_run_dir()), '--out', str(tmp_path / 'o'), '--config', 'upstream']) == 2
    assert 'upstream: no such file' in capsys.readouterr().err


def test_trainer_style_run_folder(tmp_path):
    "What the trainer writes: metrics.jsonl with a held-out-scores-only row and nulls, config.yaml."
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
    assert a.loop.name == 'radiodiff_vae' and a.discriminator_trained is True
    assert [(p.first_step, p.last_step) for p in a.phases.phases] == [(0, 10), (20, 30)]   # step 40 row ignored
    assert a.phases.consistent_with_config is True
    assert a.metrics['train/total_loss']['missing_or_nan'] == 0 and a.metrics['grad_norm_disc']['missing_or_nan'] == 2
    assert a.learning_rate.rows_zero_or_missing == 0 and a.learning_rate.max_rel_deviation_logged_vs_schedule == 0
    assert a.map_size.pixels == 1024
    assert a.loss_composition.kl_weight_resolvable is False
    assert any('cannot determine the KL weight' in s for s in statements(a))



def test_runs_of_ours_are_read_through_the_config_resolver(tmp_path):
    "A run of this project's trainer takes what its config leaves out from the schema's defaults; an upstream config keeps its aliases."
    from radiodiff_vae.config import resolve_config
    run = tmp_path / 'run'; run.mkdir()
    recs = [{'step': s, 'total_steps': 40, 'train/total_loss': 1.0, 'train/rec_loss': 0.5, 'train/nll_loss': 512.0, 'train/kl_loss': 1.0,
             'train/disc_factor': float(s >= 20), 'train/g_loss': 0.5, 'lr_ae': 1e-3, 'wall_time': 1755288000.0 + s} for s in range(0, 40, 10)]
    (run / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
    (run / 'config.yaml').write_text('model:\n  lossconfig:\n    disc_start: 20\ntrainer:\n  lr: 0.001\n  train_num_steps: 40\n  schedule: cosine\n'
                                     '  warmup_steps: 4\n  grad_clip_norm: 1.0\n')
    a, _ = analyze_run(*read_run(run))
    schema = resolve_config({'model': {'lossconfig': {'disc_start': 20}}, 'trainer': {'train_num_steps': 40}})
    assert a.loop.name == 'radiodiff_vae'
    assert (a.params['perceptual_weight'], a.params['batch_size'], a.params['train_discriminator'], a.params['power']) == (
        schema['model']['lossconfig']['perceptual_weight'], schema['data']['batch_size'], schema['trainer']['train_discriminator'],
        schema['trainer']['power'])
    assert {'perceptual_weight', 'batch_size', 'power'} <= set(a.params['_defaulted']) and 'lr' not in a.params['_defaulted']
    ref = training_params(RUN_CONFIG)                      # upstream's config: read by name, perceptual_weight not given
    assert ref['perceptual_weight'] is None and ref['schedule'] == 'radiodiff' and 'schedule' in ref['_defaulted']

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


def test_own_run_params_name_every_parameter_the_report_lists():
    """A run of this trainer (read through the resolver) gives every parameter the report's table lists, the ones that
    have no key of ours (upstream's clamp of the adaptive weight, its implicit resume) included. Issue 29's cut first
    dropped them from our runs' parameters: the main job's analyze stage stopped on a KeyError."""
    from radiodiff_vae.analysis import training_params, PARAM_ALIASES
    from radiodiff_vae.config import tiny_config
    p = training_params(tiny_config(), own=True)
    assert set(PARAM_ALIASES) <= set(p) and (p['d_weight_max'], p['resume_milestone']) == (1e4, None)
