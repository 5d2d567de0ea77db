"Config loading: upstream forms, overrides, type and range errors."
from pathlib import Path
import pytest, yaml
from radiodiff_vae.config import load_config, resolve_config, dump_config, config_differences, schema_table
from radiodiff_vae.distributed import choose_precision, read_cpu_flags
from radiodiff_vae.core import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT/'configs'

@pytest.mark.parametrize('name', ['first_radio_upstream.yaml', 'radiodiff.yaml', 'quickstart.yaml'])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(CONFIGS/name)
    assert resolve_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert set(cfg) == {'model', 'data', 'trainer'}

def test_upstream_values_kept():
    up = load_config(CONFIGS/'first_radio_upstream.yaml')
    rd = load_config(CONFIGS/'radiodiff.yaml')
    for cfg in (up, rd):
        assert cfg['model']['ddconfig']['ch'] == 128 and cfg['model']['ddconfig']['ch_mult'] == [1, 2, 4]
        assert cfg['model']['lossconfig']['disc_start'] == 50001 and cfg['model']['lossconfig']['kl_weight'] == 1e-6
        assert cfg['trainer']['lr'] == 5e-6 and cfg['trainer']['min_lr'] == 5e-7
        assert cfg['trainer']['train_num_steps'] == 150000 and cfg['trainer']['save_and_sample_every'] == 5000
    assert up['trainer']['gradient_accumulate_every'] == 2 and up['model']['ckpt_path'] is None
    assert rd['trainer']['schedule'] == 'radiodiff' and rd['trainer']['grad_clip_norm'] is None
    assert rd['data']['size'] == 256

def test_params_wrapped_form_equals_flat_form(tmp_path):
    flat = yaml.safe_load((CONFIGS/'first_radio_upstream.yaml').read_text())
    wrapped = dict(flat)
    loss = flat['model']['lossconfig']
    params = {k: v for k, v in flat['model'].items()}
    params['lossconfig'] = {'target': 'ldm.modules.losses.LPIPSWithDiscriminator', 'params': loss}
    wrapped['model'] = {'target': 'ldm.models.autoencoder.AutoencoderKL', 'params': params}
    (tmp_path/'w.yaml').write_text(yaml.safe_dump(wrapped))
    assert load_config(tmp_path/'w.yaml') == load_config(CONFIGS/'first_radio_upstream.yaml')
    wrapped['model']['target'] = 'ldm.models.autoencoder.VQModel'
    (tmp_path/'v.yaml').write_text(yaml.safe_dump(wrapped))
    with pytest.raises(ConfigError, match='AutoencoderKL'): load_config(tmp_path/'v.yaml')

def test_overrides_parse_with_yaml():
    cfg = load_config(CONFIGS/'quickstart.yaml', ['trainer.lr=1e-5', 'model.ddconfig.ch_mult=[1,2]',
                                                   'trainer.grad_clip_norm=null', 'data.source=synthetic'])
    assert cfg['trainer']['lr'] == 1e-5 and cfg['model']['ddconfig']['ch_mult'] == [1, 2]
    assert cfg['trainer']['grad_clip_norm'] is None

@pytest.mark.parametrize('override,needle', [
    ('trainer.lr_min=1', "unknown key 'trainer.lr_min'"),
    ('trainer.nope.x=1', 'valid keys'),
    ('model.ddconfig.chh=3', 'valid keys'),
    ('data.batch_size=two', 'data.batch_size'),
    ('data.batch_size=2.5', 'expected an integer'),
    ('trainer.learn_logvar=maybe', 'true or false'),
    ('trainer.train_num_steps=-5', 'train_num_steps'),
    ('trainer.save_and_sample_every=0', 'save_and_sample_every'),
    ('model.lossconfig.disc_start=1201', 'disc_start'),
    ('trainer.mixed_precision=fp8', "expected fp32 (also written no, none or false), bf16, fp16 or auto; got 'fp8'"),
    ('trainer.mixed_precision=true', 'got True'),
    ('trainer.compile=yes please', 'expected null (eager), true (= default) or one of'),
    ('model.lossconfig.disc_num_layers=2', "disc_num_layers: 2 is not supported; the same; only 3 loads (upstream's file sets 3)"),
    ('trainer.disc_lr=0.0001', 'trainer.disc_lr: 0.0001 is no longer a setting (the discriminator learns at trainer.lr, as upstream); remove trainer.disc_lr'),
    ('trainer.ema_decay=1.5', 'ema_decay'),
    ('model.lossconfig.disc_conditional=true', 'disc_conditional: true is not supported'),
    ('trainer.lr', 'section.key=value'),
    ('model.ddconfig.resolution=[1,2,3]', 'expected 2 values'),
])
def test_bad_values_are_clear_errors(override, needle):
    with pytest.raises(ConfigError, match=__import__('re').escape(needle)):
        load_config(CONFIGS/'quickstart.yaml', [override])

