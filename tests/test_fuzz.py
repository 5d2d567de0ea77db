"""Hypothesis fuzzing of the log parser (`logs.read_run`) and the config loader (`config.load_config/resolve_config`):
whatever the input, they return a result or raise their documented error (LogParseError / ConfigError), never
anything else; and what is well formed is parsed exactly."""
import json, math, string
from pathlib import Path
import pytest, yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from radiodiff_vae.core import ConfigError, LogParseError
from radiodiff_vae.config import load_config, resolve_config, dump_config, SCHEMA, OLDER_KEYS
from radiodiff_vae.logs import read_run

# deterministic examples (CI must not flake), no example database, no per-example deadline (first calls import pandas)
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

def write(tmp_path, name, data) -> Path:
    path = tmp_path/name
    path.write_bytes(data if isinstance(data, bytes) else data.encode('utf-8', errors='surrogatepass'))
    return path

# ---------------------------------------------------------------------------------------------------------------
# log parser: anything in, a table or LogParseError out

ASCTIME = st.builds(lambda y, mo, d, h, mi, s, ms: f'{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d},{ms:03d}',
                    st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
                    st.integers(0, 99), st.integers(0, 99), st.integers(0, 999))
NUMBER_TEXT = st.one_of(st.sampled_from(['1.00000', '-0.5']), st.floats(allow_nan=True, allow_infinity=True).map(lambda v: f'{v:.5f}'),
                        st.integers(-10**30, 10**30).map(str), st.sampled_from(['nan', 'inf', '-inf', '1e999', '.5', '5.', '']))
KEY = st.one_of(st.sampled_from(['train/total_loss', 'lr', 'a']), st.text(string.ascii_letters + '/_:, ', max_size=12))
RECORD_LINE = st.builds(lambda t, s, tot, pairs, tail: f'{t} [Train Step] {s}/{tot}: ' + ''.join(f'{k}: {v}, ' for k, v in pairs) + tail,
                        ASCTIME, st.integers(0, 10**12), st.integers(0, 10**12), st.lists(st.tuples(KEY, NUMBER_TEXT), max_size=5),
                        st.sampled_from(['', ' ', 'junk', '\r', ',', ': 1']))
JUNK_LINE = st.one_of(st.text(max_size=80), st.sampled_from(['', '{', "{'a': 1, 'b': [1, 2", '{1: 2}', "{'model': {'x': f(1)}}",
                                                             'train:  40%|####      | 4/10 [00:01<00:02]']))
TEXT_LOG = st.lists(st.one_of(RECORD_LINE, JUNK_LINE), max_size=12).map('\n'.join)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
JSONL_LINE = st.one_of(st.dictionaries(st.sampled_from(['step', 'total_steps', 'timestamp', 'wall_time', 'time', 'lr_ae', 'train/x']),
                                       JSON_VALUE, max_size=5).map(lambda d: json.dumps(d)),
                       st.text(max_size=40))

def read_or_error(path):
    "read_run's result, or None when it raised LogParseError (anything else propagates and fails the test)."
    try: df, info = read_run(path)
    except LogParseError as e:
        assert str(e) and '\n' not in str(e).strip(), 'error messages are one line'
        return None
    assert df.index.is_unique and df.index.is_monotonic_increasing
    assert info['rows'] == len(df) and info['skipped_lines'] >= 0
    return df, info

@settings(max_examples=80, **FUZZ)
@given(text=TEXT_LOG, name=st.sampled_from(['run.log', '2025-08-15-20-41_.log', 'metrics.txt']))
def test_text_log_never_crashes(tmp_path_factory, text, name):
    read_or_error(write(tmp_path_factory.mktemp('log'), name, text))

@settings(max_examples=50, **FUZZ)
@given(data=st.binary(max_size=400), name=st.sampled_from(['run.log', 'metrics.jsonl', 'parsed.csv']))
def test_binary_never_crashes(tmp_path_factory, data, name):
    read_or_error(write(tmp_path_factory.mktemp('bin'), name, data))

@settings(max_examples=50, **FUZZ)
@given(lines=st.lists(JSONL_LINE, max_size=8))
def test_jsonl_never_crashes(tmp_path_factory, lines):
    read_or_error(write(tmp_path_factory.mktemp('jsonl'), 'metrics.jsonl', '\n'.join(lines)))

