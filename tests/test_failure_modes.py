"""Reliability of training runs: SIGKILL at any moment resumes bit-exactly, damaged checkpoints are caught,
NaN/inf losses stop (or are skipped) with a diagnostic, failing writes keep the last checkpoint, one trainer per folder."""
import errno, hashlib, json, multiprocessing, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest, torch, yaml
from radiodiff_vae.core import CheckpointError, RunFolderError, RadioDiffError
from radiodiff_vae.config import resolve_config, tiny_config
from radiodiff_vae.trainer import train, NonFiniteLossError
from radiodiff_vae.run_folder import RunLock, read_lock

ROOT = Path(__file__).resolve().parent.parent
TIMING = {'wall_time', 'elapsed_s', 'steps_per_s', 'session', 'timestamp', 'source'}  # differ between sessions by nature

# a seconds-sized run (tiny_config: ch 32, one downsampling, 32x32 synthetic maps, batch 2, no LPIPS) on 16 maps
RUN = ('data.n_maps=16', 'data.val_maps=2', 'trainer.lr=1e-3', 'trainer.schedule=cosine', 'trainer.warmup_steps=2',
       'trainer.learn_logvar=true', 'trainer.ema_decay=0.99', 'trainer.ema_update_every=1')

def tiny_run(steps=4, every=2, disc_start=2, **trainer):
    "The run of `steps` steps, a checkpoint every `every`, the GAN from `disc_start`, `trainer` keys changed."
    return tiny_config(*RUN, f'trainer.train_num_steps={steps}', f'trainer.save_and_sample_every={every}',
                       f'model.lossconfig.disc_start={disc_start}', *(f'trainer.{k}={json.dumps(v)}' for k, v in trainer.items()))

def snapshot(folder) -> dict:
    "name -> sha256 of every file under `folder` (what a failed command must leave untouched)."
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob('*')) if p.is_file()}

def assert_same(a, b, where='checkpoint'):
    "Recursive bit-for-bit equality of checkpoint contents (tensors, arrays, RNG tuples, numbers, strings)."
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f'{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max().item():.3g})'
    elif isinstance(a, np.ndarray): assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f'{where}: keys differ {set(a) ^ set(b)}'
        for k in a: assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert type(a) == type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f'{where}[{i}]')
    else: assert a == b or (a != a and b != b), f'{where}: {a!r} != {b!r}'

def load_ckpt(path): return torch.load(path, map_location='cpu', weights_only=True)

# --------------------------------------------------------------------------------------------------------------
# 1. Kill at any moment (subprocesses through the CLI), resume with --resume latest, compare with an uninterrupted run

# The CLI in a subprocess; SLOW_FSYNC makes every fsync of a *.tmp file take 0.4 s (a slow disk), so that a kill
# while a checkpoint is being written is a certainty rather than luck.
CLI = ('import os, sys, time\n'
       'if os.environ.get("SLOW_FSYNC"):\n'
       '    _fsync = os.fsync\n'
       '    def fsync(fd):\n'
       '        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"): time.sleep(0.4)\n'
       '        return _fsync(fd)\n'
       '    os.fsync = fsync\n'
       'from radiodiff_vae.cli import main\n'
       'sys.exit(main())\n')