def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    (tmp_path/'c.yaml').write_text('trainer:\n  learning_rate: 1e-4\n')
    with pytest.raises(ConfigError) as e: load_config(tmp_path/'c.yaml')
    msg = str(e.value)
    assert 'trainer.learning_rate' in msg and 'min_lr' in msg and 'c.yaml' in msg

@pytest.mark.parametrize('text,needle', [('model: [1, 2]\n', 'mapping'), ('a: b: c\n', 'not valid YAML'),
                                         ('- 1\n', 'mapping of sections'), ('colour: red\n', 'valid keys')])
def test_malformed_files(tmp_path, text, needle):
    (tmp_path/'c.yaml').write_text(text)
    with pytest.raises(ConfigError, match=needle): load_config(tmp_path/'c.yaml')

def test_missing_file():
    with pytest.raises(ConfigError, match='not found'): load_config('no/such/config.yaml')

def test_config_differences_ignores_bookkeeping():
    a = load_config(CONFIGS/'quickstart.yaml')
    assert config_differences(a, load_config(CONFIGS/'quickstart.yaml', ['trainer.train_num_steps=1600', 'trainer.log_freq=3'])) == []
    assert config_differences(a, load_config(CONFIGS/'quickstart.yaml', ['model.embed_dim=4'])) == ['model.embed_dim']

def test_schema_table_covers_every_leaf():
    keys = [r[0] for r in schema_table()]
    assert 'model.ddconfig.ch' in keys and 'trainer.max_nonfinite_skips' in keys and len(keys) == len(set(keys))

def test_schedule_settings_checked_at_load():
    with pytest.raises(ConfigError, match='trainer.warmup_steps'):
        load_config(CONFIGS/'quickstart.yaml', ['trainer.warmup_steps=5000'])
    with pytest.raises(ConfigError, match='trainer.min_lr'):
        load_config(CONFIGS/'quickstart.yaml', ['trainer.min_lr=0.1'])
    for bad in ('0', '1.5', '0.99'):   # 0.99 of 1200 steps leaves no room for the 60 warm-up steps
        with pytest.raises(ConfigError, match='trainer.decay_fraction'):
            load_config(CONFIGS/'quickstart.yaml', ['trainer.schedule=wsd', f'trainer.decay_fraction={bad}'])
    cfg = load_config(CONFIGS/'quickstart.yaml', ['trainer.schedule=wsd', 'trainer.decay_fraction=0.3'])
    assert cfg['trainer']['decay_fraction'] == 0.3
    load_config(CONFIGS/'quickstart.yaml', ['trainer.decay_fraction=0.99'])   # only wsd reads it


@pytest.mark.parametrize('typed,stored', [('no', 'no'), ('false', 'no'), ('fp32', 'no'), ('none', 'no'), ('FP32', 'no'),
                                          ('bf16', 'bf16'), ('fp16', 'fp16'), ('auto', 'auto'), ('null', None)])
def test_mixed_precision_as_users_type_it(typed, stored):
    """`--set trainer.mixed_precision=no` arrives as YAML false: it was refused ("expected one of ['no', 'bf16',
    'fp16'], got False"); every spelling of full precision is now stored as 'no', the name the trainer passes to accelerate."""
    cfg = load_config(CONFIGS/'quickstart.yaml', [f'trainer.mixed_precision={typed}'])
    assert cfg['trainer']['mixed_precision'] == stored
    assert resolve_config(yaml.safe_load(dump_config(cfg))) == cfg