@settings(max_examples=30, **FUZZ)
@given(rows=st.lists(st.lists(st.one_of(st.text(string.printable, max_size=6), st.integers(-5, 10**6).map(str),
                                        st.sampled_from(['inf', '-inf', '1e400', 'nan', '', '2.5', '3.0'])), min_size=1, max_size=4),
                     max_size=6),
       header=st.lists(st.sampled_from(['step', 'total_steps', 'timestamp', 'train/x', 'lr', '', 'step']), min_size=1, max_size=4))
def test_csv_never_crashes(tmp_path_factory, rows, header):
    text = '\n'.join(','.join(r) for r in [header] + rows)
    read_or_error(write(tmp_path_factory.mktemp('csv'), 'parsed.csv', text))

FINITE = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 5))
METRICS = st.dictionaries(st.sampled_from(['train/total_loss', 'train/kl_loss', 'train/rec_loss', 'train/g_loss', 'lr']), FINITE, min_size=1)

@settings(max_examples=40, **FUZZ)
@given(records=st.dictionaries(st.integers(0, 10**6), METRICS, min_size=1, max_size=8),
       junk=st.lists(st.sampled_from(['', 'train:  50%|#####     | 5/10', 'Traceback (most recent call last):', '\x00\x01',
                                      '2025-08-15 20:41:04,512 [Train Step] 7/10: garbage']), max_size=4),
       seed=st.randoms(use_true_random=False))
def test_well_formed_text_log_is_parsed_exactly(tmp_path_factory, records, junk, seed):
    lines = [f'2025-08-15 20:41:{i % 60:02d},512 [Train Step] {s}/{10**6}: ' + ''.join(f'{k}: {v:.5f}, ' for k, v in m.items())
             for i, (s, m) in enumerate(sorted(records.items()))]
    for j in junk: lines.insert(seed.randint(0, len(lines)), j)
    df, info = read_or_error(write(tmp_path_factory.mktemp('ok'), 'run.log', '\n'.join(lines) + '\n'))
    assert list(df.index) == sorted(records)
    for s, m in records.items():
        for k, v in m.items(): assert df.loc[s, k] == pytest.approx(v, abs=1e-9)
    assert info['skipped_lines'] == sum(1 for j in junk if j.strip())

@settings(max_examples=30, **FUZZ)
@given(first=st.dictionaries(st.integers(0, 50), FINITE, min_size=1, max_size=10),
       second=st.dictionaries(st.integers(0, 50), FINITE, min_size=1, max_size=10))
def test_resume_rule_keeps_the_latest_value(tmp_path_factory, first, second):
    "Two sessions' metrics.jsonl appended together: every step once, a repeated step from the later session."
    lines = [json.dumps({'step': s, 'train/x': v, 'session': 0}) for s, v in sorted(first.items())]
    lines += [json.dumps({'step': s, 'train/x': v, 'session': 1}) for s, v in sorted(second.items())]
    df, _ = read_or_error(write(tmp_path_factory.mktemp('resume'), 'metrics.jsonl', '\n'.join(lines) + '\n'))
    assert list(df.index) == sorted(set(first) | set(second))
    for s in df.index: assert df.loc[s, 'train/x'] == (second[s] if s in second else first[s])

def test_empty_and_huge_lines(tmp_path):
    for text in ['', '\n\n  \n', 'x' * 2_000_000, '2025-08-15 20:41:04,512 [Train Step] 1/2: a: 1, ' + 'b' * 2_000_000]:
        with pytest.raises(LogParseError, match='nothing parseable'): read_run(write(tmp_path, 'run.log', text))
    df, info = read_run(write(tmp_path, 'run.log', 'y' * 2_000_000 + '\n2025-08-15 20:41:04,512 [Train Step] 3/9: a: 1.5, \n'))
    assert list(df.index) == [3] and df.loc[3, 'a'] == 1.5 and info['skipped_lines'] == 1

# ---------------------------------------------------------------------------------------------------------------
# config loader: anything in, a validated config or ConfigError out

YAML_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=8),
                        st.sampled_from(['1e-3', '-5', '0', 'nan', '.inf', 'yes', '[1, 2]', '3.0']))
