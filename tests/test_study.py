"""The study runner end to end on a tiny study (2 arms x 2 seeds x 4 steps, 32x32 maps, 2 maps per evaluation set):
killed mid-way it resumes only what is missing, finished it says "nothing to do" and touches nothing; its paired
statistics agree with SciPy; a bad study file or a changed study is refused before anything is written."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from radiodiff_vae.core import ConfigError, RunFolderError
from radiodiff_vae.study import check_study, load_study, open_study_folder, run_plan, tiny_study_file
from radiodiff_vae.study_runs import RUN_STATE, read_run_state
from radiodiff_vae.study_evidence import compare_with_baseline, ema_minus_raw, paired_difference, summarize_arms
from radiodiff_vae.study import main as study_main

ENV = {**os.environ, 'MPLBACKEND': 'Agg'}
KEYS = ['no-gan/seed-0', 'no-gan/seed-1', 'gan-half/seed-0', 'gan-half/seed-1']


def _study(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, '-m', 'radiodiff_vae.study', *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _files(folder):
    "mtime of every file under `folder`."
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob('*') if p.is_file()}


def _complete(run_folder, n_sets=3):
    s = read_run_state(run_folder)
    return bool(s.get('train')) and len(s['eval']) == n_sets


@pytest.fixture(scope='module')
def killed_then_resumed(tmp_path_factory):
    "Start the tiny study, kill it (SIGKILL) once its first run is finished and the second has begun, then run it again with --jobs 2."
    root = tmp_path_factory.mktemp('study')
    path, out = tiny_study_file(root), root/'tiny'
    first, second = out/'runs'/'no-gan'/'seed-0', out/'runs'/'no-gan'/'seed-1'
    proc = subprocess.Popen([sys.executable, '-m', 'radiodiff_vae.study', str(path), '--out', str(out), '--no-progress'],
                            cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (_complete(first) and (second/'config.yaml').exists()):
        time.sleep(0.2)
    assert proc.poll() is None, 'the study ended before it could be killed: ' + proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    killed_state = {k: read_run_state(out/'runs'/k) for k in KEYS}
    first_files = _files(first)
    t0 = time.time()
    res = _study(str(path), '--out', str(out), '--jobs', '2', '--no-progress', cwd=root)
    return dict(root=root, path=path, out=out, res=res, killed_state=killed_state, first=first, first_files=first_files,
                seconds=time.time() - t0)


def test_killed_study_resumes_only_the_missing_runs(killed_then_resumed):
    k = killed_then_resumed
    assert k['res'].returncode == 0, k['res'].stdout[-2000:] + k['res'].stderr[-4000:]
    killed = k['killed_state']
    assert killed['no-gan/seed-0'].get('train') and len(killed['no-gan/seed-0']['eval']) == 3
    assert not any(killed[key].get('train') for key in KEYS[1:])
    assert "3 of 4 runs to do, 2 at a time" in k['res'].stdout   # the finished run is not redone
    assert _files(k['first']) == k['first_files']
    manifest = json.loads((k['out']/'study.json').read_text())
    assert manifest['runs'] == {key: 'done' for key in KEYS}
    assert [s['jobs'] for s in manifest['sessions']] == [1, 2]
    for key in KEYS:
        assert _complete(k['out']/'runs'/key), key
        assert read_run_state(k['out']/'runs'/key)['train']['step'] == 4
    print(f"\nresumed tiny study (3 runs, --jobs 2): {k['seconds']:.0f} s")


def test_report_tables_figures_and_paired_numbers(killed_then_resumed):
    out = killed_then_resumed['out']
    results = pd.read_csv(out/'results.csv')
    assert len(results) == 4 * 3 * 2   # runs x evaluation sets x weights
    assert set(results['set']) == {'synthetic', 'real-32', 'real-256'} and set(results['n_maps']) == {2}
    assert results[['psnr', 'ssim', 'nmse', 'rmse', 'kl_per_element', 'scale_factor']].notna().all().all()
    paired = pd.read_csv(out/'paired.csv')
    for _, row in paired[paired.metric.isin(['psnr', 'ssim', 'nmse', 'rmse'])].iterrows():   # against SciPy, from results.csv
        r = results[(results.set == row.set) & (results.weights == 'ema')]
        a = r[r.arm == row.arm].set_index('seed')[row.metric].sort_index()
        b = r[r.arm == 'no-gan'].set_index('seed')[row.metric].sort_index()
        ref = stats.ttest_rel(a.to_numpy(), b.to_numpy())
        lo, hi = ref.confidence_interval(0.95)
        assert math.isclose(row['mean'], (a - b).mean(), rel_tol=1e-9, abs_tol=1e-12)
        if np.isfinite(lo): assert math.isclose(row.ci_low, lo, rel_tol=1e-7, abs_tol=1e-12) and math.isclose(row.ci_high, hi, rel_tol=1e-7, abs_tol=1e-12)
    md = (out/'STUDY.md').read_text()
    for text in ('# Study: tiny', '## Set-up', '## Results (ema weights)', '## Each arm minus the baseline `no-gan`, paired by seed',
                 'real maps, 32x32 (training resolution, area-averaged down from 256x256)', 'real maps, 256x256 (native)',
                 '## EMA minus raw weights, paired by run', 'radiodiff-vae study', '--jobs 2', '4 of 4 runs finished'):
        assert text in md, text
    for fig in ('metrics.png', 'differences.png', 'rate_distortion.png', 'latents.png', 'ema_vs_raw.png', 'curves.png'):
        assert (out/fig).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', fig
        assert f']({fig})' in md, fig
    assert 'runs/' in (out/'.gitignore').read_text().splitlines()


def test_rerun_does_nothing_and_says_so(killed_then_resumed, capsys):
    k = killed_then_resumed
    before = _files(k['out'])
    assert study_main([str(k['path']), '--out', str(k['out']), '--no-progress']) == 0
    assert capsys.readouterr().out.strip() == f"nothing to do: the 4 runs of study 'tiny' in {k['out']} are complete"
    assert _files(k['out']) == before


def test_changed_study_is_refused_added_seed_accepted(killed_then_resumed, capsys):
    k = killed_then_resumed
    raw = yaml.safe_load(k['path'].read_text())
    changed = k['root']/'changed.yaml'; changed.write_text(yaml.safe_dump({**raw, 'evaluation': {**raw['evaluation'], 'synthetic_maps': 3}}))
    before = _files(k['out'])
    assert study_main([str(changed), '--out', str(k['out']), '--no-progress']) == 2
    assert 'other settings (evaluation differ)' in capsys.readouterr().err
    assert _files(k['out']) == before
    spec, configs = load_study(k['path'])
    more = check_study({**raw, 'seeds': [0, 1, 2]}, k['path'])
    assert open_study_folder(k['out'], more)['spec'] == spec
    todo = [r['key'] for r in run_plan(more, k['out'], configs) if not _complete(r['folder'])]
    assert todo == ['no-gan/seed-2', 'gan-half/seed-2']


NO_GAN = dict(label='no-gan', set=['model.lossconfig.disc_start={steps}'])


@pytest.mark.parametrize('change, message', [
    (dict(arms=[NO_GAN, dict(label='b', set=['trainer.nope=1'])]), "arms[1] (b): base + overrides + set: "),
    (dict(arms=[NO_GAN, dict(label='b', set=['model.lossconfig.disc_start=99'])]), "arms[1] (b): base + overrides + set: "),
    (dict(arms=[NO_GAN, dict(label='b c', set=[])]), 'arms[1].label'),
    (dict(arms=[NO_GAN]), 'arms: expected a list of two or more arms'),
    (dict(baseline='gan'), "baseline: expected one of the arm labels ['no-gan', 'gan-half']"),
    (dict(evaluation=dict(weigths='ema')), 'evaluation: unknown key(s) weigths'),
    (dict(seedz=[0, 1]), 'unknown key(s) seedz'),
    (dict(base='missing.yaml'), "base: config file"),
    (dict(steps=5), 'steps: 5 is not a multiple of trainer.save_and_sample_every'),
    (dict(overrides=['trainer.lr']), 'overrides: expected a list of section.key=value strings'),
    (dict(overrides=['trainer.lr=1', 'data.sise=3']), "overrides: override 'data.sise': unknown key"),
])
def test_bad_study_file_leaves_nothing(tmp_path, capsys, change, message):
    raw = {**yaml.safe_load(tiny_study_file(tmp_path).read_text()), **change}
    bad = tmp_path/'bad.yaml'; bad.write_text(yaml.safe_dump(raw))
    assert study_main([str(bad), '--out', str(tmp_path/'out'), '--no-progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'radiodiff-vae study: error: {bad}: ') and message in err and '\n' not in err, err
    assert not (tmp_path/'out').exists()


def test_paired_difference_against_scipy():
    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 12):
        seed_effect = rng.normal(25, 3, n)
        a, b = seed_effect + rng.normal(0.4, 0.3, n), seed_effect + rng.normal(0, 0.3, n)
        d = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
        ref = stats.ttest_rel(a, b)
        lo, hi = ref.confidence_interval(0.95)
        assert np.allclose([d['mean'], d['ci_low'], d['ci_high'], d['t'], d['p']], [np.mean(a - b), lo, hi, ref.statistic, ref.pvalue], rtol=1e-10)
        lo90, hi90 = stats.t.interval(0.9, n - 1, loc=np.mean(a - b), scale=stats.sem(a - b))
        d90 = paired_difference(dict(enumerate(a)), dict(enumerate(b)), confidence=0.9)
        assert np.allclose([d90['ci_low'], d90['ci_high']], [lo90, hi90], rtol=1e-10)
    # only the seeds both arms have, with finite values, are paired
    d = paired_difference({0: 1.0, 1: 2.0, 2: float('nan'), 3: 4.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 1.0, 3: 3.0, 4: 0.0})
    assert d['seeds'] == [0, 1, 3] and np.allclose(d['diffs'], [0.5, 1.0, 1.0])


def test_aggregation_pairs_by_seed_not_by_row_order():
    rows = []
    for arm, shift in (('base', 0.0), ('x', 1.0)):
        for seed in ((0, 1, 2) if arm == 'base' else (2, 0, 1)):   # different row order per arm
            for w in ('raw', 'ema'):
                rows.append(dict(arm=arm, seed=seed, set='s', weights=w, psnr=10.0 * seed + shift + (w == 'ema') * 0.25 * (seed + 1),
                                 ssim=0.5, nmse=0.1, rmse=0.1, kl_per_element=1.0, latent_std=1.0, scale_factor=1.0))
    df = pd.DataFrame(rows)
    cmp = compare_with_baseline(df, 'base', 'ema')
    psnr = cmp[cmp.metric == 'psnr'].iloc[0]
    assert psnr.arm == 'x' and np.allclose(psnr.diffs, [1.0, 1.0, 1.0]) and psnr.ci_low == psnr.ci_high == 1.0
    ema = ema_minus_raw(df)
    assert np.allclose(ema[(ema.arm == 'base') & (ema.metric == 'psnr')].iloc[0].diffs, [0.25, 0.5, 0.75])
    arms = summarize_arms(df)
    row = arms[(arms.arm == 'x') & (arms.weights == 'raw') & (arms.metric == 'psnr')].iloc[0]
    lo, hi = stats.t.interval(0.95, 2, loc=11.0, scale=stats.sem([1.0, 11.0, 21.0]))
    assert row.n == 3 and np.isclose(row['mean'], 11.0) and np.allclose([row.ci_low, row.ci_high], [lo, hi])


def test_pipeline_notebook_reports_a_copied_study(killed_then_resumed, tmp_path):
    import shutil, papermill
    k = killed_then_resumed
    copy = tmp_path/'copy'; shutil.copytree(k['out'], copy)
    (copy/'STUDY.md').unlink(); (copy/'metrics.png').unlink()
    nb = Path(__file__).resolve().parents[1]/'nbs'/'pipelines'/'study.ipynb'
    papermill.execute_notebook(str(nb), str(tmp_path/'executed.ipynb'), kernel_name='python3', progress_bar=False,
                               parameters=dict(study_file=str(k['path']), out_dir=str(copy), report_only=True, progress=False))
    assert (copy/'metrics.png').is_file() and '## Each arm minus the baseline `no-gan`' in (copy/'STUDY.md').read_text()
    assert 'Each arm minus the baseline' in (tmp_path/'executed.ipynb').read_text()


def test_report_only_rebuilds_the_report_from_the_evidence_alone(killed_then_resumed, tmp_path, capsys):
    "A copy of the study folder without its run folders (as git holds it): --report-only writes the same STUDY.md, tables and figures."
    import shutil
    k = killed_then_resumed
    copy = tmp_path/'tiny'; shutil.copytree(k['out'], copy, ignore=shutil.ignore_patterns('runs'))
    rebuilt = ('STUDY.md', 'arms.csv', 'paired.csv', 'ema_vs_raw.csv', 'metrics.png', 'differences.png', 'curves.png')
    for name in rebuilt: (copy/name).unlink()
    assert study_main([str(k['path']), '--out', str(copy), '--report-only', '--no-progress']) == 0
    assert 'from the evidence of the 4 finished of 4 runs' in capsys.readouterr().out
    assert not (copy/'runs').exists()
    for name in ('arms.csv', 'paired.csv', 'ema_vs_raw.csv', 'curves.png', 'metrics.png'):
        assert (copy/name).read_bytes() == (k['out']/name).read_bytes(), name
    original, again = (k['out']/'STUDY.md').read_text(), (copy/'STUDY.md').read_text()
    assert again.replace(str(copy), str(k['out'])) == original
    curves = pd.read_csv(copy/'curves.csv')
    assert set(curves.columns) == {'arm', 'seed', 'step', 'name', 'value'} and {'train/rec_loss', 'val/psnr_ema'} <= set(curves.name)
    assert sorted(curves.groupby(['arm', 'seed']).size().index.tolist()) == sorted([('gan-half', 0), ('gan-half', 1), ('no-gan', 0), ('no-gan', 1)])


def test_report_only_without_evidence_is_refused(tmp_path, capsys):
    path = tiny_study_file(tmp_path)
    out = tmp_path/'empty'; out.mkdir(); (out/'study.json').write_text(json.dumps(dict(spec=load_study(path)[0], sessions=[], runs={})))
    assert study_main([str(path), '--out', str(out), '--report-only', '--no-progress']) == 2
    assert 'holds no results.csv' in capsys.readouterr().err


# every study folder the repository tracks, each with its study file under configs/studies
COMMITTED_STUDIES = ['adversarial', 'finishing', 'kl_weight', 'logvar_ema']


def test_committed_studies_keep_evidence_not_run_folders():
    "Each committed study tracks at most 60 files, none under runs/, and holds the evidence its report is rebuilt from."
    import subprocess
    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(['git', 'ls-files', 'studies'], cwd=root, capture_output=True, text=True)
    if listed.returncode: pytest.skip('not a git checkout')
    files = listed.stdout.split()
    studies = sorted({f.split('/')[1] for f in files})
    assert studies == COMMITTED_STUDIES, 'a committed study folder must also be in the rebuild test below'
    for name in studies:
        mine = [f for f in files if f.split('/')[1] == name]
        assert len(mine) <= 60, (name, len(mine))
        assert not [f for f in mine if '/runs/' in f], name
        for needed in ('STUDY.md', 'study.json', 'results.csv', 'paired.csv', 'curves.csv', 'metrics.png', 'curves.png'):
            assert f'studies/{name}/{needed}' in mine, (name, needed)
        assert (root/'configs'/'studies'/f'{name}.yaml').exists(), name
        md = (root/'studies'/name/'STUDY.md').read_text()
        assert f'radiodiff-vae study configs/studies/{name}.yaml --out studies/{name} --report-only' in md


@pytest.mark.slow   # three reports: about 40 s each on the shared 2-core machine
@pytest.mark.parametrize('name', COMMITTED_STUDIES)
def test_committed_study_reports_rebuild_unchanged(name, tmp_path):
    "--report-only on a copy of a committed study folder reproduces its STUDY.md and tables byte for byte."
    import shutil
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path/name; shutil.copytree(root/'studies'/name, copy, ignore=shutil.ignore_patterns('runs'))
    res = _study(str(root/'configs'/'studies'/f'{name}.yaml'), '--out', str(copy), '--report-only', '--no-progress', cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    for f in ('arms.csv', 'paired.csv', 'ema_vs_raw.csv', 'results.csv', 'curves.csv'):
        assert (copy/f).read_bytes() == (root/'studies'/name/f).read_bytes(), f
    assert (copy/'STUDY.md').read_text().replace(str(copy), f'studies/{name}') == (root/'studies'/name/'STUDY.md').read_text()


def test_an_arm_starts_from_another_arms_runs(tmp_path):
    "`init_from`: each run of the arm starts from the EMA weights of the other arm's run of the same seed, trained first even with --jobs 2."
    arms = [dict(label='base', set=['model.lossconfig.disc_start={steps}']),
            dict(label='ft', set=['model.lossconfig.disc_start={steps}', 'trainer.lr=2e-4'], steps=2, init_from='base', note='from base')]
    path = tiny_study_file(tmp_path, arms=arms)
    res = _study(str(path), '--out', str(tmp_path/'out'), '--jobs', '2', '--no-progress', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for seed in (0, 1):
        run = tmp_path/'out'/'runs'/'ft'/f'seed-{seed}'
        cfg = yaml.safe_load((run/'config.yaml').read_text())
        assert cfg['model']['ckpt_path'] == str(tmp_path/'out'/'runs'/'base'/f'seed-{seed}'/'model-2.pt')
        assert read_run_state(run)['train']['step'] == 2     # ckpt_path's EMA weights: test_trainer.test_upstream_switches
    assert 'ft (steps 2)' in (tmp_path/'out'/'STUDY.md').read_text().replace('`', '')


def test_edited_base_config_is_noticed(tmp_path):
    "issue 34: the resolved settings of every arm are recorded; an edited base file is refused, the same settings in other words are not."
    import shutil
    from radiodiff_vae.core import repo_dir
    base = tmp_path/'base.yaml'; shutil.copy(repo_dir()/'configs'/'studies'/'quickstart_batch8.yaml', base)
    raw = yaml.safe_load(tiny_study_file(tmp_path).read_text())
    path = tmp_path/'s.yaml'; path.write_text(yaml.safe_dump({**raw, 'base': str(base)}))
    spec, configs = load_study(path)
    out = tmp_path/'out'
    open_study_folder(out, spec, configs)
    assert json.loads((out/'study.json').read_text())['resolved']['no-gan']['trainer']['lr'] == configs['no-gan']['trainer']['lr']
    moved = {**raw, 'base': 'base.yaml', 'overrides': raw['overrides'][::-1]}          # relative path, reordered overrides
    path.write_text(yaml.safe_dump(moved)); open_study_folder(out, *load_study(path))
    cfg = yaml.safe_load(base.read_text()); cfg['trainer']['lr'] = configs['no-gan']['trainer']['lr'] * 2; base.write_text(yaml.safe_dump(cfg))
    before = _files(out)
    with pytest.raises(RunFolderError, match=r'no-gan.*trainer\.lr'): open_study_folder(out, *load_study(path))
    assert _files(out) == before


def test_a_resumed_study_says_when_the_thread_count_changes():
    "issue 34: runs finished with one thread count and resumed with another --jobs: said, not silent."
    from radiodiff_vae.study import thread_note
    manifest = {'sessions': [{'threads_per_job': 2, 'finished_runs': 1}]}
    note = thread_note(manifest, {'threads_per_job': 1, 'jobs': 2})
    assert '2 CPU thread(s)' in note and '--jobs 2' in note


def test_a_study_recorded_before_the_config_cut_reopens():
    """issue 29: a study folder records its arms' resolved configs; one written before the config's keys were cut (85
    keys) reopens and reports with today's resolver, the translation alone changing nothing. Before the fix every
    retired key was a difference and `--report-only` on the finishing study refused its own folder."""
    import copy
    from radiodiff_vae.config import tiny_config
    from radiodiff_vae.study import study_changes
    new = tiny_config(); new['trainer'].pop('seed')
    old = copy.deepcopy(new); del old['data']['finish']
    old['trainer'].update(cpu=False, sample_maps=4, upstream_ema=False, finish_lr=None)
    old['data'].update(finish_size=None, finish_steps=0, finish_batch_size=None, finish_crop=None)
    spec = {'arms': [], 'evaluation': {}}
    assert study_changes(spec, spec, {'a': old}, {'a': new}) == []
    other = copy.deepcopy(old); other['trainer']['lr'] = 0.5
    assert any('trainer.lr' in d for d in study_changes(spec, spec, {'a': other}, {'a': new}))