def test_mixed_precision_in_a_file(tmp_path):
    (tmp_path/'c.yaml').write_text('trainer:\n  mixed_precision: no\n')      # YAML 1.1: a bare no is false
    assert load_config(tmp_path/'c.yaml')['trainer']['mixed_precision'] == 'no'
    (tmp_path/'c.yaml').write_text('trainer:\n  fp16: true\n  mixed_precision: fp32\n')
    with pytest.raises(ConfigError, match='trainer.fp16 is true'): load_config(tmp_path/'c.yaml')

def test_new_trainer_keys_default_to_todays_behaviour():
    t = resolve_config({})['trainer']                          # keys left out: today's behaviour (fp32 unless upstream's fp16)
    assert (t['train_discriminator'], t['compile'], t['mixed_precision']) == (True, None, None)
    for name in ('radiodiff.yaml', 'released.yaml', 'quickstart.yaml'):   # every shipped config chooses bf16 where it is native
        assert load_config(CONFIGS/name)['trainer']['mixed_precision'] == 'auto'
    assert '0.15 dB below fp32 on the real maps' in (CONFIGS/'quickstart.yaml').read_text()   # the quickstart's check, stated
    keys = {r[0]: r for r in schema_table()}
    assert all(keys[f'trainer.{k}'][3] for k in ('train_discriminator', 'compile'))   # documented
    # a run folder written before these keys existed is the same run
    old = load_config(CONFIGS/'quickstart.yaml')
    for k in ('train_discriminator', 'compile'): del old['trainer'][k]
    assert config_differences(resolve_config(old), load_config(CONFIGS/'quickstart.yaml')) == []
    assert config_differences(resolve_config(old), load_config(CONFIGS/'quickstart.yaml', ['trainer.compile=true'])) == []

@pytest.mark.parametrize('flags,expected', [({'fpu', 'avx2'}, 'no'), ({'avx512f', 'avx512_bf16'}, 'bf16'),
                                            ({'amx_tile', 'amx_bf16'}, 'bf16'), (set(), 'no')])
def test_auto_precision_on_cpus_with_and_without_native_bf16(flags, expected):
    mode, reason = choose_precision('auto', 'cpu', cpu_flags=flags)
    assert mode == expected and reason.startswith('auto: the CPU has')
    assert choose_precision('fp32', 'cpu', cpu_flags=flags) == ('no', 'requested')   # fp32 stays one override away

def test_auto_precision_reads_the_cpu_flags_when_not_given(tmp_path, monkeypatch):
    from radiodiff_vae import distributed
    info = tmp_path/'cpuinfo'
    info.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 amx_bf16 amx_tile\n')
    assert read_cpu_flags(info) >= {'amx_bf16', 'fpu'}
    monkeypatch.setattr(distributed, "read_cpu_flags", lambda path="/proc/cpuinfo": read_cpu_flags(info))
    assert choose_precision('auto', 'cpu') == ('bf16', 'auto: the CPU has amx_bf16')
    info.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2\n')
    assert choose_precision('auto', 'cpu')[0] == 'no'

def test_auto_precision_on_gpus():
    assert choose_precision('auto', 'cuda', cuda_bf16=True)[0] == 'bf16'
    assert choose_precision('auto', 'cuda', cuda_bf16=False)[0] == 'no'
    assert choose_precision('fp16', 'cuda') == ('fp16', 'requested')
    with pytest.raises(ConfigError, match='fp16 needs a CUDA GPU'): choose_precision('fp16', 'cpu')