YAML_VALUE = st.recursive(YAML_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=6)
LEAVES = [(s, k) for s, (_, sub, _) in SCHEMA.items() for k in sub if sub[k][0] != 'section']
NESTED = [('model', sec, k) for sec in ('ddconfig', 'lossconfig') for k in SCHEMA['model'][1][sec][1]]

def raw_config(draw):
    "A config-shaped dict: known sections and keys with arbitrary values, sometimes unknown keys or non-dicts."
    raw = {}
    for section, key in draw(st.lists(st.sampled_from(LEAVES), max_size=6)):
        raw.setdefault(section, {})[key] = draw(YAML_VALUE)
    for _, sec, key in draw(st.lists(st.sampled_from(NESTED), max_size=4)):
        raw.setdefault('model', {}).setdefault(sec, {})[key] = draw(YAML_VALUE)
    if draw(st.booleans()): raw[draw(st.sampled_from(['model', 'data', 'trainer', 'extra', 'params']))] = draw(YAML_VALUE)
    return raw

def resolve_or_error(fn, *args):
    "fn's config, or None when it raised ConfigError (anything else fails the test)."
    try: cfg = fn(*args)
    except ConfigError as e:
        assert str(e), 'an empty error message'
        return None
    assert set(cfg) == {'model', 'data', 'trainer'} and resolve_config(yaml.safe_load(dump_config(cfg))) == cfg
    return cfg

@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_resolve_config_never_crashes(data):
    resolve_or_error(resolve_config, raw_config(data.draw))

@settings(max_examples=40, **FUZZ)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      st.builds(yaml.safe_dump, st.dictionaries(st.sampled_from(['model', 'data', 'trainer']), YAML_VALUE, max_size=3))),
       overrides=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(['trainer.lr=1e-4', 'trainer.lr=', 'a=b', '=', 'trainer.=1',
                                                                             'model.ddconfig.ch=[', 'trainer.lr.x=1', 'data.size=-3'])), max_size=3))
def test_load_config_never_crashes(tmp_path_factory, text, overrides):
    path = write(tmp_path_factory.mktemp('cfg'), 'c.yaml', text)
    resolve_or_error(load_config, path, overrides)

@settings(max_examples=40, **FUZZ)
@given(steps=st.integers(1, 10**7), frac=st.floats(0, 1), lr=st.floats(1e-9, 1.0), size=st.integers(1, 4096),
       ch_mult=st.lists(st.integers(1, 8), min_size=1, max_size=5), as_text=st.booleans())
def test_valid_values_are_kept(steps, frac, lr, size, ch_mult, as_text):
    disc_start = int(steps * frac)
    raw = {'trainer': {'train_num_steps': str(steps) if as_text else steps, 'lr': lr},
           'model': {'lossconfig': {'disc_start': disc_start}, 'ddconfig': {'ch_mult': ch_mult}}, 'data': {'size': size}}
    cfg = resolve_or_error(resolve_config, raw)
    assert cfg is not None
    assert (cfg['trainer']['train_num_steps'], cfg['trainer']['lr'], cfg['data']['size']) == (steps, lr, size)
    assert cfg['model']['lossconfig']['disc_start'] == disc_start and cfg['model']['ddconfig']['ch_mult'] == ch_mult

@settings(max_examples=30, **FUZZ)
@given(where=st.sampled_from([(), ('model',), ('data',), ('trainer',), ('model', 'ddconfig'), ('model', 'lossconfig')]),
       key=st.text(string.ascii_lowercase + '_', min_size=1, max_size=12))
def test_unknown_keys_are_named(where, key):
    schema = SCHEMA
    for w in where: schema = schema[w][1]
    if key in schema or '.'.join((*where, key)) in OLDER_KEYS: return   # a key of upstream's files or an older one of ours: read
    raw = node = {}
    for w in where: node = node.setdefault(w, {})
    node[key] = 1
    with pytest.raises(ConfigError) as e: resolve_config(raw)
    assert key in str(e.value)

@settings(max_examples=30, **FUZZ)
@given(key=st.sampled_from(['train_num_steps', 'save_and_sample_every', 'log_freq', 'gradient_accumulate_every']),
       value=st.integers(-10**9, 0))
def test_non_positive_counts_are_refused(key, value):
    with pytest.raises(ConfigError, match=f'trainer.{key}'): resolve_config({'trainer': {key: value}})