def start_cli(*args, slow_fsync=False):
    env = dict(os.environ, OMP_NUM_THREADS='1', SLOW_FSYNC='1' if slow_fsync else '')
    return subprocess.Popen([sys.executable, '-c', CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)

def train_records(out) -> list[dict]:
    "Records of metrics.jsonl that parse (the trainer's own file)."
    path = Path(out)/'metrics.jsonl'
    if not path.exists(): return []
    recs = []
    for line in path.read_text(errors='replace').splitlines():
        try: recs.append(json.loads(line))
        except ValueError: pass
    return recs

def state_of(out) -> tuple[dict, int]:
    "Checkpoint mtimes and the number of metrics records in `out` (taken before a session starts)."
    out = Path(out)
    return ({p.name: p.stat().st_mtime_ns for p in out.glob('model-*.pt')} if out.exists() else {}), len(train_records(out))

def wait_and_kill(proc, out, trigger, rng, before) -> str:
    "Poll `out` every ~1 ms until `trigger` fires, then SIGKILL `proc`; return what happened."
    out, (ckpts, n_lines), (kind, arg), size = Path(out), before, trigger, -1
    while proc.poll() is None:
        if kind == 'tmp' and out.exists() and any(p.name.startswith('.model-') and p.name.endswith('.tmp') for p in out.iterdir()):
            break
        if kind == 'new_ckpt' and out.exists() and any(p.name not in ckpts or p.stat().st_mtime_ns != ckpts[p.name]
                                                       for p in out.glob('model-*.pt')):
            break
        if kind == 'step' and (out/'metrics.jsonl').exists() and (out/'metrics.jsonl').stat().st_size != size:
            size = (out/'metrics.jsonl').stat().st_size
            if any('milestone' not in r and r.get('step', -1) >= arg for r in train_records(out)[n_lines:]):
                time.sleep(rng.uniform(0, 0.05)); break   # a random moment within the next step or so, far from the end
        time.sleep(0.001)
    if proc.poll() is not None: return 'finished'
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    return 'killed'

def comparable_records(out) -> dict:
    "(step, kind) -> values of every metrics record, timing fields removed; duplicates must agree."
    table = {}
    for r in train_records(out):
        key = (r['step'], 'val' if 'milestone' in r else 'train')
        vals = {k: v for k, v in r.items() if k not in TIMING}
        if key in table: assert table[key] == vals, f'step {key}: a repeated record differs from the earlier one'
        table[key] = vals
    return table

def test_sigkill_at_random_moments_resumes_bit_exactly(tmp_path):
    # 24 steps: every kill below is triggered by a step or checkpoint at most ~step 16, so no session can finish
    # before its kill lands (with 16 steps and a random delay of up to 0.4 s, one sometimes did)
    steps, every = 24, 4
    cfg = tiny_run(steps, every, disc_start=8)
    cfg_path = tmp_path/'tiny.yaml'
    cfg_path.write_text(yaml.safe_dump(cfg))
    base, killed = tmp_path/'uninterrupted', tmp_path/'killed'
    args = lambda out: ['train', '--config', cfg_path, '--out', out, '--no-progress']
    baseline = start_cli(*args(base))    # first and alone: it must not compete with the killed sessions for the cores
    _, err = baseline.communicate(timeout=600)
    assert baseline.returncode == 0, err
    rng = random.Random(9)
    triggers = [('step', rng.randint(1, 2)),            # before the first checkpoint: resume starts afresh
                ('tmp', None),                          # while model-N.pt is being written (temp file present)
                ('step', rng.randint(6, 10)),           # at a random moment after a checkpoint
                ('new_ckpt', None)]                     # right after a checkpoint appears (sample/val not yet written)
    events = []
    for i, trigger in enumerate(triggers):
        resume, before = (['--resume', 'latest'] if i else []), state_of(killed)
        proc = start_cli(*args(killed), *resume, slow_fsync=trigger[0] == 'tmp')
        if i == 2:   # meanwhile a second trainer on the same folder is refused, naming the owner's pid
            while proc.poll() is None and (read_lock(killed/'.lock') or {}).get('pid') != proc.pid: time.sleep(0.01)
            os.kill(proc.pid, signal.SIGSTOP)      # the owner is alive but cannot finish while we try
            try:
                names = sorted(p.name for p in killed.iterdir())
                with pytest.raises(RunFolderError, match=f'in use by another trainer \\(pid {proc.pid}'):
                    train(cfg, killed, resume='latest', progress=False)
                assert sorted(p.name for p in killed.iterdir()) == names and read_lock(killed/'.lock')['pid'] == proc.pid
            finally: os.kill(proc.pid, signal.SIGCONT)
        events.append((trigger, wait_and_kill(proc, killed, trigger, rng, before),
                       sorted(p.name for p in killed.glob('.model-*.tmp'))))
        assert (killed/'.lock').exists()   # SIGKILL leaves a stale lock behind: the next session must take it over
    assert all(e[1] == 'killed' for e in events), events
    assert events[1][2], f'the kill did not land while a checkpoint was being written: {events}'
    final = start_cli(*args(killed), '--resume', 'latest')
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err

    last = f'model-{steps // every}.pt'
    a, b = load_ckpt(base/last), load_ckpt(killed/last)
    assert b['session'] > 0 and a['session'] == 0
    a.pop('session'); b.pop('session')
    assert len({load_ckpt(p)['run_id'] for p in killed.glob('model-*.pt')}) == 1   # one run across its sessions
    assert a.pop('run_id') != b.pop('run_id')                                       # two runs
    assert_same(a, b)       # model, ema, loss (discriminator + logvar), both optimizers, schedulers, RNG, data position
    for m in range(1, steps // every + 1): assert_same(load_ckpt(base/f'model-{m}.pt')['model'], load_ckpt(killed/f'model-{m}.pt')['model'], f'model-{m}')

    # every record any session wrote equals the uninterrupted run's record of that step, and none is missing
    ref, got = comparable_records(base), comparable_records(killed)
    assert set(ref) == {(s, 'train') for s in range(steps)} | {(s, 'val') for s in range(every, steps + 1, every)}
    assert set(got) == set(ref), f'missing {sorted(set(ref) - set(got))}, extra {sorted(set(got) - set(ref))}'
    for key in ref: assert got[key] == ref[key], key

    # the analysis's resume rule (latest write per step) gives the uninterrupted table
    from radiodiff_vae.logs import read_run
    (df_a, _), (df_b, info_b) = read_run(base), read_run(killed)
    cols = [c for c in df_a.columns if c not in TIMING]
    assert list(df_b.index) == list(df_a.index) == sorted({s for s, _ in ref})
    assert df_a[cols].equals(df_b[cols])
    assert len(info_b['resumes']) >= len(triggers) - 1   # each session after a kill re-logs from its checkpoint

# --------------------------------------------------------------------------------------------------------------
# in-process runs (the imports are paid once)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    "A finished 4-step run with model-1.pt (step 2) and model-2.pt (step 4), copied per test."
    out = tmp_path_factory.mktemp('finished')/'run'
    train(tiny_run(4, 2), out, progress=False)
    return out

@pytest.fixture
def run_copy(tmp_path, finished_run):
    out = tmp_path/'run'
    shutil.copytree(finished_run, out)
    return out

def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({'zero-byte': b'', 'truncated': data[:len(data) // 3], 'garbage': os.urandom(4096),
                      'text': b'version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 10\n'}[how])

@pytest.mark.parametrize('how', ['zero-byte', 'truncated', 'garbage', 'text'])
def test_damaged_newest_checkpoint_is_named_and_nothing_changes(run_copy, how, capsys):
    damage(run_copy/'model-2.pt', how)
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match='model-2.pt'): train(tiny_run(6, 2), run_copy, resume='latest', progress=False)
    assert snapshot(run_copy) == before                         # no log, no config, no lock, nothing overwritten
    from radiodiff_vae.model import AutoencoderKL
    with pytest.raises(CheckpointError, match='model-2.pt'): AutoencoderKL.from_checkpoint(run_copy/'model-2.pt')

def test_skip_damaged_only_when_asked(run_copy, capsys):
    damage(run_copy/'model-2.pt', 'truncated')
    damaged = (run_copy/'model-2.pt').read_bytes()
    # asked: falls back to model-1.pt, says so, and (stopping before milestone 2) leaves the damaged file for inspection
    s = train(tiny_run(4, 2), run_copy, resume='latest', skip_damaged=True, stop_at=3, progress=False)
    assert Path(s['resumed_from']).name == 'model-1.pt' and s['start_step'] == 2 and s['step'] == 3
    err = capsys.readouterr().err
    assert 'model-2.pt' in err and 'skipping' in err
    assert (run_copy/'model-2.pt').read_bytes() == damaged
    # a damaged checkpoint named explicitly is never skipped
    with pytest.raises(CheckpointError, match='model-2.pt'):
        train(tiny_run(4, 2), run_copy, resume=2, skip_damaged=True, progress=False)

def test_checkpoint_of_another_architecture(run_copy, tmp_path):
    from radiodiff_vae.model import AutoencoderKL
    other = tiny_run(4, 2); other['model']['ddconfig']['ch_mult'] = [1, 1, 2]
    # resuming it under another architecture: named, refused, nothing written in the new folder
    with pytest.raises(CheckpointError, match=r'model-2\.pt.*another architecture'):
        train(other, tmp_path/'new', resume=run_copy/'model-2.pt', progress=False)
    assert not list((tmp_path/'new').glob('*'))
    with pytest.raises(CheckpointError, match='model-2.pt'):
        AutoencoderKL.from_checkpoint(run_copy/'model-2.pt', ddconfig=other['model']['ddconfig'])
    # a fresh start into a folder that holds another run is refused before anything is written
    before = snapshot(run_copy)
    with pytest.raises(RunFolderError, match='different run'): train(other, run_copy, resume='latest', progress=False)
    with pytest.raises(RunFolderError, match='already holds checkpoints'): train(tiny_run(4, 2), run_copy, progress=False)
    assert snapshot(run_copy) == before

def nan_at(monkeypatch, step: int, term='train/nll_loss', value=float('nan')):
    "Make the autoencoder loss non-finite at `step` (as a diverging run would)."
    from radiodiff_vae.losses import LPIPSWithDiscriminator
    original = LPIPSWithDiscriminator.autoencoder_loss
    def patched(self, inputs, reconstructions, posteriors, global_step, *args, **kw):
        loss, log = original(self, inputs, reconstructions, posteriors, global_step, *args, **kw)
        if global_step == step: loss, log = loss * value, {**log, term: log[term] * value}
        return loss, log
    monkeypatch.setattr(LPIPSWithDiscriminator, 'autoencoder_loss', patched)

def test_nonfinite_loss_stops_with_diagnostic(tmp_path, monkeypatch):
    out = tmp_path/'run'
    nan_at(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError) as e: train(tiny_run(6, 2), out, progress=False)
    msg = str(e.value)
    assert 'step 3' in msg and 'nll_loss' in msg and 'model-1.pt' in msg and '\n' not in msg
    diag = json.loads((out/'nonfinite-step3.json').read_text())
    assert diag['step'] == 3 and diag['terms'][0] == 'train/nll_loss' and len(diag['batch']) == 2
    assert diag['losses']['train/nll_loss'] == 'nan' and Path(diag['last_checkpoint']).name == 'model-1.pt'
    assert sorted(p.name for p in out.glob('model-*.pt')) == ['model-1.pt'] and not (out/'.lock').exists()
    good = load_ckpt(out/'model-1.pt')
    assert good['step'] == 2 and all(torch.isfinite(v).all() for v in good['model'].values())
    # recovery: resume from the last good checkpoint (the fault is gone) and finish
    monkeypatch.undo()
    s = train(tiny_run(6, 2), out, resume='latest', progress=False)
    assert s['step'] == 6 and Path(s['resumed_from']).name == 'model-1.pt'

def test_nonfinite_batches_can_be_skipped_and_are_counted(tmp_path, monkeypatch):
    out = tmp_path/'run'
    nan_at(monkeypatch, 3, 'train/kl_loss', float('inf'))
    s = train(tiny_run(4, 2, max_nonfinite_skips=100), out, progress=False)
    assert s['step'] == 4 and s['nonfinite_skips'] == 1 and load_ckpt(out/'model-2.pt')['nonfinite_skips'] == 1
    recs = train_records(out)
    assert [r['step'] for r in recs if 'milestone' not in r] == [0, 1, 2]     # step 3 was skipped, not logged
    skips = [l for p in out.glob('*.log') for l in p.read_text().splitlines() if '[Skip]' in l]
    assert len(skips) == 1 and 'step 3' in skips[0] and 'kl_loss' in skips[0], skips    # names the step and the term
    assert all(torch.isfinite(v).all() for v in load_ckpt(out/'model-2.pt')['model'].values())
    # the limit: max_nonfinite_skips=0 (the default) stops at the first
    nan_at(monkeypatch, 1)
    with pytest.raises(NonFiniteLossError, match='max_nonfinite_skips'):
        train(tiny_run(4, 2, max_nonfinite_skips=0), tmp_path/'run2', progress=False)

def failing_fsync(monkeypatch, name: str):
    "A full disk for files named `name`: fsync of their temporary file raises ENOSPC."
    real = os.fsync
    def fsync(fd):
        if Path(os.readlink(f'/proc/self/fd/{fd}')).name.startswith(f'.{name}.'): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)

def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    good = (run_copy/'model-2.pt').read_bytes()
    failing_fsync(monkeypatch, 'model-3.pt')
    with pytest.raises(RunFolderError) as e: train(tiny_run(6, 2), run_copy, resume='latest', progress=False)
    assert 'model-3.pt' in str(e.value) and 'No space left' in str(e.value) and 'model-2.pt is intact' in str(e.value)
    assert (run_copy/'model-2.pt').read_bytes() == good
    assert not (run_copy/'model-3.pt').exists() and not list(run_copy.glob('.model-*')) and not (run_copy/'.lock').exists()
    monkeypatch.undo()     # space freed: the run continues from the intact checkpoint
    assert train(tiny_run(6, 2), run_copy, resume='latest', progress=False)['step'] == 6

def test_unwritable_log_is_a_clear_error(run_copy, monkeypatch):
    import builtins
    real_open = builtins.open
    def open_(path, mode='r', *a, **kw):
        if str(path).endswith('metrics.jsonl') and 'a' in mode: raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(builtins, 'open', open_)     # wherever the log writer lives
    before = {n: (run_copy/n).read_bytes() for n in ('model-1.pt', 'model-2.pt')}
    with pytest.raises(RunFolderError, match=r'metrics\.jsonl.*Read-only file system'):
        train(tiny_run(6, 2), run_copy, resume='latest', progress=False)
    assert all((run_copy/n).read_bytes() == b for n, b in before.items()) and not (run_copy/'model-3.pt').exists()

def _hold_lock(folder, ready):
    "Hold the run-folder lock of `folder` as a running trainer would."
    RunLock(folder).acquire(); ready.set(); time.sleep(120)

def test_second_trainer_on_the_same_folder_is_refused(run_copy):
    ctx = multiprocessing.get_context('fork')      # a holder process in milliseconds (no second import of torch)
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run_copy, ready))
    holder.start()
    try:
        assert ready.wait(60)
        before = snapshot(run_copy)
        with pytest.raises(RunFolderError, match=rf'in use by another trainer \(pid {holder.pid}'):
            train(tiny_run(6, 2), run_copy, resume='latest', progress=False)
        assert snapshot(run_copy) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL); holder.join(30)
    # the owner was killed: its lock file stays but nobody holds it, so it is taken over, and released at the end
    assert read_lock(run_copy/'.lock')['pid'] == holder.pid
    s = train(tiny_run(6, 2), run_copy, resume='latest', stop_at=5, progress=False)
    assert s['step'] == 5 and not (run_copy/'.lock').exists()

