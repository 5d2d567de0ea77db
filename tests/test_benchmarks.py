"""The step benchmark (benchmarks/bench_step.py) and its report (benchmarks/run_all.py) at a tiny size, so they cannot rot."""
import json, sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCH))
import bench_step  # noqa: E402
import run_all  # noqa: E402


@pytest.fixture(scope='module')
def tiny_result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops on a shared machine: one thread avoids OpenMP stalls
    try:
        yield bench_step.run_benchmark('tiny', warmup=1, steps=1, variants=['upstream', 'ours', 'ours+checkpointing'],
                                       memory=False, peaks=False)
    finally: torch.set_num_threads(threads)


def test_losses_of_our_step_equal_the_recreation_of_upstreams_step(tiny_result):
    "Same weights, batch and noise: our step's AE-pass losses equal those of (a), the benchmark's re-creation of upstream's loop (not upstream's code), d_weight included."
    for phase, c in tiny_result['losses'].items():
        assert c['max_rel_diff'] < 1e-5, (phase, c['worst_key'], c['upstream'], c['ours'])
        assert {'train/total_loss', 'train/rec_loss', 'train/d_weight', 'train/g_loss'} <= set(c['compared'])
    on = tiny_result['losses']['gan_on']
    assert on['ours']['train/disc_factor'] == 1.0 and on['ours']['train/d_weight'] > 0


def test_the_step_benchmark_replaces_nothing_of_the_trainer():
    "bench_step drives the trainer through its public API: no method or attribute of a Trainer is assigned or deleted."
    import re
    source = (BENCH / 'bench_step.py').read_text()
    assert not re.findall(r'\b(?:tr|self\.tr|st\.tr|trainer)\.(?!step\b)\w+\s*=(?!=)', source)
    assert not re.findall(r'\b(?:tr|self\.tr|st\.tr|trainer)\._\w+', source) and 'del tr' not in source


def test_timing_and_flops_are_consistent(tiny_result):
    "Every variant timed in both phases; upstream does more FLOPs (second forward, adaptive weight), checkpointing recomputes."
    for phase in bench_step.PHASES:
        t = tiny_result['timing'][phase]
        per = t['variants']
        assert set(per) == {'upstream', 'ours', 'ours+checkpointing'}
        for v, r in per.items():
            assert len(r['step_s']) == 1 and r['median_s'] == r['step_s'][0]
            assert r['speedup_vs_upstream'] == pytest.approx(per['upstream']['median_s'] / r['median_s'], rel=1e-6)
            assert r['gflops_achieved'] == pytest.approx(r['useful_flops'] / 1e9 / r['median_s'], rel=1e-6)
        assert per['upstream']['flops'] > 1.2 * per['ours']['flops']
        assert per['ours+checkpointing']['flops'] > per['ours']['flops']
        assert t['conv_peak_gflops_median'] > 0
    # GAN off, unlogged: our step skips the discriminator pass entirely
    assert tiny_result['timing']['gan_off']['variants']['ours']['median_disc_s'] < tiny_result['timing']['gan_off']['variants']['upstream']['median_disc_s']


def test_phase_steps():
    cfg = bench_step.bench_config('tiny')
    freq, start = cfg['trainer']['log_freq'], cfg['lossconfig']['disc_start']
    for phase in bench_step.PHASES:
        for logged in (False, True):
            s = bench_step.phase_step(cfg, phase, logged)
            assert (s % freq == 0) == logged and (s >= start) == (phase == 'gan_on')


def test_bad_size_and_variants_are_refused():
    with pytest.raises(ValueError, match='size'): bench_step.bench_config('huge')
    with pytest.raises(ValueError, match='upstream'): bench_step.run_benchmark('tiny', variants=['ours'], memory=False, peaks=False)


def test_memory_worker_subprocess():
    "Peak RSS of one variant, measured in its own process."
    r = bench_step.measure_memory('tiny', ['ours'])['ours']
    assert r['variant'] == 'ours' and r['peak_rss_mb'] >= r['rss_after_build_mb'] > 50


def test_results_render(tiny_result, tmp_path):
    "run_all stores parts as JSON and renders RESULTS.md with the targets table, naming the command and machine."
    run_all.save(tmp_path, 'step_quickstart', tiny_result, 'pytest tiny')
    md = run_all.render(tmp_path)
    assert '## Targets (issue 8)' in md and 'pytest tiny' in md and tiny_result['machine']['cpu'] in md
    assert '| upstream |' in md and '| ours+checkpointing |' in md
    assert json.loads((tmp_path / 'step_quickstart.json').read_text())['command'] == 'pytest tiny'
    assert 'Not run.' in md   # no GPU part stored here