@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='needs a CUDA GPU')
def test_auto_precision_on_this_gpu():
    "auto on this GPU against what is known of it by name (not by the capability rule under test): bf16 on Ampere and later."
    import torch
    name = torch.cuda.get_device_name()
    known = {'H200': 'bf16', 'H100': 'bf16', 'A100': 'bf16', 'A10': 'bf16', 'L40': 'bf16', 'L4': 'bf16', 'RTX 30': 'bf16', 'RTX 40': 'bf16',
             'V100': 'no', 'T4': 'no', 'P100': 'no', 'RTX 20': 'no', 'GTX': 'no'}
    expected = next((mode for model, mode in known.items() if model in name), None)
    if expected is None: pytest.skip(f'no known bf16 support for {name!r}')
    why = 'auto: the CUDA GPU computes bf16 natively' if expected == 'bf16' else 'auto: the CUDA GPU has no native bf16 (compute capability < 8), so fp32'
    assert choose_precision('auto', 'cuda') == (expected, why), name

def test_quickstart_finishes_on_larger_maps():
    "The shipped quickstart ends with its finishing phase (tuning rounds 7-9), and a bad phase is refused with the key named."
    qs = load_config(CONFIGS/'quickstart.yaml')
    assert (qs['data']['finish'], qs['trainer']['train_num_steps']) == ({'size': 192, 'steps': 108, 'batch_size': 1}, 1188)
    with pytest.raises(ConfigError, match='data.finish.steps'):
        load_config(CONFIGS/'quickstart.yaml', ['data.finish.steps=1189'])
    with pytest.raises(ConfigError, match='data.finish.batch_size'):
        load_config(CONFIGS/'quickstart.yaml', ['data.finish.batch_size=0'])
    with pytest.raises(ConfigError, match='data.finish.size'):
        load_config(CONFIGS/'quickstart.yaml', ['data.finish.size=130'])
    assert load_config(CONFIGS/'quickstart.yaml', ['data.finish.size=256'])['data']['finish'] == {'size': 256, 'steps': 108, 'batch_size': 1}
    assert load_config(CONFIGS/'quickstart.yaml', ['data.finish=null'])['data']['finish'] is None     # off: one setting

def test_the_finishing_phase_is_one_key_and_its_older_spelling_still_loads():
    """issue 29: the phase was four data keys and two trainer keys, and turning it off took four settings. Now it is
    `data.finish`; configs and run folders written with the older keys load into it, with a note, and the variants that
    lost (windows, a learning-rate restart) are refused naming the tuning round."""
    from radiodiff_vae.config import config_notes, read_yaml
    qs = load_config(CONFIGS/'quickstart.yaml')
    assert 'finish' in qs['data'] and not any(k.startswith('finish_') for k in [*qs['data'], *qs['trainer']])
    old = ['data.finish_size=192', 'data.finish_steps=108', 'data.finish_batch_size=1', 'data.finish_crop=null',
           'trainer.finish_lr=null', 'trainer.finish_ema_restart=true']
    assert load_config(CONFIGS/'quickstart.yaml', old) == qs
    assert load_config(CONFIGS/'quickstart.yaml', ['data.finish_size=null', 'data.finish_steps=0'])['data']['finish'] is None
    notes = config_notes(read_yaml(CONFIGS/'quickstart.yaml'), old)
    assert len(notes) == 1 and "read as data.finish: {'size': 192, 'steps': 108, 'batch_size': 1}" in notes[0], notes
    with pytest.raises(ConfigError, match=r"trainer.finish_lr: '2e-4' is no longer a setting \(a learning-rate restart at the phase lost on every seed \(tuning round 8\)\)"):
        load_config(CONFIGS/'quickstart.yaml', ['trainer.finish_lr=2e-4'])
    with pytest.raises(ConfigError, match='data.finish_crop: 192 is no longer a setting'):
        load_config(CONFIGS/'quickstart.yaml', ['data.finish_crop=192'])

@pytest.mark.parametrize('sets,keys', [
    (['trainer.train_discriminator=false', 'trainer.upstream_faithful=true'], ('trainer.upstream_faithful', 'trainer.train_discriminator'))])