def test_torn_log_line_does_not_swallow_the_next_record(tmp_path):
    """A kill in the middle of a log write leaves a last line without its newline; the resumed session must start
    a new line, or its first record (here step 4, whose only copy it is) is glued to the fragment and lost."""
    out = tmp_path/'run'
    train(tiny_run(6, 2), out, stop_at=4, progress=False)
    with open(out/'metrics.jsonl', 'a') as f: f.write('{"step": 4, "total_steps": 6, "train/total_loss": 12')
    train(tiny_run(6, 2), out, resume='latest', progress=False)
    from radiodiff_vae.logs import read_run
    df, info = read_run(out)
    assert df.index[df['train/total_loss'].notna()].tolist() == list(range(6)) and info['skipped_lines'] == 1

# --------------------------------------------------------------------------------------------------------------
# lineage (issue 34): a run id chosen at a run's start is stored in every checkpoint; a checkpoint of another run is
# never continued into a folder that holds a run; a start that wrote no checkpoint holds no run

def _seeded(seed, steps=4, every=2):
    cfg = tiny_run(steps, every); cfg['trainer']['seed'] = seed
    return cfg

def test_foreign_checkpoint_is_refused_and_overwrites_nothing(run_copy, tmp_path):
    other = tmp_path/'other'
    train(_seeded(1), other, stop_at=2, progress=False)                   # another run, stopped at model-1.pt
    mine, theirs = load_ckpt(run_copy/'model-1.pt'), load_ckpt(other/'model-1.pt')
    assert isinstance(mine['run_id'], str) and isinstance(theirs['run_id'], str) and mine['run_id'] != theirs['run_id']
    before = snapshot(run_copy)
    with pytest.raises(RunFolderError, match=rf"model-1\.pt: a checkpoint of another run.*{theirs['run_id']}.*{mine['run_id']}"):
        train(_seeded(1), run_copy, resume=other/'model-1.pt', progress=False)
    assert snapshot(run_copy) == before                                   # no checkpoint, log or metrics row touched
    # a copy of this run's own checkpoint, kept elsewhere, continues this run
    shutil.copy(run_copy/'model-1.pt', tmp_path/'kept.pt')
    s = train(tiny_run(4, 2), run_copy, resume=tmp_path/'kept.pt', progress=False)
    assert s['step'] == 4 and load_ckpt(run_copy/'model-2.pt')['run_id'] == mine['run_id']
    # continuing another run's checkpoint in a new folder is a new run (a branch), with its own id
    branch = tmp_path/'branch'
    train(_seeded(1), branch, resume=other/'model-1.pt', progress=False)
    assert load_ckpt(branch/'model-2.pt')['run_id'] not in (mine['run_id'], theirs['run_id'])
    with pytest.raises(RunFolderError, match='a checkpoint of another run'):   # and it cannot come back either
        train(_seeded(1), other, resume=branch/'model-2.pt', progress=False)

@pytest.mark.parametrize('bad', ['data.batch_size=100000', 'data.size=63', 'trainer.seed=-3'])
def test_failed_start_does_not_block_the_corrected_rerun(tmp_path, bad):
    out = tmp_path/'run'
    with pytest.raises(RadioDiffError): train(tiny_run(4, 2), out, overrides=[bad], progress=False)
    assert not list(out.glob('model-*.pt'))
    s = train(tiny_run(4, 2), out, resume='latest', stop_at=2, progress=False)
    assert s['step'] == 2 and (out/'model-1.pt').exists()
    s = train(tiny_run(4, 2), tmp_path/'run2', progress=False, overrides=['trainer.lr=2e-3'], stop_at=0)   # folder made, nothing trained
    assert train(tiny_run(4, 2), tmp_path/'run2', stop_at=1, progress=False)['step'] == 1              # another config, no checkpoint: accepted

def test_resume_with_fewer_steps_than_done_is_refused(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(RadioDiffError, match=r'model-2\.pt.*step 4.*train_num_steps=3'):
        train(tiny_run(3, 2), run_copy, resume='latest', progress=False)
    assert snapshot(run_copy) == before                                  # config.yaml not rewritten