def test_results_render_the_stored_gpu_and_native_bf16_parts(tmp_path):
    "The committed GPU and native-bf16 CPU parts render into their sections, targets rows and the recommendation."
    import shutil
    for name in ('gpu', 'cpu_bf16'):
        shutil.copy(BENCH / 'results' / f'{name}.json', tmp_path / f'{name}.json')
    md = run_all.render(tmp_path)
    gpu = json.loads((tmp_path / 'gpu.json').read_text())
    assert f"## GPU: {gpu['full']['machine']['gpu']}" in md and 'Not run.' not in md
    assert '## Training step, quickstart size, on a CPU with native bf16' in md
    assert "| bf16 ≥ 1.8× (a)'s fp32 on a CPU with AVX-512 BF16 (" in md and '| checkpointing on the GPU, full size' in md
    rec = next(l for l in md.splitlines() if l.startswith('**Recommendation.**'))
    assert 'On a CPU with AMX / AVX-512 BF16' in rec and 'On the GPU' in rec


# Searched arms the study files leave out, and why: two arms that differ from `fp32_b2_1100_f128x100(_wsd)` by a version of
# the code (the EMA kept across the finishing phase), not by a setting.
NOT_STUDIES = {'fp32_b2_1100_f128x100_ema_kept', 'fp32_b2_1100_f128x100_ema_kept_wsd'}
# ... and four arms whose setting lost and was removed (a learning-rate restart at the finishing phase, round 8; windows
# of 256x256 maps as the phase, round 9): the study files say so in their headers.
DROPPED = {'fp32_b2_900_f128x150_flr2e-4', 'fp32_b2_900_f128x150_flr4e-4', 'fp32_b2_858_f256c192b1x108', 'fp32_b2_913_f256c160b1x163'}
OLD_FINISH = {'data.finish_size': 'size', 'data.finish_steps': 'steps', 'data.finish_batch_size': 'batch_size'}   # data.finish's older spelling


def _config_value(cfg: dict, key: str):
    node = cfg
    for part in key.split('.'): node = node[part]
    return json.loads(json.dumps(node))


def test_tuning_study_files_resolve_to_the_settings_the_tuning_ran():
    "Every arm of configs/studies/tuning/*.yaml resolves to the settings its runs recorded (quickstart_tuning.json), with their seeds."
    from radiodiff_vae.study import load_study, arm_seeds
    r = json.loads((BENCH / 'results' / 'quickstart_tuning.json').read_text())
    recorded = {n: (s['overrides'], sorted(map(int, s['runs']))) for n, s in r['search'].items()}
    for key in ('guard_round1', 'guard'):
        g = r[key]
        for p in ('no', 'bf16'):
            recorded[f"{g['arm']}_{p}"] = ({**g['overrides'], 'trainer.mixed_precision': p}, sorted({int(k.split('-s')[1]) for k in g['runs'] if k.startswith(p)}))
    after_choice = {n: sorted(map(int, v)) for n, v in r['real'].items()}
    files = sorted((BENCH.parent / 'configs' / 'studies' / 'tuning').glob('*.yaml'))
    assert len(files) == 12
    seen = set()
    for f in files:
        spec, configs = load_study(f)
        for a in spec['arms']:
            settings, seeds = recorded[a['label']]
            assert arm_seeds(spec, a) == (after_choice[a['label']] if f.stem.endswith('_real') else seeds), (f.name, a['label'])
            for key, value in settings.items():
                if key == 'trainer.save_and_sample_every' or key.startswith('_'): continue    # one checkpoint, at the end: the one scored
                if key in ('data.finish_crop', 'trainer.finish_lr'): assert value is None, (f.name, a['label'], key); continue
                if key in OLD_FINISH:
                    field = OLD_FINISH[key]
                    assert (configs[a['label']]['data']['finish'] or {}).get(field, 0 if field == 'steps' else None) == value, (f.name, a['label'], key)
                    continue
                assert _config_value(configs[a['label']], key) == json.loads(json.dumps(value)), (f.name, a['label'], key)
            if 'data.finish_steps' not in settings: assert configs[a['label']]['data']['finish'] is None, (f.name, a['label'])
            assert a.get('init_from') == settings.get('_init_from'), (f.name, a['label'])     # the probes start from the base's runs
            seen.add(a['label'])
        assert spec['evaluation']['synthetic_offset'] == r['heldout']['offset'] and spec['evaluation']['synthetic_size'] == r['heldout']['size']
        assert spec['evaluation']['synthetic_maps'] == r['heldout']['n']
        assert (spec['evaluation']['real_maps'] == 0) != ('guard' in f.stem or f.stem.endswith('_real')), f.name   # real maps: checks only
    assert set(r['search']) - seen == NOT_STUDIES | DROPPED


