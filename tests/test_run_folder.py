"""The run folder: one trainer per folder (an OS lock that dies with its process), the table of its files,
checkpoint lookup, and health checks."""
import fnmatch, json, multiprocessing, os, signal, socket, time
from pathlib import Path

import pytest, torch

import radiodiff_vae.run_folder as rf
from radiodiff_vae.config import tiny_config
from radiodiff_vae.core import CheckpointError, RunFolderError
from radiodiff_vae.run_folder import (RUN_FOLDER_FILES, RunLock, read_lock, lock_status, list_checkpoints,
                                      latest_checkpoint, resolve_resume, run_health, remove_temp_files)

FORK = multiprocessing.get_context('fork')   # children start in milliseconds, with the package already imported


def _contender(folder, start, done, results):
    "Wait for `start`, try the lock, report, hold what was won until `done`."
    start.wait(30)
    try:
        RunLock(folder).acquire(); results.put(('won', os.getpid()))
    except RunFolderError as e: results.put(('lost', str(e)))
    done.wait(30)


def test_two_processes_racing_for_one_folder_exactly_one_wins(tmp_path):
    """Before: a just-created empty lock file counted as stale, so two trainers could both own a folder."""
    for i in range(40):
        folder = tmp_path/str(i)
        folder.mkdir()
        if i % 2: (folder/'.lock').write_text(json.dumps({'pid': 2**22 + i, 'host': socket.gethostname()}))  # a dead owner's file
        start, done, results = FORK.Barrier(2), FORK.Barrier(2), FORK.Queue()
        procs = [FORK.Process(target=_contender, args=(folder, start, done, results)) for _ in range(2)]
        for p in procs: p.start()
        outcome = sorted(results.get(timeout=30) for _ in procs)
        for p in procs: p.join(30)
        assert [k for k, _ in outcome] == ['lost', 'won'], (i, outcome)
        assert f'in use by another trainer (pid {outcome[1][1]} on {socket.gethostname()}' in outcome[0][1], outcome
        assert all(p.exitcode == 0 for p in procs)


def _hold(folder, ready, write_owner=True):
    "Take the lock of `folder` (optionally without recording the owner, as in the instant after creating it), then sleep."
    if write_owner: RunLock(folder).acquire()
    else:
        fd = os.open(Path(folder)/'.lock', os.O_RDWR | os.O_CREAT)
        assert rf._flock(fd)
    ready.set()
    time.sleep(120)


def test_a_killed_holder_frees_the_folder_and_is_named_while_alive(tmp_path):
    ready = FORK.Event()
    holder = FORK.Process(target=_hold, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunFolderError, match=rf'in use by another trainer \(pid {holder.pid} on '):
            RunLock(tmp_path).acquire()
        assert lock_status(tmp_path)['alive'] and lock_status(tmp_path)['owner']['pid'] == holder.pid
        with pytest.raises(RunFolderError, match=f'in use by pid {holder.pid}'): remove_temp_files(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL); holder.join(30)
    assert (tmp_path/'.lock').exists() and lock_status(tmp_path)['stale']     # the file stays, nobody holds it
    with RunLock(tmp_path) as lock:
        assert lock.replaced['pid'] == holder.pid and read_lock(tmp_path/'.lock')['pid'] == os.getpid()
    assert not (tmp_path/'.lock').exists()


def test_a_lock_file_without_an_owner_yet_is_not_stale(tmp_path):
    """The old pid-file lock took over an empty lock file (its creator had not written its pid yet): two owners."""
    ready = FORK.Event()
    holder = FORK.Process(target=_hold, args=(tmp_path, ready, False))
    holder.start()
    try:
        assert ready.wait(30) and (tmp_path/'.lock').read_text() == ''
        with pytest.raises(RunFolderError, match='in use by another trainer'): RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL); holder.join(30)
    with RunLock(tmp_path) as lock: assert lock.replaced is None


def test_a_lock_released_while_another_process_opens_it_has_one_owner(tmp_path, monkeypatch):
    """A contender opens `.lock`; the holder releases it (deleting the file) and a third trainer creates and locks a
    new one; the contender's lock on the deleted file must not count, or two trainers would own the folder."""
    first, third = RunLock(tmp_path).acquire(), RunLock(tmp_path)
    real, calls = rf._flock, []
    def flock_after_a_release(fd, shared=False):
        calls.append(fd)
        if len(calls) == 1:
            first.release(); third.acquire()   # between the contender's open and its flock
        return real(fd, shared)
    monkeypatch.setattr(rf, '_flock', flock_after_a_release)
    with pytest.raises(RunFolderError, match=f'pid {os.getpid()}'): RunLock(tmp_path).acquire(patience=0.05)
    assert third.owned and read_lock(tmp_path/'.lock')['pid'] == os.getpid()
    third.release()


