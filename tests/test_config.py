"Config loading: upstream forms, overrides, type and range errors."
from pathlib import Path
import pytest, yaml
from radiodiff_vae.config import load_config, resolve_config, dump_config, config_differences, schema_table
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
    ('model.lossconfig.disc_start=601', 'disc_start'),
    ('trainer.mixed_precision=fp8', "['no', 'bf16', 'fp16']"),
    ('trainer.ema_decay=1.5', 'ema_decay'),
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
    assert config_differences(a, load_config(CONFIGS/'quickstart.yaml', ['trainer.train_num_steps=800', 'trainer.log_freq=3'])) == []
    assert config_differences(a, load_config(CONFIGS/'quickstart.yaml', ['model.embed_dim=4'])) == ['model.embed_dim']

def test_schema_table_covers_every_leaf():
    keys = [r[0] for r in schema_table()]
    assert 'model.ddconfig.ch' in keys and 'trainer.skip_nonfinite' in keys and len(keys) == len(set(keys))

def test_schedule_settings_checked_at_load():
    with pytest.raises(ConfigError, match='trainer.warmup_steps'):
        load_config(CONFIGS/'quickstart.yaml', ['trainer.warmup_steps=600'])
    with pytest.raises(ConfigError, match='trainer.min_lr'):
        load_config(CONFIGS/'quickstart.yaml', ['trainer.min_lr=0.1'])