def test_gpu_loop_benchmark_runs_on_a_small_config_and_renders(tmp_path):
    "bench_gpu.py (whole fit() loop per variant, in its own process) at quickstart size on the CPU; its table renders."
    import bench_gpu
    out = tmp_path / 'gpu_compiled.json'
    args = ['--variants', 'eager-fp32', '--batches', '2', '--warmup', '1', '--steps', '2', '--log-every', '1',
            '--config', 'configs/quickstart.yaml', '--size', '64', '--timeout', '200', '--profile', '1', '--workers', '1', '--out', str(out)]
    assert bench_gpu.main(args) == 0
    g = json.loads(out.read_text())
    (r,) = g['runs']
    assert 'error' not in r, r.get('error')
    assert r['data_workers'] == 1                         # maps generated ahead by a worker, as in a real run
    assert r['steps_per_hour'] > 0 and r['timed_steps'] == 1 and 'train/total_loss' in r['first_step']   # steps 1 to 2
    p = r['profile']      # one more step under the profiler: on the CPU all its time is the host's
    assert p['steps'] == 1 and 0 < p['host_self_s_per_step'] <= p['wall_s_per_step'] * 1.5 and p['top_by_host'][0]['calls_per_step'] >= 1
    assert bench_gpu.main(args[:-2] + ['--profile', '0', '--append', '--out', str(out)]) == 0   # a second call adds its run
    g = json.loads(out.read_text())
    assert [x['variant'] for x in g['runs']] == ['eager-fp32'] * 2 and g['command'].count('bench_gpu.py') == 2 and g['runs'][1]['profile'] is None
    g.update(note='a test')
    md = '\n'.join(run_all._gpu_compiled_section(g))
    assert '| eager-fp32 | 2 |' in md and '0.0e+00' in md   # eager fp32 is its own reference
    assert '- eager-fp32, batch 2: ' in md and 'kernel launches' in md


def test_gpu_session_script_names_only_existing_variants_and_flags():
    "benchmarks/gpu_session.sh spends scarce GPU time: a renamed variant or flag must fail here, not there."
    import re, bench_gpu
    script = (Path(bench_gpu.__file__).parent / 'gpu_session.sh').read_text().replace('\\\n', ' ')
    calls = [l for l in script.splitlines() if 'bench_gpu.py' in l and not l.lstrip().startswith('#')]
    source = Path(bench_gpu.__file__).read_text()
    assert len(calls) >= 3
    for call in calls:
        after = call.split('--variants', 1)[1].split()
        variants = after[:next((i for i, w in enumerate(after) if w.startswith('--')), len(after))]
        assert variants and set(variants) <= set(bench_gpu.VARIANTS), variants
        for flag in re.findall(r'(?<!\S)(--[a-z-]+)', call): assert f"'{flag}'" in source, flag


def test_one_machine_record():
    "The benchmarks describe the machine with the package's `machine_info`, not copies of their own."
    import bench_data, bench_gpu
    from radiodiff_vae.core import machine_info
    assert bench_step.machine_info is machine_info
    scripts = [p for p in BENCH.glob('*.py')]
    readers = ('/proc/cpuinfo', 'platform.', 'os.getloadavg', 'os.cpu_count', 'is_bf16_supported', 'get_device_name')
    assert not [(p.name, r) for p in scripts for r in readers if r in p.read_text()]
    same = lambda m: {k: v for k, v in m.items() if k != 'load_average'}
    assert same(bench_gpu.machine()) == same(machine_info('cuda' if torch.cuda.is_available() else 'cpu'))
    assert 'machine_info()' in (BENCH / 'bench_data.py').read_text()