def test_contradictory_switches_are_refused_at_load(sets, keys):
    """Switches that contradict each other are refused with one line naming both keys: a frozen discriminator that idle
    AdamW steps would shrink by weight decay. Before the fix this ran silently."""
    with pytest.raises(ConfigError) as e: load_config(CONFIGS/'quickstart.yaml', sets)
    message = str(e.value)
    assert '\n' not in message and all(k in message for k in keys), message
    assert load_config(CONFIGS/'quickstart.yaml', sets[:1])['trainer']['train_discriminator'] is False

SHIPPED = sorted(p.name for p in CONFIGS.glob('*.yaml'))     # configs/studies/ holds study files and their bases

@pytest.mark.parametrize('name', SHIPPED)
@pytest.mark.parametrize('steps', [1, 2, 7, 40])
def test_steps_alone_makes_a_short_run_of_every_shipped_config(name, steps):
    """`--steps N` (load_config's `steps`): every shipped config loads at a tiny N with no other setting, its step-based
    settings scaled by N / train_num_steps within the run, and the changes reported. Before, the quickstart at 40 steps
    failed on trainer.warmup_steps, then on data.finish_steps."""
    from radiodiff_vae.config import read_yaml, step_changes, STEP_KEYS
    full = load_config(CONFIGS/name)
    cfg = load_config(CONFIGS/name, steps=steps)
    T, t, d, loss = full['trainer']['train_num_steps'], cfg['trainer'], cfg['data'], cfg['model']['lossconfig']
    assert t['train_num_steps'] == steps
    assert 0 <= t['warmup_steps'] < steps and 0 <= loss['disc_start'] <= steps
    assert t['save_and_sample_every'] >= 1 and t['log_freq'] >= 1
    assert d['finish'] is None or 1 <= d['finish']['steps'] <= steps
    for section, *path in STEP_KEYS:                       # each scaled by N / T (rounded), within its bounds
        old = full[section]; new = cfg[section]
        for k in path: old, new = (old or {}).get(k), (new or {}).get(k)
        if old is None: continue                           # no finishing phase
        assert abs(new - old * steps / T) <= 1 or new in (0, 1, steps - 1, steps), (path, old, new)
    changes = step_changes(read_yaml(CONFIGS/name), (), steps)
    assert changes['trainer.train_num_steps'] == [T, steps]
    assert all(cfg_value(cfg, k) == new and cfg_value(full, k) == old for k, (old, new) in changes.items())
    assert load_config(CONFIGS/name, steps=T) == full and step_changes(read_yaml(CONFIGS/name), (), T) == {}

def cfg_value(cfg, dotted):
    for k in dotted.split('.'): cfg = cfg[k]
    return cfg

def test_steps_keeps_what_is_set_explicitly_and_the_numbers_of_the_quickstart():
    qs = load_config(CONFIGS/'quickstart.yaml', steps=40)
    assert (qs['trainer']['warmup_steps'], qs['model']['lossconfig']['disc_start'], qs['data']['finish']['steps'],
            qs['trainer']['save_and_sample_every'], qs['trainer']['log_freq']) == (2, 35, 4, 20, 1)
    kept = load_config(CONFIGS/'quickstart.yaml', ['model.lossconfig.disc_start=10', 'trainer.log_freq=5'], steps=40)
    assert (kept['model']['lossconfig']['disc_start'], kept['trainer']['log_freq'], kept['data']['finish']['steps']) == (10, 5, 4)
    assert load_config(CONFIGS/'quickstart.yaml', ['data.finish.steps=7'], steps=40)['data']['finish']['steps'] == 7   # a field set explicitly: kept
    with pytest.raises(ConfigError, match=r'steps: expected a positive number of steps \(trainer.train_num_steps\), got 0'): load_config(CONFIGS/'quickstart.yaml', steps=0)

