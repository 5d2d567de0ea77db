"""Reading training records: every input format, the resume/duplicate rule, garbage tolerance, clear errors."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from radiodiff_vae.core import LogParseError, reference_run_dir
from radiodiff_vae.logs import (read_run, read_text_log, read_jsonl, read_tensorboard, RunLogs, format_log_line,
                                UPSTREAM_AE_KEYS, UPSTREAM_DISC_KEYS, RECORD_FIELDS)

CONFIG = {'model': {'lossconfig': {'disc_start': 300, 'kl_weight': 1e-06, 'disc_weight': 0.5}},
          'trainer': {'lr': 5e-06, 'train_num_steps': 1000, 'log_freq': 100}}


def ae_line(step, total, t, loss, rec=0.02, disc_factor=0.0, lr=0.0):
    return (f'2025-08-15 {t},123 [Train Step] {step}/{total}: train/total_loss: {loss:.5f}, train/logvar: 0.00000, '
            f'train/kl_loss: 143662.89062, train/nll_loss: {rec * 4096:.5f}, train/rec_loss: {rec:.5f}, '
            f'train/d_weight: 5000.00000, train/disc_factor: {disc_factor:.5f}, train/g_loss: -0.44393, lr: {lr:.5f}, ')


def disc_line(step, total, t, disc_loss):
    return (f'2025-08-15 {t},456 [Train Step] {step}/{total}: train/disc_loss: {disc_loss:.5f}, '
            f'train/logits_real: 0.01234, train/logits_fake: -0.00321, lr: 0.00000, ')


def test_upstream_log_with_every_kind_of_noise(tmp_path):
    lines = [
        '2025-08-15 20:00:00,001 ' + repr(CONFIG),                       # config line, with asctime
        ae_line(100, 1000, '20:00:10', 1.5), disc_line(100, 1000, '20:00:10', 0.0),
        '',                                                               # blank
        'train:  10%|#         | 100/1000 [00:10<01:30, 10.00it/s]',     # tqdm line
        'Traceback (most recent call last): garbage',                     # garbage
        ae_line(200, 1000, '20:00:20', 1.25) + '\r',                      # CRLF line ending (\r then \n)
        disc_line(200, 1000, '20:00:20', 0.5),
    ]
    text = '\n'.join(lines) + '\n'
    # a tqdm redraw glued in front of a record by a carriage return, then a truncated last line
    text += 'train:  30%|###       | 300/1000\r' + ae_line(300, 1000, '20:00:30', 1.0) + '\n'
    text += ae_line(400, 1000, '20:00:40', 0.75)[:70]
    (tmp_path / '2025-08-15-20-00_.log').write_bytes(text.encode())
    df, info = read_run(tmp_path / '2025-08-15-20-00_.log')
    assert df.index.tolist() == [100, 200, 300]                          # the cut-off step 400 is not a row
    assert df.loc[200, 'train/total_loss'] == 1.25 and df.loc[200, 'train/disc_loss'] == 0.5   # both passes merged
    assert math.isnan(df.loc[300, 'train/disc_loss'])                    # step 300 has only its first line
    assert info['skipped_lines'] == 4                                     # tqdm, garbage, tqdm fragment, truncated line
    assert info['config'] == CONFIG and info['config_source'].endswith('(first line)')
    assert info['total_steps'] == 1000 and info['resumes'] == []
    assert df.loc[100, 'timestamp'] == pd.Timestamp('2025-08-15 20:00:10.456')   # latest write of the step
    assert set(df['source']) == {'2025-08-15-20-00_.log'}


def test_truncated_last_line_that_still_ends_with_a_pair_is_kept(tmp_path):
    p = tmp_path / 'run.log'
    p.write_text(ae_line(100, 1000, '20:00:10', 1.5) + '\n' + ae_line(200, 1000, '20:00:20', 1.25))  # no final newline
    df, info = read_run(p)
    assert df.index.tolist() == [100, 200] and info['skipped_lines'] == 0


def test_resumed_run_latest_write_wins_and_files_are_time_ordered(tmp_path):
    first = tmp_path / '2025-08-15-20-00_.log'
    second = tmp_path / '2025-08-15-21-00_.log'
    first.write_text(repr(CONFIG) + '\n' + '\n'.join(ae_line(s, 1000, f'20:00:{s // 10:02d}', s / 100) for s in (100, 200, 300)) + '\n')
    second.write_text(repr(CONFIG) + '\n' + '\n'.join(ae_line(s, 1000, f'21:00:{s // 10:02d}', s) for s in (200, 300, 400)) + '\n')
    for args in ((first, second), (second, first), (tmp_path,)):
        df, info = read_run(*args)
        assert df['train/total_loss'].tolist() == [1.0, 200.0, 300.0, 400.0]
        assert df['source'].tolist() == [first.name, second.name, second.name, second.name]
        assert [(r['step'], r['previous_step'], r['repeated_steps'], r['file']) for r in info['resumes']] == [(200, 300, 100, second.name)]


def test_resume_within_one_file_keeps_the_later_values(tmp_path):
    p = tmp_path / 'run.log'
    p.write_text('\n'.join([ae_line(100, 1000, '20:00:10', 1.0), ae_line(200, 1000, '20:00:20', 2.0),
                            ae_line(100, 1000, '20:05:10', 10.0), ae_line(200, 1000, '20:05:20', 20.0)]) + '\n')
    df, info = read_run(p)
    assert df['train/total_loss'].tolist() == [10.0, 20.0]
    assert len(info['resumes']) == 1 and info['resumes'][0]['step'] == 100


def test_jsonl_metrics_file(tmp_path):
    t0 = 1755288000.0
    recs = [{'step': 10, 'total_steps': 100, 'train/total_loss': 1.5, 'train/rec_loss': None, 'lr_ae': 4.9e-06,
             'lr_disc': 4.8e-06, 'wall_time': t0, 'steps_per_s': 2.0, 'session': 0},
            {'step': 20, 'total_steps': 100, 'train/total_loss': 1.25, 'train/rec_loss': 0.01, 'lr_ae': 4.7e-06,
             'lr_disc': 4.6e-06, 'wall_time': t0 + 5, 'steps_per_s': 2.0, 'session': 0},
            {'step': 20, 'milestone': 1, 'val/psnr': 30.5, 'wall_time': t0 + 6}]
    p = tmp_path / 'metrics.jsonl'
    p.write_text('\n'.join(json.dumps(r) for r in recs) + '\nnot json\n{"step": 30, "train/total_')
    df, info = read_run(p)
    assert df.index.tolist() == [10, 20]
    assert df['lr'].tolist() == [4.9e-06, 4.7e-06] and df['lr_disc'].tolist() == [4.8e-06, 4.6e-06]
    assert math.isnan(df.loc[10, 'train/rec_loss'])                       # null -> NaN
    assert df.loc[20, 'val/psnr'] == 30.5 and df.loc[20, 'train/total_loss'] == 1.25   # both records of step 20 merged
    assert info['skipped_lines'] == 2 and info['total_steps'] == 100
    assert (df.loc[20, 'timestamp'] - df.loc[10, 'timestamp']).total_seconds() == pytest.approx(6.0)


def test_published_parsed_csv(tmp_path):
    p = tmp_path / 'training_data_parsed.csv'
    p.write_text('train/total_loss,train/logvar,lr,step,total_steps,timestamp,datetime\n'
                 '1916.70959,0.0,0.0,35000,150000,2025-08-15 20:41:07,2025-08-15 20:41:07\n'
                 'oops,0.0,0.0,not-a-step,150000,,\n'
                 '2660.53979,0.0,0.0,35100,150000,2025-08-15 20:41:25,2025-08-15 20:41:25\n')
    df, info = read_run(p)
    assert df.index.tolist() == [35000, 35100] and info['skipped_lines'] == 1 and info['total_steps'] == 150000
    assert list(df.columns) == ['train/total_loss', 'train/logvar', 'lr', 'timestamp', 'source']
    assert (df['timestamp'].iloc[1] - df['timestamp'].iloc[0]).total_seconds() == 18
    ref, ref_info = read_run(reference_run_dir())
    raw = pd.read_csv(reference_run_dir() / 'training_data_parsed.csv')
    assert len(ref) == len(raw) == 1150
    np.testing.assert_array_equal(ref['train/kl_loss'].to_numpy(), raw['train/kl_loss'].to_numpy())
    assert len(ref_info['samples']) == 30 and ref_info['samples'][1].endswith('sample-2.png')   # numeric order


def test_tensorboard_event_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path / 'tb'))
    for step in (0, 10, 20):
        w.add_scalar('train/total_loss', 100.0 - step, step)
        w.add_scalar('lr_ae', 1e-5 * (1 - step / 100), step)
    w.close()
    df, info = read_run(tmp_path / 'tb')
    assert df.index.tolist() == [0, 10, 20] and info['kinds'] == ['tensorboard']
    np.testing.assert_allclose(df['train/total_loss'], [100.0, 90.0, 80.0])
    np.testing.assert_allclose(df['lr'], [1e-5, 9e-6, 8e-6], rtol=1e-6)   # float32 in the event file
    event_file = next((tmp_path / 'tb').glob('events.out.tfevents.*'))
    assert read_run(event_file)[0].index.tolist() == [0, 10, 20]


def test_run_folder_prefers_metrics_and_finds_config_and_samples(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text(json.dumps({'step': 5, 'train/total_loss': 2.0, 'lr_ae': 1e-4}) + '\n')
    (tmp_path / '2025-08-15-20-00_.log').write_text(ae_line(5, 10, '20:00:00', 9.0) + '\n')
    (tmp_path / 'config.yaml').write_text('trainer:\n  lr: 0.0001\n  train_num_steps: 10\n')
    for n in (10, 9, 1): (tmp_path / f'sample-{n}.png').write_bytes(b'png')
    df, info = read_run(tmp_path)
    assert df['train/total_loss'].tolist() == [2.0] and info['kinds'] == ['jsonl']
    assert any(p.endswith('2025-08-15-20-00_.log') for p in info['ignored'])
    assert info['config'] == {'trainer': {'lr': 0.0001, 'train_num_steps': 10}}
    assert [p.rsplit('/', 1)[-1] for p in info['samples']] == ['sample-1.png', 'sample-9.png', 'sample-10.png']
    assert read_run(tmp_path, config={'trainer': {'lr': 1.0}})[1]['config'] == {'trainer': {'lr': 1.0}}


def test_unparseable_inputs_are_clear_errors(tmp_path):
    binary = tmp_path / 'weights.log'
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(LogParseError, match='weights.log: nothing parseable'):
        read_run(binary)
    empty = tmp_path / 'empty.jsonl'; empty.write_text('\n\n')
    with pytest.raises(LogParseError, match='empty.jsonl'):
        read_run(empty)
    nostep = tmp_path / 'x.csv'; nostep.write_text('a,b\n1,2\n')
    with pytest.raises(LogParseError, match='x.csv.*"step" column'):
        read_run(nostep)
    with pytest.raises(LogParseError, match='no such file'):
        read_run(tmp_path / 'missing.log')
    (tmp_path / 'nolog').mkdir()
    with pytest.raises(LogParseError, match='no training log found'):
        read_run(tmp_path / 'nolog')


def test_huge_line_and_binary_noise_do_not_crash(tmp_path):
    p = tmp_path / 'noisy.log'
    p.write_bytes(b'\x00\xff\xfe' * 1000 + b'\n' + ('x' * 3_000_000).encode() + b'\n'
                  + ae_line(100, 1000, '20:00:10', 1.5).encode() + b'\n' + b'2025-08-15 20:00:11,000 [Train Step] 1' + b'9' * 2_000_000 + b'\n')
    records, info = read_text_log(p)
    assert [r['step'] for r in records] == [100] and info['skipped_lines'] == 3


def test_round_trip_what_the_writer_writes_the_readers_read(tmp_path):
    """RunLogs writes a session (text log, metrics.jsonl, TensorBoard); every reader gives the written values back."""
    rng = np.random.default_rng(0)
    keys = [f'train/{k}' for k in UPSTREAM_AE_KEYS + UPSTREAM_DISC_KEYS]
    written = []
    logs = RunLogs(tmp_path, CONFIG, log_with=["tensorboard"], session=2)
    for step in range(0, 50, 10):
        values = {k: float(rng.normal() * 10.0 ** rng.integers(-7, 4)) for k in keys}
        values['train/kl_loss'] = float('nan') if step == 20 else values['train/kl_loss']
        lr = 5e-6 * (1 - step / 50) ** 0.95
        logs.line(format_log_line(step, 50, values, UPSTREAM_AE_KEYS, lr))
        logs.line(format_log_line(step, 50, values, UPSTREAM_DISC_KEYS, lr))
        book = {'step': step, 'total_steps': 50, 'lr_ae': lr, 'lr_disc': lr / 2, 'wall_time': 1755288000.0 + step,
                'elapsed_s': step / 4, 'steps_per_s': 4.0, 'nonfinite_skips': 0, 'epoch': step // 8}
        assert set(book) <= set(RECORD_FIELDS)      # the documented fields are the written ones
        logs.record({**book, **values})
        written.append({**book, **values})
    logs.record({'step': 40, 'milestone': 1, 'val/psnr': 31.25, 'wall_time': 1755288041.0})
    logs.close()

    expect = pd.DataFrame(written).set_index('step').rename(columns={'lr_ae': 'lr'}).drop(columns='total_steps').astype(float)   # numbers are read as floats
    expect.loc[40, ['milestone', 'val/psnr', 'wall_time']] = [1.0, 31.25, 1755288041.0]   # the later record of step 40 wins
    # metrics.jsonl: full precision, NaN as null and back, lr_ae read as lr, the session number added
    df, info = read_run(tmp_path)
    assert info['kinds'] == ['jsonl'] and info['total_steps'] == 50 and (df['session'] == 2).all()
    pd.testing.assert_frame_equal(df[expect.columns], expect, check_exact=True)
    # the text log: upstream's line format, numbers to 6 significant digits (lr to 10), the config on the first line
    text, tinfo = read_text_log(next(tmp_path.glob('*_.log')))
    assert tinfo['config'] == CONFIG and tinfo['skipped_lines'] == 0 and tinfo['total_steps'] == 50
    for rec, w in zip(text[::2], written):
        assert rec['step'] == w['step'] and rec['lr'] == float(f"{w['lr_ae']:.10g}")
        for k in UPSTREAM_AE_KEYS:
            assert rec[f'train/{k}'] == pytest.approx(w[f'train/{k}'], rel=5e-6, nan_ok=True)
    for rec, w in zip(text[1::2], written):
        assert {k: rec[f'train/{k}'] for k in UPSTREAM_DISC_KEYS} == {k: float(f"{w[f'train/{k}']:.6g}") for k in UPSTREAM_DISC_KEYS}
    # TensorBoard: the same floats (float32), wall_time not a scalar
    tb, _ = read_tensorboard(tmp_path/'tb')
    assert [r['step'] for r in tb] == [w['step'] for w in written] and not any('wall_time' in r for r in tb)
    for rec, w in zip(tb, written):
        assert rec['lr'] == pytest.approx(w['lr_ae'], rel=1e-6) and rec['train/g_loss'] == pytest.approx(w['train/g_loss'], rel=1e-6)


def test_other_trackers_get_the_config_and_the_same_scalars(tmp_path, monkeypatch):
    "A tracker named in log_with (besides tensorboard) is accelerate's class for it: started, given the flat config, every float record, then finished."
    import accelerate.tracking as tracking
    from radiodiff_vae.logs import RunLogs
    seen = []
    class Recorder(tracking.GeneralTracker):
        name, requires_logging_directory = 'mlflow', True
        def __init__(self, run_name, logging_dir): super().__init__(); seen.append(('init', run_name, logging_dir))
        @property
        def tracker(self): return None
        def start(self): seen.append(('start',))
        def store_init_configuration(self, values): seen.append(('config', values))
        def log(self, values, step=None, **kw): seen.append(('log', step, values))
        def finish(self): seen.append(('finish',))
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, 'mlflow', Recorder)
    monkeypatch.setattr(tracking, 'get_available_trackers', lambda: ['mlflow'])
    logs = RunLogs(tmp_path, {'trainer': {'lr': 1e-4}}, log_with=['mlflow'], run_name='r1')
    logs.record({'step': 3, 'train/rec_loss': 0.5, 'wall_time': 1.0, 'milestone': 1})
    logs.close()
    assert seen == [('init', 'r1', str(tmp_path/'trackers')), ('start',), ('config', {'trainer.lr': 1e-4}),
                    ('log', 3, {'train/rec_loss': 0.5}), ('finish',)]
    assert not (tmp_path/'tb').exists()          # tensorboard was not named


def test_a_tracker_whose_package_is_missing_stops_with_one_line(tmp_path, monkeypatch):
    import accelerate.tracking as tracking
    from radiodiff_vae.core import ConfigError
    from radiodiff_vae.logs import RunLogs
    monkeypatch.setattr(tracking, 'get_available_trackers', lambda: [])
    with pytest.raises(ConfigError, match=r"'wandb' needs its package, which is not installed \(pip install wandb\)"):
        RunLogs(tmp_path, {}, log_with=['tensorboard', 'wandb'])
