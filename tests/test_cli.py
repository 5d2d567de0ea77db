"""Bad input everywhere through `radiodiff-vae`: each gets one clear error line naming what is wrong, exit status 2,
no traceback, and nothing written (the --out folder is not created, existing files are untouched)."""
import hashlib, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, yaml
from radiodiff_vae.cli import main
from radiodiff_vae.config import tiny_config

ROOT = Path(__file__).resolve().parent.parent
def snapshot(folder) -> dict:
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob('*')) if p.is_file()}

def fails(capsys, argv, *expected) -> str:
    "Run the CLI in-process; it must return 2 with one `radiodiff-vae CMD: error: ...` line naming `expected`."
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert 'Traceback' not in err and 'Traceback' not in out
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'radiodiff-vae {argv[0]}: error: '), err
    for text in expected: assert str(text) in lines[0], (text, lines[0])
    return lines[0]

def usage_error(capsys, argv, *expected) -> str:
    "argparse errors: exit status 2, usage then one `error:` line."
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    errors = [l for l in err.splitlines() if 'error:' in l]
    assert len(errors) == 1, err
    for text in expected: assert text in errors[0], (text, errors[0])
    return errors[0]

@pytest.fixture
def cfg_file(tmp_path):
    "Write a (possibly broken) tiny config to tmp and return its path."
    def make(cfg, name='c.yaml'):
        path = tmp_path/name
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
        return path
    return make

# ---------------------------------------------------------------------------------------------------------------
# config

def _with(section, key, value, sub=None):
    cfg = tiny_config()
    (cfg[section][sub] if sub else cfg[section])[key] = value
    return cfg

def _finishing(**finish):
    cfg = tiny_config(); cfg['data']['finish'] = finish
    return cfg

CONFIG_CASES = {
    'unknown key': (_with('trainer', 'learning_rate', 1e-3), ['learning_rate', 'valid keys']),
    'unknown nested key': (_with('model', 'chanels', 8, 'ddconfig'), ['model.ddconfig.chanels']),
    'wrong type': (_with('trainer', 'lr', 'fast'), ['trainer.lr', 'number', "'fast'"]),
    'wrong type bool': (_with('trainer', 'learn_logvar', 'maybe'), ['trainer.learn_logvar']),
    'negative steps': (_with('trainer', 'train_num_steps', -5), ['trainer.train_num_steps', '-5']),
    'zero batch': (_with('data', 'batch_size', 0), ['data.batch_size']),
    'disc_start past the end': (_with('model', 'disc_start', 99, 'lossconfig'), ['model.lossconfig.disc_start', '99']),
    'bad choice': (_with('trainer', 'schedule', 'linear'), ['trainer.schedule', 'linear']),
    'finishing phase longer than the run': (_finishing(size=64, steps=9), ['data.finish.steps', 'got 9', '--set data.finish.steps=']),
    'finishing steps without a size': (_finishing(steps=3), ['data.finish.size', 'missing']),
    'finishing batch size zero': (_finishing(size=64, steps=3, batch_size=0), ['data.finish.batch_size', 'positive integer']),
    'finishing phase on windows': (_finishing(size=64, steps=3, crop=32), ['data.finish', "unknown field 'crop'"]),
    'not yaml': ('model: [unclosed\n  - x: {', ['not valid YAML']),
    'not a mapping': ('- just\n- a list\n', ['expected a mapping']),
}

@pytest.mark.parametrize('case', list(CONFIG_CASES))
def test_bad_config(capsys, tmp_path, cfg_file, case):
    cfg, expected = CONFIG_CASES[case]
    path = cfg_file(cfg)
    fails(capsys, ['train', '--config', path, '--out', tmp_path/'out'], str(path), *expected)
    assert not (tmp_path/'out').exists()

