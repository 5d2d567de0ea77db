"""The main job end to end on a tiny budget: every stage runs through its papermill pipeline, the index links
what was written, a second call with the same settings resumes (does nothing new), other settings are refused."""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

TINY = ['--steps', '12', '--eval-synthetic-maps', '4', '--eval-limit', '4', '--no-progress',
        '--set', 'trainer.save_and_sample_every=6', '--set', 'trainer.log_freq=2',
        '--set', 'model.lossconfig.disc_start=6', '--set', 'trainer.warmup_steps=2',
        '--set', 'data.finish.steps=2', '--set', 'data.n_maps=64']   # n_maps last: a test replaces it


def _cli(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'radiodiff_vae.cli', *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, 'MPLBACKEND': 'Agg'})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp('main')/'run'
    res = _cli('reproduce', '--out', str(out), *TINY, cwd=out.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return out, res


def test_every_stage_ran_and_is_indexed(run):
    out, res = run
    manifest = json.loads((out/'reproduce.json').read_text())
    assert [s['status'] for s in manifest['stages'].values()] == ['done'] * 4
    for stage in manifest['stages']: assert (out/'notebooks'/f'{stage}.ipynb').exists()
    index = (out/'README.md').read_text()
    links = re.findall(r'\]\(([^)#]+)\)', index)
    assert len(links) > 10
    missing = [l for l in links if not l.startswith('http') and not (out/l).exists()]
    assert not missing, missing
    assert (out/'reference'/'REPORT.md').exists() and (out/'analysis'/'REPORT.md').exists()
    assert list((out/'train').glob('model-*.pt'))
    for data in ('synthetic-4', 'real'):
        assert json.loads((out/'evaluation'/data/'summary.json').read_text()), data
    assert '## Headline numbers' in index and 'PSNR' in index


def test_same_settings_resume_other_settings_refused(run):
    out, _ = run
    ckpts = {p: p.stat().st_mtime_ns for p in (out/'train').glob('model-*.pt')}
    again = _cli('reproduce', '--out', str(out), *TINY, cwd=out.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out/'train').glob('model-*.pt')} == ckpts
    before = (out/'reproduce.json').read_text()
    other = _cli('reproduce', '--out', str(out), *TINY[:-1], 'data.n_maps=65', cwd=out.parent)
    assert other.returncode == 2 and 'other settings' in other.stderr and 'Traceback' not in other.stderr
    assert (out/'reproduce.json').read_text() == before
    bad = _cli('reproduce', '--out', str(out.parent/'bad'), '--steps', '12', '--set', 'model.lossconfig.disc_start=50', '--no-progress', cwd=out.parent)
    assert bad.returncode == 2 and 'train_num_steps=12' in bad.stderr and 'Traceback' not in bad.stderr
    assert not (out.parent/'bad').exists()


def test_user_error_inside_a_stage_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    "A RadioDiffError raised inside a stage's notebook (papermill wraps it) reaches the user as one line, status 2."
    from radiodiff_vae import reproduce as rp
    from radiodiff_vae.cli import main
    missing = tmp_path/'missing.log'
    def bad_plan(out, settings):
        ref = Path(out).resolve()/'reference'
        return [dict(name='reference', pipeline='analyze', out=ref, what='a stage given a missing log',
                     params=dict(inputs=[str(missing)], out_dir=str(ref), smoothing=0.9, config=None))]
    monkeypatch.setattr(rp, 'plan', bad_plan)
    assert main(['reproduce', '--out', str(tmp_path/'run'), '--no-progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"radiodiff-vae reproduce: error: stage 'reference': {missing}: no such file or folder"
    assert json.loads((tmp_path/'run'/'reproduce.json').read_text())['stages']['reference']['status'] == 'failed: LogParseError'


def test_settings_are_compared_resolved_not_as_text(tmp_path, monkeypatch):
    "issue 34: an absolute --config path or reordered --set resume the job; an edited config file is refused (not silently kept)."
    import shutil, yaml
    from radiodiff_vae import reproduce as rp
    from radiodiff_vae.core import RunFolderError, repo_dir
    ran = []
    monkeypatch.setattr(rp, 'run_stage', lambda stage, out, progress=True: ran.append(stage['name']) or 0.0)
    monkeypatch.setattr(rp, 'resolve_params', lambda stage, out: stage['params'])
    cfg = tmp_path/'cfg.yaml'; shutil.copy(repo_dir()/'configs'/'quickstart.yaml', cfg)
    sets = ['trainer.log_freq=2', 'trainer.warmup_steps=2', 'model.lossconfig.disc_start=6', 'data.finish.steps=2']
    out = tmp_path/'job'
    (tmp_path/'sub').mkdir()
    rp.reproduce(out, progress=False, config=str(cfg), steps=12, overrides=sets)
    assert len(ran) == 4
    rp.reproduce(out, progress=False, config=str(tmp_path/'sub'/'..'/'cfg.yaml'), steps=12, overrides=sets[::-1])   # same settings, other text
    assert len(ran) == 4                                                                          # nothing redone
    raw = yaml.safe_load(cfg.read_text()); raw['trainer']['lr'] = raw['trainer'].get('lr', 5e-6) * 2
    cfg.write_text(yaml.safe_dump(raw))
    before = (out/'reproduce.json').read_text()
    with pytest.raises(RunFolderError, match=r'trainer\.lr'): rp.reproduce(out, progress=False, config=str(cfg), steps=12, overrides=sets)
    assert (out/'reproduce.json').read_text() == before and len(ran) == 4