def test_upstream_only_keys_are_read_and_explained_not_in_the_schema(tmp_path):
    """Keys that exist only for upstream's files (latent-diffusion's monitor, the loss's unused pixelloss_weight, its
    disc_conditional, the trainer's amp) load with a note each and are not part of our schema; disc_conditional: true is
    still refused. Before, they were schema keys: stored, dumped and never read."""
    from radiodiff_vae.config import config_notes, SCHEMA, UPSTREAM_KEYS
    ldm = yaml.safe_load((CONFIGS/'first_radio_upstream.yaml').read_text())
    ldm['model']['monitor'] = 'val/rec_loss'
    ldm['model']['lossconfig'].update(pixelloss_weight=2.0, disc_conditional=False)
    (tmp_path/'ldm.yaml').write_text(yaml.safe_dump(ldm))
    cfg = load_config(tmp_path/'ldm.yaml')
    assert cfg == load_config(CONFIGS/'first_radio_upstream.yaml')          # read, and nothing of ours changed
    notes = config_notes(ldm)
    assert notes[0] == ("keys of upstream's files read at the value this trainer implements: model.ddconfig.double_z: true, "
                        "model.lossconfig.disc_conditional: false, trainer.fp16: false")
    assert [n.split(':')[0] for n in notes[1:]] == ['model.monitor', 'model.lossconfig.pixelloss_weight', 'data.name', 'trainer.amp']
    assert notes[1].startswith('model.monitor: val/rec_loss read and not used: ') and notes[-1].startswith('trainer.amp: false read')
    assert all('\n' not in n and 'not used' in n for n in notes[1:]), notes
    assert config_notes(ldm, ['trainer.amp=true'])[-1].startswith('trainer.amp: true')
    schema_keys = {r[0] for r in schema_table()}
    assert not schema_keys & {k for k, v in UPSTREAM_KEYS.items() if v[2] is not None} and 'monitor' not in SCHEMA['model'][1]
    assert not {'monitor', 'pixelloss_weight', 'disc_conditional', 'amp'} & set(dump_config(cfg).replace(':', ' ').split())
    for name in ('first_radio_upstream.yaml', 'radiodiff.yaml'): assert load_config(CONFIGS/name)
    with pytest.raises(ConfigError, match='disc_conditional: true is not supported'): load_config(tmp_path/'ldm.yaml', ['model.lossconfig.disc_conditional=true'])
    stored = dict(cfg); stored['trainer'] = {**cfg['trainer'], 'amp': False}      # a checkpoint's config from before
    assert resolve_config(stored) == cfg


# --- the config a user can hold (issue 29): 60 leaf keys, each set by a shipped config or study, or listed for upstream

def test_schema_leaf_count():
    "85 leaf keys before issue 29's cut; 60 now (the issue's bound), the finishing phase one of them (data.finish)."
    keys = [r[0] for r in schema_table()]
    assert len(keys) == len(set(keys)) == 60

def _keys_set_by_shipped_files() -> set:
    "The dotted keys that a shipped config (configs/*.yaml) or a study file (configs/studies/**) sets."
    from radiodiff_vae.config import unwrap_upstream
    found = set()
    def walk(d, prefix=''):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ('synthetic', 'finish'): walk(v, f'{prefix}{k}.')
            else: found.add(f'{prefix}{k}')
    for path in CONFIGS.glob('*.yaml'): walk(unwrap_upstream(yaml.safe_load(path.read_text())))
    for path in (CONFIGS/'studies').rglob('*.yaml'):
        study = yaml.safe_load(path.read_text())
        if 'arms' not in study: walk(unwrap_upstream(study)); continue     # a study's base config
        for text in (study.get('overrides') or []) + [t for arm in study['arms'] for t in arm.get('set', [])]:
            found.add(text.split('=', 1)[0].strip())
    return found

def test_every_key_is_set_by_a_shipped_file_or_listed_for_upstream():
    "Every schema key is set by a shipped config or study, or is a schema key of UPSTREAM_KEYS (the table in the config chapter)."
    from radiodiff_vae.config import UPSTREAM_KEYS
    listed = {k for k, (_, _, loads) in UPSTREAM_KEYS.items() if loads is None}
    unset = {r[0] for r in schema_table()} - _keys_set_by_shipped_files()
    assert unset <= listed, sorted(unset - listed)
    assert listed <= {r[0] for r in schema_table()}          # the list names no key that left the schema
    assert all(up and ours for up, ours, _ in UPSTREAM_KEYS.values())   # one line each: upstream's use, ours