def test_bad_overrides_and_arguments(capsys, tmp_path, cfg_file):
    path, out = cfg_file(tiny_config()), tmp_path/'out'
    fails(capsys, ['train', '--config', tmp_path/'missing.yaml', '--out', out], 'missing.yaml', 'not found')
    fails(capsys, ['train', '--config', path, '--out', out, '--set', 'trainer.nope=1'], 'trainer.nope')
    fails(capsys, ['train', '--config', path, '--out', out, '--set', 'trainer.lr'], 'trainer.lr', 'section.key=value')
    fails(capsys, ['train', '--config', path, '--out', out, '--steps', '-3'], '--steps', '-3')   # checked at parse time (checks.check_args)
    fails(capsys, ['train', '--config', path, '--out', out, '--steps', '1', '--set', 'model.lossconfig.disc_start=2'], 'disc_start')  # set explicitly: 2 > 1 step
    fails(capsys, ['train', '--config', path, '--out', out, '--resume', tmp_path/'nope.pt'], 'nope.pt')
    assert not out.exists()

def test_usage_errors(capsys, tmp_path, cfg_file):
    usage_error(capsys, [], 'required')
    usage_error(capsys, ['fly'], "invalid choice: 'fly'")
    usage_error(capsys, ['train', '--out', tmp_path/'o'], '--config')
    usage_error(capsys, ['train', '--config', cfg_file(tiny_config()), '--learning-rate', '1'], '--learning-rate')
    usage_error(capsys, ['train', '--config', cfg_file(tiny_config()), '--steps', 'ten'], '--steps', "'ten'")
    usage_error(capsys, ['evaluate', '--checkpoint', 'x.pt', '--out', tmp_path/'o'], '--data')
    usage_error(capsys, ['evaluate', '--checkpoint', 'x.pt', '--data', 'real', '--out', tmp_path/'o', '--ema', '--both'], '--both')
    usage_error(capsys, ['analyze', '--out', tmp_path/'o'], 'RUN_OR_LOG')
    usage_error(capsys, ['make-data', '--out', tmp_path/'o'], '--n')
    assert not (tmp_path/'o').exists()

# ---------------------------------------------------------------------------------------------------------------
# data

def test_bad_training_data(capsys, tmp_path, cfg_file):
    empty = tmp_path/'empty'; empty.mkdir()
    for root, expected in [(tmp_path/'no_such_folder', 'no_such_folder'), (empty, 'empty')]:
        for source in ('folder', 'radiomapseer'):
            cfg = tiny_config(); cfg['data'].update(source=source, root=str(root))
            fails(capsys, ['train', '--config', cfg_file(cfg), '--out', tmp_path/'out'], expected)
    assert not (tmp_path/'out').exists()

@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A valid tiny autoencoder checkpoint."
    import torch
    from radiodiff_vae.model import AutoencoderKL, save_autoencoder
    torch.manual_seed(0)
    return save_autoencoder(AutoencoderKL(tiny_config()['model']['ddconfig'], 3), tmp_path_factory.mktemp('ckpt')/'model-1.pt')

def test_bad_evaluation_data(capsys, tmp_path, checkpoint):
    empty = tmp_path/'empty'; empty.mkdir()
    for data, expected in [(tmp_path/'no_such_folder', 'no_such_folder'), (f'folder:{empty}', 'empty'), ('synthetic:0', 'synthetic:0'),
                           ('synthetic:x', 'synthetic:x')]:
        fails(capsys, ['evaluate', '--checkpoint', checkpoint, '--data', data, '--out', tmp_path/'out', '--no-progress'], expected)
    assert not (tmp_path/'out').exists()

def test_bad_make_data(capsys, tmp_path):
    for args, expected in [(['--n', '0'], '0'), (['--n', '2', '--size', '-8'], '-8'), (['--n', '2', '--num-tx', '0'], 'num')]:
        fails(capsys, ['make-data', '--out', tmp_path/'out', '--no-progress', *args], *expected.split())
        assert not (tmp_path/'out').exists()
    (tmp_path/'file').write_text('not a folder')
    fails(capsys, ['make-data', '--out', tmp_path/'file', '--n', '1', '--size', '32', '--no-progress'], 'file')
    assert (tmp_path/'file').read_text() == 'not a folder'

# ---------------------------------------------------------------------------------------------------------------
# checkpoints