def test_lock_is_exclusive_within_a_process_and_released_cleanly(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.owned and read_lock(tmp_path/'.lock')['pid'] == os.getpid()
        with pytest.raises(RunFolderError, match=f'pid {os.getpid()}'): RunLock(tmp_path).acquire(patience=0)
        assert lock.acquire() is lock                      # taking it again is a no-op
    assert not (tmp_path/'.lock').exists() and not lock.owned
    lock.release()                                         # releasing twice is a no-op


def test_a_forked_child_does_not_release_its_parents_lock(tmp_path):
    with RunLock(tmp_path) as lock:
        child = FORK.Process(target=lock.release)
        child.start(); child.join(30)
        assert child.exitcode == 0 and (tmp_path/'.lock').exists() and lock_status(tmp_path)['alive']


def test_a_folder_that_cannot_hold_a_lock_is_a_clear_error(tmp_path):
    (tmp_path/'.lock').mkdir()
    with pytest.raises(RunFolderError, match=r'\.lock: cannot lock the run folder'): RunLock(tmp_path).acquire()


def test_checkpoint_lookup_is_one_rule(tmp_path):
    for name in ('model-10.pt', 'model-9.pt', 'model-x.pt', 'model-3.pt.bak', '.model-11.pt.ab.tmp'): (tmp_path/name).write_bytes(b'')
    assert [m for m, _ in list_checkpoints(tmp_path)] == [9, 10]               # numeric, not lexical order
    assert latest_checkpoint(tmp_path) == resolve_resume(tmp_path, 'latest') == tmp_path/'model-10.pt'
    assert latest_checkpoint(tmp_path/'nothing') is None and resolve_resume(tmp_path/'nothing', 'latest') is None
    with pytest.raises(CheckpointError, match='model-8.pt: no such checkpoint .*model-9.pt, model-10.pt'): resolve_resume(tmp_path, '8')


def test_run_health_and_temp_files(tmp_path):
    torch.save({'step': 2, 'model': {}}, tmp_path/'model-1.pt')
    (tmp_path/'model-2.pt').write_bytes(b'PK\x03\x04 torn')
    (tmp_path/'.model-3.pt.x1.tmp').write_bytes(b'half')
    h = run_health(tmp_path)
    assert (h['newest_good'], h['damaged'], h['resume'], h['temp_files'], h['lock']) == \
        ('model-1.pt', ['model-2.pt'], '--resume latest --resume-skip-damaged', ['.model-3.pt.x1.tmp'], None)
    assert remove_temp_files(tmp_path) == ['.model-3.pt.x1.tmp'] and run_health(tmp_path)['temp_files'] == []


# two steps on 32x32 maps, a checkpoint at each, TensorBoard on: every file a run can write, in seconds
RUN = tiny_config('model.ddconfig.ch_mult=[1]', 'model.lossconfig.disc_start=1', 'data.n_maps=4', 'data.val_maps=1', 'trainer.lr=1e-3',
                  'trainer.train_num_steps=2', 'trainer.save_and_sample_every=1', 'trainer.log_with=[tensorboard]')


def test_the_table_names_every_file_a_run_writes(tmp_path):
    from radiodiff_vae.trainer import train
    out = tmp_path/'run'
    out.mkdir(); (out/'metrics.jsonl').write_text('{"step": 999, "stale": 1}\n')   # what a start that failed before its first checkpoint leaves
    train(RUN, out, progress=False)
    assert '"stale"' not in (out/'metrics.jsonl').read_text(), 'the new run appended to the failed start\'s rows'
    assert '"stale"' in (out/'failed-start-1'/'metrics.jsonl').read_text()
    (out/'.model-3.pt.abcd.tmp').write_bytes(b'')                   # what a killed write leaves
    (out/'nonfinite-step5.json').write_text('{}')                   # what a NaN stop leaves
    with RunLock(out):                                              # what a running trainer holds
        names = sorted(p.name for p in out.iterdir())
    patterns = [f for f, *_ in RUN_FOLDER_FILES]
    unlisted = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    assert not unlisted, f'files a run writes that RUN_FOLDER_FILES does not describe: {unlisted}'
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    assert not unused, f'RUN_FOLDER_FILES rows that no run writes: {unused}'