TODAYS_DEFAULTS = yaml.safe_load("""
model:
  embed_dim: 3
  ddconfig:
    double_z: true
    z_channels: 3
    resolution: [320, 320]
    in_channels: 1
    out_ch: 1
    ch: 128
    ch_mult: [1, 2, 4]
    num_res_blocks: 2
    attn_resolutions: []
    dropout: 0.0
  lossconfig: {disc_start: 50001, logvar_init: 0.0, kl_weight: 1.0e-06, disc_num_layers: 3, disc_in_channels: 1, disc_factor: 1.0, disc_weight: 0.5,
    perceptual_weight: 1.0, use_actnorm: false, disc_loss: hinge, disc_ndf: 64, lpips_pretrained: true, d_weight_max: 10000.0}
  ckpt_path: null
  ckpt_weights: raw
  gradient_checkpointing: false
data:
  name: radio
  batch_size: 2
  source: radiomapseer
  root: null
  simulation: DPM
  phase: train
  num_tx: 80
  size: 256
  crop: null
  finish_size: null
  finish_steps: 0
  finish_batch_size: null
  finish_crop: null
  n_maps: 1000
  data_seed: 0
  synthetic: {}
  val_maps: 8
  num_workers: 0
trainer:
  gradient_accumulate_every: 1
  lr: 5.0e-06
  min_lr: 5.0e-07
  train_num_steps: 150000
  save_and_sample_every: 5000
  log_freq: 100
  results_folder: ./results
  fp16: false
  resume_milestone: 0
  schedule: radiodiff
  power: 0.95
  warmup_steps: 0
  decay_fraction: 0.2
  disc_lr: null
  betas: [0.9, 0.999]
  weight_decay: 0.01
  learn_logvar: false
  grad_clip_norm: 1.0
  ema_decay: 0.995
  ema_update_every: 10
  ema_warmup: true
  upstream_ema: false
  step_idle_discriminator: false
  log_decimals: null
  sample_posterior: true
  seed: 0
  mixed_precision: null
  cpu: false
  num_threads: null
  skip_nonfinite: false
  max_nonfinite_skips: 100
  log_with: [tensorboard]
  sample_maps: 4
  sync_batchnorm: false
  train_discriminator: true
  compile: false
  compile_mode: default
  cudnn_benchmark: true
  finish_lr: null
  finish_ema_restart: true
""")   # the 85 keys a config.yaml of 2026-12-06 holds, at their defaults (resolve_config(None) then)

def _leaves(d):
    return [k for k, v in d.items() if not isinstance(v, dict) or k == 'synthetic'] + \
           [f'{k}.{x}' for k, v in d.items() if isinstance(v, dict) and k != 'synthetic' for x in _leaves(v)]

def test_a_config_with_every_key_of_before_at_its_default_loads():
    """A stored config of before issue 29 (all 85 keys, at their defaults) resolves to today's defaults, with a note of at
    most one line per key, and the resume check sees no difference: the translation alone changes nothing."""
    from radiodiff_vae.config import config_notes
    assert len(_leaves(TODAYS_DEFAULTS)) == 85
    assert resolve_config(TODAYS_DEFAULTS) == resolve_config(None)
    notes = config_notes(TODAYS_DEFAULTS)
    assert len(notes) <= 4 and all('\n' not in n for n in notes), notes
    assert config_differences(resolve_config(TODAYS_DEFAULTS), resolve_config({})) == []

@pytest.mark.parametrize('stored', ['models/released-v2_run/config.yaml', 'models/released_run/config.yaml'])
def test_stored_run_configs_of_before_resume_unchanged(stored):
    "The released runs' stored configs (written before the cut) load, and resuming them with their config file sees no difference."
    from radiodiff_vae.config import read_yaml
    old = resolve_config(read_yaml(ROOT/stored))
    assert config_differences(old, resolve_config(yaml.safe_load(dump_config(old)))) == []
    assert 'ckpt_weights' not in old['model'] and 'sample_maps' not in old['trainer']