@pytest.mark.parametrize('content', [b'', b'garbage, not a checkpoint' * 10, b'PK\x03\x04' + b'\x00' * 100])
def test_bad_checkpoint_for_evaluate(capsys, tmp_path, checkpoint, content):
    bad = tmp_path/'model-3.pt'; bad.write_bytes(content)
    fails(capsys, ['evaluate', '--checkpoint', bad, '--data', 'synthetic:2:0:32', '--out', tmp_path/'out', '--no-progress'], 'model-3.pt')
    truncated = tmp_path/'model-4.pt'; truncated.write_bytes(checkpoint.read_bytes()[:len(checkpoint.read_bytes()) // 2])
    fails(capsys, ['evaluate', '--checkpoint', truncated, '--data', 'synthetic:2:0:32', '--out', tmp_path/'out', '--no-progress'], 'model-4.pt')
    fails(capsys, ['evaluate', '--checkpoint', tmp_path/'absent.pt', '--data', 'synthetic:2:0:32', '--out', tmp_path/'out'], 'absent.pt')
    assert not (tmp_path/'out').exists()

def test_checkpoint_of_another_architecture(capsys, tmp_path, checkpoint):
    import torch
    other = torch.load(checkpoint, weights_only=True)
    other['config']['model']['ddconfig']['ch_mult'] = [1, 2, 2]   # the weights no longer fit the architecture it names
    bad = tmp_path/'model-7.pt'; torch.save(other, bad)
    fails(capsys, ['evaluate', '--checkpoint', bad, '--data', 'synthetic:2:0:32', '--out', tmp_path/'out', '--no-progress'], 'model-7.pt')
    assert not (tmp_path/'out').exists()

# ---------------------------------------------------------------------------------------------------------------
# logs

LOGS = {'garbage.log': b'this is not a training log\nneither is this\n', 'binary.log': bytes(range(256)) * 40, 'empty.log': b'',
        'huge.log': b'z' * 3_000_000, 'metrics.jsonl': b'{"no": "step"}\n[1, 2]\n', 'parsed.csv': b'a,b\n1,2\n'}

@pytest.mark.parametrize('name', list(LOGS))
def test_bad_logs_for_analyze(capsys, tmp_path, name):
    log = tmp_path/name; log.write_bytes(LOGS[name])
    fails(capsys, ['analyze', log, '--out', tmp_path/'out'], name)
    assert not (tmp_path/'out').exists()

def test_analyze_keeps_existing_outputs(capsys, tmp_path):
    out = tmp_path/'out'; out.mkdir(); (out/'REPORT.md').write_text('an earlier report')
    before = snapshot(out)
    fails(capsys, ['analyze', tmp_path/'absent_run', '--out', out], 'absent_run')
    empty = tmp_path/'run'; empty.mkdir()
    fails(capsys, ['analyze', empty, '--out', out], 'no training log')
    (tmp_path/'g.log').write_bytes(LOGS['garbage.log'])
    fails(capsys, ['analyze', tmp_path/'g.log', '--out', out, '--smoothing', '1.5'], '1.5')
    assert snapshot(out) == before

# ---------------------------------------------------------------------------------------------------------------
# the installed entry point in a real process (a few: each pays the imports)

def run_cli(*args):
    return subprocess.run([sys.executable, '-c', 'import sys; from radiodiff_vae.cli import main; sys.exit(main())', *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)

def test_real_process_exit_status(tmp_path):
    (tmp_path/'c.yaml').write_text(yaml.safe_dump(_with('trainer', 'train_num_steps', -1)))
    (tmp_path/'bad.pt').write_bytes(b'\x00' * 64)
    for args, expected in [(['train', '--config', tmp_path/'c.yaml', '--out', tmp_path/'out'], 'train_num_steps'),
                           (['evaluate', '--checkpoint', tmp_path/'bad.pt', '--data', 'synthetic:2', '--out', tmp_path/'out'], 'bad.pt'),
                           (['train', '--bogus'], '--bogus')]:
        r = run_cli(*args)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert expected in [l for l in r.stderr.splitlines() if 'error:' in l][0]
    assert not (tmp_path/'out').exists()

# ---------------------------------------------------------------------------------------------------------------
# checked before any work, one line each (issue 34: items 6, 9, 10, 12, 14)

def _a_log(tmp_path):
    "A tiny upstream-format log analyze can read."
    log = tmp_path/'run'/'r_.log'; log.parent.mkdir(exist_ok=True)
    log.write_text(''.join(f'2025-01-01 00:00:0{s},000 [Train Step] {s}/9: train/total_loss: 1.0, train/rec_loss: 0.5, lr: 0.001, \n' for s in range(1, 4)))
    return log

def _every_command(tmp_path, checkpoint, study_file, out):
    "One valid-looking command line per command, writing into `out`."
    cfg = tmp_path/'cfg.yaml'; cfg.write_text(yaml.safe_dump(tiny_config()))
    return {'make-data': ['make-data', '--out', out, '--n', '1', '--size', '32', '--no-progress'],
            'train': ['train', '--config', cfg, '--out', out, '--no-progress'],
            'analyze': ['analyze', _a_log(tmp_path), '--out', out],
            'evaluate': ['evaluate', '--checkpoint', checkpoint, '--data', 'synthetic:2:0:32', '--out', out, '--no-progress'],
            'reproduce': ['reproduce', '--out', out, '--config', cfg, '--no-progress'],
            'study': ['study', study_file, '--out', out, '--no-progress'],
            'release': ['release', tmp_path, '--out', out]}

@pytest.mark.parametrize('command', ['make-data', 'train', 'analyze', 'evaluate', 'reproduce', 'study', 'release'])
def test_output_folder_that_cannot_be_made_is_one_line(capsys, tmp_path, checkpoint, command):
    from radiodiff_vae.study import tiny_study_file
    study_file = tiny_study_file(tmp_path/'s')
    blocker = tmp_path/'a_file'; blocker.write_text('in the way')
    for out, expected in [(blocker, 'exists and is not a folder'), (blocker/'sub', 'is a file, not a folder')]:
        fails(capsys, _every_command(tmp_path, checkpoint, study_file, out)[command], str(blocker), expected)
    assert blocker.read_text() == 'in the way'
    if os.geteuid() != 0:
        ro = tmp_path/'ro'; ro.mkdir(); os.chmod(ro, 0o555)
        try: fails(capsys, _every_command(tmp_path, checkpoint, study_file, ro/'out')[command], 'not writable')
        finally: os.chmod(ro, 0o755)

def test_seeds_devices_sizes_and_dpi_are_checked_first(capsys, tmp_path, checkpoint, cfg_file):
    out, cfg = tmp_path/'out', cfg_file(tiny_config())
    for seed in ('-1', '99999999999999999999999'):
        fails(capsys, ['make-data', '--out', out, '--n', '1', '--seed', seed], '--seed', seed)
        fails(capsys, ['train', '--config', cfg, '--out', out, '--seed', seed], '--seed', seed)
    fails(capsys, ['train', '--config', cfg, '--out', out, '--seed', '-5'], '--seed', '-5')
    fails(capsys, ['train', '--config', cfg, '--out', out, '--set', 'trainer.seed=-5'], 'trainer.seed', '-5')
    for device, expected in [('banana', 'not a device name')] + ([] if __import__('torch').cuda.is_available() else [('cuda', 'no CUDA GPU')]):
        fails(capsys, ['evaluate', '--checkpoint', checkpoint, '--data', 'synthetic:2:0:32', '--out', out, '--device', device], device, expected)
    fails(capsys, ['make-data', '--out', out, '--n', '1', '--size', '1000000'], '--size', 'needs about', 'TiB')
    fails(capsys, ['train', '--config', cfg, '--out', out, '--set', 'data.size=1000000'], 'data.size=1000000', 'needs about')
    fails(capsys, ['evaluate', '--checkpoint', checkpoint, '--data', 'synthetic:2:0:100000', '--out', out], 'synthetic:2:0:100000', 'needs about')
    log = _a_log(tmp_path)
    for dpi in ('0', '100000'): fails(capsys, ['analyze', log, '--out', out, '--dpi', dpi], '--dpi', dpi)
    assert not out.exists()

def test_logs_beyond_drawing_are_one_line_and_leave_no_partial_figures(capsys, tmp_path):
    "issue 34 item 14: a log with a negative step and 1e308 losses."
    import json
    run = tmp_path/'run'; run.mkdir()
    rows = [{'step': s, 'total_steps': 9, 'train/total_loss': 1e308, 'train/rec_loss': 1e308, 'train/kl_loss': 1e308,
             'train/nll_loss': 1e308, 'lr_ae': 1e-3} for s in (-5, 1, 2, 3)]
    (run/'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    out = tmp_path/'out'
    capsys.readouterr()
    code = main(['analyze', str(run), '--out', str(out)])
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    if code == 2:
        assert '1e+308' in err and not out.exists()
    else: assert code == 0 and (out/'REPORT.md').exists()

def test_run_folder_names_that_are_not_utf8_can_be_analysed(capsys, tmp_path):
    "issue 34 item 11: figure titles name the run by its folder."
    run = Path(os.fsdecode(bytes(tmp_path) + b'/caf\xe9'))
    run.mkdir()
    (run/'r_.log').write_text(_a_log(tmp_path).read_text())
    assert main(['analyze', str(run), '--out', str(tmp_path/'out')]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path/'out'/'REPORT.md').exists()

# ---------------------------------------------------------------------------------------------------------------
# messages that say what is true (issue 34 item 15)

def test_damaged_checkpoint_messages_are_whole_and_do_not_advise_the_unsafe_loader(capsys, tmp_path, checkpoint):
    rand = tmp_path/'model-5.pt'; rand.write_bytes(os.urandom(4096))
    line = fails(capsys, ['evaluate', '--checkpoint', rand, '--data', 'synthetic:2:0:32', '--out', tmp_path/'out'], 'model-5.pt')
    assert 'weights_only' not in line and 'bytes are neither the zip archive torch.save writes nor a pickle' in line
    data = checkpoint.read_bytes()
    cut = tmp_path/'model-6.pt'; cut.write_bytes(data[:len(data) // 2])
    line = fails(capsys, ['evaluate', '--checkpoint', cut, '--data', 'synthetic:2:0:32', '--out', tmp_path/'out'], 'model-6.pt', 'truncated')
    assert 'high likelihood' not in line and line.rstrip().endswith('use another checkpoint of the run')

def test_config_folder_empty_config_and_missing_release_folder(capsys, tmp_path, cfg_file):
    (tmp_path/'conf').mkdir()
    fails(capsys, ['train', '--config', tmp_path/'conf', '--out', tmp_path/'out'], 'conf', 'is a folder')
    fails(capsys, ['train', '--config', cfg_file('', 'empty.yaml'), '--out', tmp_path/'out'], 'empty.yaml', 'is empty')
    fails(capsys, ['train', '--config', cfg_file('# only a comment\n', 'comment.yaml'), '--out', tmp_path/'out'], 'comment.yaml', 'is empty')
    fails(capsys, ['release', tmp_path/'no_such_run', '--out', tmp_path/'out'], 'no_such_run', 'no such run folder')
    assert not (tmp_path/'out').exists()

def test_transparent_maps_say_their_alpha_is_dropped(capsys, tmp_path, checkpoint):
    from PIL import Image
    maps = tmp_path/'maps'; maps.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8); rgba[..., :3] = 120; rgba[..., 3] = 128
    Image.fromarray(rgba, 'RGBA').save(maps/'see_through.png')
    capsys.readouterr()
    assert main(['evaluate', '--checkpoint', str(checkpoint), '--data', str(maps), '--out', str(tmp_path/'out'), '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'alpha' in err and 'see_through.png' in err

def test_module_entry_points_share_the_checks(capsys, tmp_path, cfg_file):
    "`python -m radiodiff_vae.study` and `python -m radiodiff_vae.trainer` (accelerate launch) check like `radiodiff-vae`."
    from radiodiff_vae.study import main as study_main
    from radiodiff_vae.trainer import main as train_main
    blocker = tmp_path/'a_file'; blocker.write_text('x')
    from radiodiff_vae.study import tiny_study_file
    assert study_main([str(tiny_study_file(tmp_path/'s')), '--out', str(blocker/'sub'), '--no-progress']) == 2
    assert train_main(['--config', str(cfg_file(tiny_config())), '--out', str(tmp_path/'o'), '--seed', '-1']) == 2
    err = capsys.readouterr().err
    assert 'is a file, not a folder' in err and '--seed' in err and 'Traceback' not in err and not (tmp_path/'o').exists()