# ---------------------------------------------------------------------------------------------------------------
# every command's argument parser (and, through train/reproduce/study, the config loader) with generated command lines:
# exit 0 or 2, never a traceback, and on exit 2 nothing written. Each command's long work is cut short by a sentinel
# raised where it would begin: make-data makes its first map, train draws its first batch (tiny maps) and builds its
# model, then stops before the first forward pass; the others stop where they would score, draw or train.

import contextlib, io, os
from radiodiff_vae.cli import main as cli_main

class ReachedWork(Exception):
    "Every check passed: the command would now do its work."

WORK = {'trainer': 'AutoencoderStep.forward', 'figures': 'save_figures', 'report': 'save_figures',
        'evaluation': 'evaluate_prepared', 'reproduce': 'run_stage', 'study': 'execute_runs', 'pretrained': 'checkpoint_scores'}

def stop_work(mp):
    "Put the sentinels in place (on MonkeyPatch `mp`)."
    import importlib
    from radiodiff_vae import synthetic
    def stop(*a, **k): raise ReachedWork()
    for module, name in WORK.items():
        owner = importlib.import_module(f'radiodiff_vae.{module}')
        *path, attr = name.split('.')
        for p in path: owner = getattr(owner, p)
        mp.setattr(owner, attr, stop)
    real = synthetic.generate_radio_map
    def first_map_only(*a, **k): real(*a, **k); raise ReachedWork()
    mp.setattr(synthetic, 'generate_radio_map', first_map_only)

@pytest.fixture(scope='module')
def no_work():
    mp = pytest.MonkeyPatch(); stop_work(mp)
    yield
    mp.undo()

_GOOD = []
def GOOD_CHECKPOINT() -> bytes:
    "The bytes of a valid tiny checkpoint (made once)."
    if not _GOOD:
        import io as _io, torch
        from radiodiff_vae.model import AutoencoderKL
        from radiodiff_vae.config import tiny_config
        cfg = tiny_config()
        buf = _io.BytesIO(); torch.save({'model': AutoencoderKL(cfg['model']['ddconfig'], 3).state_dict(), 'config': cfg, 'step': 1}, buf)
        _GOOD.append(buf.getvalue())
    return _GOOD[0]

def workspace(root: Path) -> dict:
    "Inputs a command may be pointed at: good and bad configs, logs, checkpoints, study files, folders."
    from radiodiff_vae.study import tiny_study_file
    from radiodiff_vae.config import tiny_config
    files = {'cfg.yaml': yaml.safe_dump(tiny_config()), 'bad.yaml': 'model: [', 'empty.yaml': '', 'list.yaml': '- 1\n',
             'run/r_.log': '2025-01-01 00:00:01,000 [Train Step] 1/9: train/total_loss: 1.0, train/rec_loss: 0.5, \n',
             'garbage.pt': 'not a checkpoint', 'afile': 'in the way'}
    for name, text in files.items():
        (root/name).parent.mkdir(parents=True, exist_ok=True); (root/name).write_text(text)
    (root/'emptydir').mkdir()
    (root/'good.pt').write_bytes(GOOD_CHECKPOINT())
    tiny_study_file(root/'studies')
    return {'cfg': root/'cfg.yaml', 'study': root/'studies'/'tiny.yaml'}

def snapshot_tree(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob('*'))}

TEXT = st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=10)   # a real argv holds no NUL
INT = st.one_of(st.integers(-3, 40), st.integers(1, 8), st.sampled_from([-1, 2**63, 10**20, 999_999, 'ten'])).map(str)   # mostly integers
FLOAT = st.one_of(st.floats(0, 1).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), TEXT)
OUT = st.sampled_from(['new', 'new/deeper', 'emptydir', 'afile', 'afile/sub', 'run', ''])
CONFIG = st.sampled_from(['cfg.yaml', 'bad.yaml', 'empty.yaml', 'list.yaml', 'missing.yaml', 'emptydir', 'afile'])
SET = st.one_of(st.sampled_from(['trainer.lr=1e-4', 'trainer.seed=-5', 'data.size=1000000', 'data.batch_size=100000', 'trainer.nope=1',
                                 'trainer.lr', '=', 'data.size=63', 'trainer.train_num_steps=0', 'model.ddconfig.ch_mult=[]']), TEXT)