@pytest.mark.parametrize('sets,expected', [
    ({'upstream_ema': True, 'step_idle_discriminator': True, 'log_decimals': 5}, {'upstream_faithful': True}),
    ({'upstream_ema': False, 'step_idle_discriminator': False, 'log_decimals': None}, {'upstream_faithful': False}),
    ({'skip_nonfinite': True, 'max_nonfinite_skips': 7}, {'max_nonfinite_skips': 7}),
    ({'skip_nonfinite': False, 'max_nonfinite_skips': 100}, {'max_nonfinite_skips': 0}),
    ({'compile': True, 'compile_mode': 'reduce-overhead'}, {'compile': 'reduce-overhead'}),
    ({'compile': False, 'compile_mode': 'default'}, {'compile': None}),
    ({'compile': True}, {'compile': 'default'}),
    ({'fp16': True}, {'mixed_precision': 'fp16'}),
    ({'fp16': True, 'mixed_precision': 'fp16'}, {'mixed_precision': 'fp16'})])
def test_older_keys_map_to_their_key_now(sets, expected):
    "Pairs and groups of older keys read as the one key they became (before issue 29 each was its own schema key)."
    t = resolve_config({'trainer': sets})['trainer']
    assert {k: t[k] for k in expected} == expected
    assert not set(sets) - set(expected) & set(t)

@pytest.mark.parametrize('sets,needle', [
    ({'upstream_ema': True}, 'trainer.upstream_ema: true, trainer.step_idle_discriminator: false, trainer.log_decimals: null: these older keys are now one switch'),
    ({'upstream_ema': True, 'step_idle_discriminator': True, 'log_decimals': 5, 'upstream_faithful': False}, 'keep one of them'),
    ({'compile': False, 'compile_mode': 'max-autotune'}, 'set trainer.compile=max-autotune instead of both'),
    ({'fp16': True, 'mixed_precision': 'bf16'}, "trainer.fp16 is true but trainer.mixed_precision is 'bf16'; set one of them"),
    ({'sample_posterior': False}, 'trainer.sample_posterior: false is no longer a setting (the autoencoder trains on z ~ q(z|x), as upstream); remove trainer.sample_posterior'),
    ({'cpu': True}, 'trainer.cpu: true is no longer a setting (a run uses the GPU where one is visible; CUDA_VISIBLE_DEVICES= hides it)')])
def test_older_keys_that_would_change_the_run_are_refused(sets, needle):
    "A non-default value of a key that is gone, or a mix of the switches that became one, is a one-line error naming the key, the value and the fix."
    with pytest.raises(ConfigError) as e: resolve_config({'trainer': sets})
    assert needle in str(e.value) and '\n' not in str(e.value), str(e.value)

@pytest.mark.parametrize('key,bad', [('model.lossconfig.disc_factor', 0.5), ('model.lossconfig.use_actnorm', True),
                                     ('model.ddconfig.double_z', False), ('model.lossconfig.d_weight_max', 5000.0)])
def test_upstream_and_older_keys_load_only_at_the_value_this_trainer_implements(key, bad):
    "Upstream's value (and an older key's default) loads and is dropped; another value is refused, naming the key."
    section, *rest = key.split('.')
    good = {'model.lossconfig.disc_factor': 1.0, 'model.lossconfig.use_actnorm': False, 'model.ddconfig.double_z': True,
            'model.lossconfig.d_weight_max': 1e4}[key]
    nest = lambda v: {section: {rest[0]: {rest[1]: v}}}
    assert resolve_config(nest(good)) == resolve_config(None)
    with pytest.raises(ConfigError, match=__import__('re').escape(f'{key}: ')): resolve_config(nest(bad))

def test_upstream_resume_milestone_is_explained_not_acted_on():
    "upstream's trainer.resume_milestone loads (the reference run's config sets 7) and the note says what to pass instead."
    from radiodiff_vae.config import config_notes, read_yaml
    raw = read_yaml(ROOT/'data'/'reference_run'/'first_radio_m.yaml')
    assert 'resume_milestone' not in resolve_config(raw)['trainer']
    assert 'trainer.resume_milestone: 7 read and not used: pass --resume N (or latest)' in config_notes(raw)