DEVICE = st.one_of(st.sampled_from(['cpu', 'cuda', 'cuda:7', 'banana', 'meta', 'mps', '']), TEXT)
DATA = st.one_of(st.sampled_from(['synthetic:2:0:32', 'synthetic:0', 'synthetic:2:-1', 'synthetic:2:0:100000', 'synthetic:x', 'real',
                                  'missing', 'folder:emptydir', 'run']), TEXT)
CKPT = st.sampled_from(['good.pt', 'good.pt', 'garbage.pt', 'missing.pt', 'emptydir', 'released'])

OPTIONS = {   # option -> strategy of its value (None: a flag); positional arguments under ''
    'make-data': {'--out': OUT, '--n': INT, '--seed': INT, '--size': INT, '--num-tx': INT, '--no-progress': None},
    'train': {'--config': CONFIG, '--set': SET, '--out': OUT, '--resume': st.sampled_from(['latest', '3', 'garbage.pt', 'missing.pt']),
              '--steps': INT, '--stop-at': INT, '--seed': INT, '--no-progress': None, '--trust-checkpoint': None},
    'analyze': {'': st.sampled_from(['run', 'run/r_.log', 'missing', 'emptydir', 'garbage.pt']), '--out': OUT, '--smoothing': FLOAT,
                '--dpi': INT, '--config': CONFIG},
    'evaluate': {'--checkpoint': CKPT, '--data': DATA, '--out': OUT, '--limit': INT, '--batch-size': INT, '--device': DEVICE,
                 '--seed': INT, '--config': CONFIG, '--no-progress': None, '--both': None},
    'reproduce': {'--out': OUT, '--config': CONFIG, '--steps': INT, '--seed': INT, '--set': SET, '--eval-synthetic-maps': INT,
                  '--eval-limit': INT, '--no-progress': None},
    'study': {'': st.sampled_from(['studies/tiny.yaml', 'bad.yaml', 'missing.yaml', 'cfg.yaml']), '--out': OUT, '--jobs': INT, '--no-progress': None},
    'release': {'': st.sampled_from(['run', 'missing', 'afile']), '--out': OUT, '--select': DATA, '--card-data': DATA,
                '--weights': st.sampled_from(['ema', 'raw', 'both'])},
}

REQUIRED = {'', '--out', '--n', '--config', '--checkpoint', '--data'}

@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    for option, values in OPTIONS[command].items():
        if not draw(st.booleans()) and option not in REQUIRED: continue
        if option == '': argv.append(draw(values)); continue
        if option in REQUIRED and draw(st.integers(0, 19)) == 0: continue     # sometimes a required option is missing
        argv += [option] if values is None else [option, draw(values)]
    return argv

def _in(root: Path, argv: list) -> list:
    "Relative names made into paths under `root` (values that name nothing there stay as they are)."
    names = {'good.pt', 'new', 'new/deeper', 'emptydir', 'afile', 'afile/sub', 'run', 'run/r_.log', 'missing', 'cfg.yaml', 'bad.yaml',
             'empty.yaml', 'list.yaml', 'missing.yaml', 'garbage.pt', 'missing.pt', 'studies/tiny.yaml'}
    out = []
    for a in argv:
        if a in names: out.append(str(root/a))
        elif a == 'folder:emptydir': out.append(f'folder:{root/"emptydir"}')
        else: out.append(a)
    return out

@settings(max_examples=70, **FUZZ)   # about 30 s on a 2-core machine
@given(argv=command_lines())
def test_every_command_line_exits_0_or_2_without_a_traceback(tmp_path_factory, no_work, argv):
    root = tmp_path_factory.mktemp('cmd')
    workspace(root)
    argv = _in(root, argv)
    before = snapshot_tree(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = cli_main(argv)
        except SystemExit as e: code = e.code          # argparse: usage errors (2) and --help (0)
        except ReachedWork: code = 0                   # every check passed
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    assert 'Traceback' not in err.getvalue(), (argv, err.getvalue()[-3000:])
    if code == 2:
        lines = [l for l in err.getvalue().splitlines() if 'error:' in l]
        assert len(lines) == 1, (argv, err.getvalue()[-2000:])
        assert snapshot_tree(root) == before, (argv, 'a refused command wrote something', lines)
