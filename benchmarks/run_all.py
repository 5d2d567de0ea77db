"""Run the benchmarks (step, bf16 deviation, data; `--full`: full size; `--device cuda`: on a GPU) and regenerate
benchmarks/RESULTS.md from every stored part in benchmarks/results/ (`--render`: only that). Commands: benchmarks/README.md.
"""
from __future__ import annotations
import argparse, datetime, json, os, shlex, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / 'results'
RESULTS_MD = HERE / 'RESULTS.md'
ORIGINAL_STEPS_PER_HOUR = 19_600   # the original run on its GPU, batch 2 (issue 8)
ORIGINAL_RUN_CAVEAT = ("not like for like: that run's GPU is unknown, and with gradient_accumulate_every 1 its loop never ran a "
                       "discriminator pass, so each of its steps did less work than either loop timed here")
sys.path.insert(0, str(HERE))
import bench_step  # noqa: E402


def _stamp(payload: dict, command: str) -> dict:
    return {'command': command, 'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), **payload}

def save(results_dir: Path, name: str, payload: dict, command: str) -> Path:
    "Write one part's results as JSON (atomically)."
    results_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = results_dir / f'{name}.json', results_dir / f'.{name}.json.tmp'
    tmp.write_text(json.dumps(_stamp(payload, command), indent=1, default=str)); os.replace(tmp, path)
    return path

def load(results_dir: Path, name: str) -> dict | None:
    "One stored part; step timings re-derived with the current statistics (paired per-round ratios)."
    path = results_dir / f'{name}.json'
    if not path.exists(): return None
    part = json.loads(path.read_text())
    for r in (part, part.get('full'), part.get('quickstart')):
        if isinstance(r, dict) and isinstance(r.get('timing'), dict): bench_step.derive(r['timing'])
    return part

# ----------------------------------------------------------------------------------------------- rendering
def _f(v, fmt='{:.3g}', none='n/a'):
    return none if v is None else fmt.format(v)

def _gb(mb): return None if mb is None else mb / 1024

def _step_table(r: dict) -> list[str]:
    "Markdown table of one step benchmark (one row per variant, both phases)."
    mem = r.get('memory') or {}
    rows = ['| variant | GAN off s/step | × vs (a) | GAN on s/step | × vs (a) | GFLOP/step (on) | GFLOP/s (on) | % of conv peak (on) | × FLOPs/peak floor (on) | peak memory in the steps GB |',
            '|---|---|---|---|---|---|---|---|---|---|']
    off, on = r['timing']['gan_off']['variants'], r['timing']['gan_on']['variants']
    for v in r['variants']:
        a, b = off[v], on[v]
        m = mem.get(v, {})
        peak = m.get('peak_cuda_mb') if r['device'].startswith('cuda') else m.get('peak_rss_steps_mb', m.get('peak_rss_mb'))
        rows.append(f"| {v} | {a['median_s']:.3f} | {_f(a['speedup_vs_upstream'], '{:.2f}')} | {b['median_s']:.3f} | "
                    f"{_f(b['speedup_vs_upstream'], '{:.2f}')} | {b['flops'] / 1e9:.1f} | {_f(b['gflops_achieved'], '{:.1f}')} | "
                    f"{_f(b['fraction_of_conv_peak'] and 100 * b['fraction_of_conv_peak'], '{:.0f}%')} | {_f(b['ratio_to_floor'], '{:.2f}')} | "
                    f"{_f(_gb(peak), '{:.2f}')} |")
    return rows

def _step_section(title: str, r: dict | None, how: str) -> list[str]:
    if r is None: return [f'## {title}', '', f'Not measured yet: run `{how}`.', '']
    m = r['machine']
    hw = m.get('gpu') or f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads"
    pk = r.get('peaks') or {}
    conv = pk.get('conv3x3', {})
    lines = [f'## {title}', '',
             f"`{r['command']}` — {r['date_utc']} — {hw}, torch {m['torch']}; load average {', '.join(f'{x:.1f}' for x in m.get('load_average') or [])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in m.get('load_average_end') or [])} at the end.", '',
             f"Model: ddconfig ch={r['ddconfig']['ch']}, ch_mult={r['ddconfig']['ch_mult']}, num_res_blocks={r['ddconfig']['num_res_blocks']}; "
             f"{r['map_size']}×{r['map_size']} maps, batch {r['batch_size']}, perceptual_weight {r['perceptual_weight']}"
             + (' (LPIPS with a **random** VGG16 backbone: same FLOPs as the pretrained one, whose weights are not available offline)' if r['perceptual_weight'] and r.get('lpips_pretrained') is False else '')
             + f"; {r['warmup']} warm-up step(s) (the first one FLOP-counted) + {r['steps']} timed steps per variant and phase, interleaved.", '',
             f"Peaks at the start: fp32 matmul {pk.get('matmul', {}).get('n')}² {_f(pk.get('matmul', {}).get('gflops'), '{:.0f}')} GFLOP/s; "
             f"3×3 conv {conv.get('shape')} {_f(conv.get('contiguous'), '{:.0f}')} GFLOP/s contiguous, {_f(conv.get('channels_last'), '{:.0f}')} channels_last. "
             f"Channels-last conv peak sampled between the timed rounds (median, used for % of peak and the floor): "
             f"GAN off {r['timing']['gan_off']['conv_peak_gflops_median']:.0f}, GAN on {r['timing']['gan_on']['conv_peak_gflops_median']:.0f} GFLOP/s.", '']
    lines += _step_table(r) + ['']
    lines += ['Time split (median s, AE pass / D pass incl. its optimizer step):', '']
    for ph in ('gan_off', 'gan_on'):
        per = r['timing'][ph]['variants']
        lines.append(f"- {ph}: " + '; '.join(f"{v} {per[v]['median_ae_s']:.3f} / {per[v]['median_disc_s']:.3f}" for v in r['variants']))
    lc = r['losses']
    lines += ['', 'Losses of (b) vs (a), same weights, batch and posterior noise (AE pass, logged step): max relative difference '
              + ', '.join(f"{ph} {lc[ph]['max_rel_diff']:.2e} ({lc[ph]['worst_key']})" for ph in lc)
              + f" over {', '.join(k.split('/')[-1] for k in lc['gan_on']['compared'])}.", '']
    return lines

def _targets(full, quick, bf16, gpu, cpu_bf16=None) -> list[str]:
    "The issue's targets, each with its measured figure and met / missed."
    def ok(c): return '**met**' if c else '**missed**'
    rows = ['| target | measured | status |', '|---|---|---|']
    src, name = (full, 'full size') if full else (quick, 'quickstart size (full size not run yet)')
    if src:
        on, off = src['timing']['gan_on']['variants'], src['timing']['gan_off']['variants']
        rows.append(f"| fp32 (b) ≥ 1.33× (a) with GAN on, {name} | {on['ours']['speedup_vs_upstream']:.2f}× | {ok(on['ours']['speedup_vs_upstream'] >= 1.33)} |")
        rows.append(f"| fp32 (b) ≥ 1.38× (a) with GAN off, {name} | {off['ours']['speedup_vs_upstream']:.2f}× | {ok(off['ours']['speedup_vs_upstream'] >= 1.38)} |")
        best = min(('ours', 'ours+channels_last'), key=lambda v: on[v]['median_s'] if v in on else 1e9)
        rows.append(f"| (b) within 1.15× of FLOPs ÷ conv peak (GAN on), {name} | ours {on['ours']['ratio_to_floor']:.2f}×, {best} {on[best]['ratio_to_floor']:.2f}× | {ok(on[best]['ratio_to_floor'] <= 1.15)} |")
        rows.append(f"| (b) fp32 ≥ 85% of channels-last conv peak (GAN on), {name} | ours {100 * on['ours']['fraction_of_conv_peak']:.0f}%, {best} {100 * on[best]['fraction_of_conv_peak']:.0f}% | {ok(on[best]['fraction_of_conv_peak'] >= 0.85)} |")
        mem = src.get('memory') or {}
        if 'ours+checkpointing' in mem and 'ours' in mem:
            key = 'peak_rss_steps_mb' if 'peak_rss_steps_mb' in mem['ours'] else 'peak_rss_mb'
            m0, m1, mu = (mem[v][key] for v in ('ours', 'ours+checkpointing', 'upstream'))
            inc = {v: mem[v].get('step_increment_mb') for v in ('ours', 'ours+checkpointing')}
            t0, t1 = on['ours']['median_s'], on['ours+checkpointing']['median_s']
            rows.append(f"| checkpointing: ≥ 40% less peak memory at ≤ 40% more time, {name} | peak RSS {m0 / 1024:.2f} → {m1 / 1024:.2f} GB "
                        f"({100 * (1 - m1 / m0):.0f}% less than (b), {100 * (1 - m1 / mu):.0f}% less than (a)'s {mu / 1024:.2f} GB)"
                        + (f"; memory added by the steps {inc['ours']:.0f} → {inc['ours+checkpointing']:.0f} MB" if None not in inc.values() else '')
                        + f"; time {t1 / t0:.2f}× (b) | "
                        f"{ok(1 - m1 / m0 >= 0.40 and t1 / t0 <= 1.40)} |")
    if cpu_bf16:
        on, off = cpu_bf16['timing']['gan_on']['variants'], cpu_bf16['timing']['gan_off']['variants']
        rows.append(f"| bf16 ≥ 1.8× (a)'s fp32 on a CPU with AVX-512 BF16 ({cpu_bf16['machine']['cpu']}, AMX, 2 cores), quickstart size | "
                    f"GAN off {off['ours+bf16']['speedup_vs_upstream']:.2f}×, GAN on {on['ours+bf16']['speedup_vs_upstream']:.2f}× | "
                    f"{ok(min(off['ours+bf16']['speedup_vs_upstream'], on['ours+bf16']['speedup_vs_upstream']) >= 1.8)} |")
    native = (src or {}).get('machine', {}).get('cpu_bf16')
    if src and not native:
        dev = f"; loss deviation over {bf16['steps']} quickstart steps: max {100 * max(bf16['max_rel_dev'].values()):.2f}%, {bf16['seconds']['bf16'] / bf16['seconds']['fp32']:.1f}× the fp32 time (emulated)" if bf16 else ''
        rows.append(f"| bf16 ≥ 1.8× (a)'s fp32 on a CPU with AVX-512 BF16 | this CPU has no avx512_bf16/amx_bf16 flag (bf16 would be emulated){dev} | not applicable here |")
    if gpu:
        g = gpu['full']['timing']['gan_on']['variants']
        if 'ours+bf16' in g:
            rows.append(f"| bf16 ≥ 1.8× (a)'s fp32 on the GPU ({gpu['full']['machine'].get('gpu')}), full size, GAN on | {g['ours+bf16']['speedup_vs_upstream']:.2f}× | {ok(g['ours+bf16']['speedup_vs_upstream'] >= 1.8)} |")
        gm = gpu['full'].get('memory') or {}
        if all('peak_cuda_mb' in gm.get(v, {}) for v in ('ours', 'ours+checkpointing')) and 'ours+checkpointing' in g:
            m0, m1 = gm['ours']['peak_cuda_mb'], gm['ours+checkpointing']['peak_cuda_mb']
            t1 = max(g['ours+checkpointing']['median_s'] / g['ours']['median_s'],
                     gpu['full']['timing']['gan_off']['variants']['ours+checkpointing']['median_s'] / gpu['full']['timing']['gan_off']['variants']['ours']['median_s'])
            rows.append(f"| checkpointing on the GPU, full size: ≥ 40% less peak memory at ≤ 40% more time | peak CUDA memory {m0 / 1024:.2f} → {m1 / 1024:.2f} GB "
                        f"({100 * (1 - m1 / m0):.0f}% less); time {t1:.2f}× (b) (the slower phase) | {ok(1 - m1 / m0 >= 0.40 and t1 <= 1.40)} |")
        sph = 3600 / g['ours']['median_s']
        rows.append(f"| GPU steps/hour at full size (original run's logged ~{ORIGINAL_STEPS_PER_HOUR:,}/h, batch 2: not like for like) | ours fp32 {sph:,.0f}/h (GAN on) | {ok(sph >= ORIGINAL_STEPS_PER_HOUR)} |")
    else:
        rows.append('| GPU: the benchmark on a lent GPU, fp32 and bf16 | not run | see the GPU section |')
    return rows

def _bf16_section(b: dict | None, machine: dict | None) -> list[str]:
    if b is None: return ['## bf16 autocast', '', 'Not measured on this CPU (it has no native bf16; `--bf16-steps N` measures the emulated one): '
                          'see the native-bf16 CPU section above and the GPU section below.', '']
    keys = list(b['max_rel_dev'])
    lines = ['## bf16 autocast: loss deviation from fp32', '',
             f"`{b['command']}` — {b['date_utc']}. Two trainers from the same weights, the same batches and noise, "
             f"{b['steps']} {b['size']} steps (GAN term on from step {b['disc_start']}), schedulers stepped as in `fit()`; "
             "relative deviation of each logged loss, bf16 vs fp32:", '',
             '| loss | median | max | first step fp32 / bf16 | last step fp32 / bf16 |', '|---|---|---|---|---|']
    for k in keys:
        lines.append(f"| {k} | {100 * b['median_rel_dev'][k]:.3f}% | {100 * b['max_rel_dev'][k]:.3f}% | "
                     f"{b['first'][k][0]:.5g} / {b['first'][k][1]:.5g} | {b['final'][k][0]:.5g} / {b['final'][k][1]:.5g} |")
    ratio = b['seconds']['bf16'] / b['seconds']['fp32']
    native = (machine or {}).get('cpu_bf16')
    lines += ['', f"Time for these steps: fp32 {b['seconds']['fp32']:.1f} s, bf16 {b['seconds']['bf16']:.1f} s ({ratio:.2f}×)"
              + ('' if native else ' — this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag), so bf16 is emulated and slower.'), '']
    return lines

BF16_MEDIAN_DEV_OK = 0.05   # median rec/nll drift over 50 steps: the run-to-run scale of a GAN-on trajectory, not a per-step error

def _bf16_drift(b: dict | None):
    "(first-step error, median drift, max drift) of rec/nll loss, bf16 vs fp32; None without a measurement."
    if not b: return None
    keys = ('rec_loss', 'nll_loss')
    first = max(abs(b['first'][k][1] - b['first'][k][0]) / abs(b['first'][k][0]) for k in keys)
    return first, max(b['median_rel_dev'][k] for k in keys), max(b['max_rel_dev'][k] for k in keys)

def _recommendation(bf16: dict | None, gpu: dict | None, machine: dict | None, cpu_bf16: dict | None = None) -> list[str]:
    parts = []
    if not (machine or {}).get('cpu_bf16'):
        parts.append("On this CPU (no AVX-512 BF16) keep fp32: bf16 is emulated and slower.")
    measured = (("On a CPU with AMX / AVX-512 BF16", cpu_bf16, (cpu_bf16 or {}).get('bf16_deviation'), 'quickstart'),
                ("On the GPU", (gpu or {}).get('full'), (gpu or {}).get('bf16_deviation'), 'full'))
    for where, r, deviation, size in measured:
        drift = _bf16_drift(deviation)
        if not r or 'ours+bf16' not in r['timing']['gan_on']['variants'] or drift is None: continue
        g = r['timing']['gan_on']['variants']
        sp = g['ours']['median_s'] / g['ours+bf16']['median_s']
        first, med, mx = drift
        verdict = ('use `trainer.mixed_precision: bf16` there' if sp > 1.05 and med < BF16_MEDIAN_DEV_OK else
                   'not worth it' if sp <= 1.05 else 'keep fp32: the drift is not small')
        parts.append(f"{where} bf16 makes our step {sp:.2f}× faster ({size} size, GAN on); its rec/nll losses differ from fp32's by {100 * first:.2f}% "
                     f"on the first step (same weights and batch) and drift by a median {100 * med:.1f}% (max {100 * mx:.0f}%) over 50 steps: {verdict}.")
    parts.append(f"(Criterion: faster by over 5%, and a median rec/nll drift under {100 * BF16_MEDIAN_DEV_OK:.0f}% over 50 quickstart steps. "
                 "Check a bf16 run's final reconstruction metrics against an fp32 run before relying on it for a paper.)")
    return ['**Recommendation.** ' + ' '.join(parts), '']

def _cpu_bf16_section(r: dict | None) -> list[str]:
    if r is None: return []
    title = 'Training step, quickstart size, on a CPU with native bf16'
    lines = _step_section(title, r, '')
    lines[2:2] = [f"Where: {r['where']}.", ''] if r.get('where') else []
    if r.get('bf16_deviation'): lines += _bf16_section({**r['bf16_deviation'], 'command': r['command'], 'date_utc': r['date_utc']}, r['machine'])
    return lines

def render(results_dir: Path = RESULTS_DIR) -> str:
    "RESULTS.md from the stored parts."
    quick, full = load(results_dir, 'step_quickstart'), load(results_dir, 'step_full')
    bf16, gpu = load(results_dir, 'bf16_deviation'), load(results_dir, 'gpu')
    data, main_job = load(results_dir, 'data'), load(results_dir, 'main_job')
    machine = (full or quick or {}).get('machine')
    out = ['# Benchmark results', '',
           'Regenerate: `python benchmarks/run_all.py` (quickstart step, bf16 deviation, data; ~15-25 min on the 2-core CPU) '
           'and `python benchmarks/run_all.py --full` (adds the full-size step, about an hour here); the GPU and native-bf16 CPU parts come from the '
           'commands printed in their sections, run on those machines (benchmarks/README.md). Each part below names the command, date and machine that produced it; '
           'raw figures are in `benchmarks/results/*.json`. Method: `benchmarks/README.md`.', '']
    if machine:
        out += [f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs ({', '.join(machine.get('cpu_isa', []))}; "
                f"native bf16: {'yes' if machine.get('cpu_bf16') else 'no'}), torch {machine['torch']}, Python {machine['python']}.", '']
    out += _speed_section(gpu, load(results_dir, 'gpu_compiled'))
    notes = load(results_dir, 'notes')
    if notes and notes.get('lines'): out += ['## Status of these figures', ''] + [f'- {l}' for l in notes['lines']] + ['']
    cpu_bf16 = load(results_dir, 'cpu_bf16')
    out += ['## Targets (issue 8)', ''] + _targets(full, quick, bf16, gpu, cpu_bf16) + ['']
    out += _step_section('Training step, full size (CPU)', full, 'python benchmarks/run_all.py --full')
    out += _step_section('Training step, quickstart size (CPU)', quick, 'python benchmarks/run_all.py')
    out += _bf16_section(bf16, machine)
    out += _cpu_bf16_section(cpu_bf16)
    out += _recommendation(bf16, gpu, machine, cpu_bf16)
    out += _gpu_section(gpu)
    out += _gpu_compiled_section(load(results_dir, 'gpu_compiled'))
    out += _gpu_compiled_section(load(results_dir, 'gpu_loop'), 'with the step reading the device once per update (2026-11-30 code)')
    out += _data_section(data) + _main_job_section(main_job)
    return '\n'.join(out) + '\n'

def _speed_section(gpu: dict | None, loop: dict | None) -> list[str]:
    "Speed at full size on a GPU, like for like first (both loops on one GPU), each other comparison named for what it is."
    lines = []
    if gpu:
        on = gpu['full']['timing']['gan_on']['variants']; sph = {v: 3600 / on[v]['median_s'] for v in on}
        lines.append(f"- **Like for like** (same GPU, weights, batch and precision; full size, batch 2, GAN on): our step against upstream's loop on "
                     f"the {gpu['full']['machine'].get('gpu')}, fp32: {sph['ours']:,.0f} / {sph['upstream']:,.0f} steps/h = "
                     f"**{sph['ours'] / sph['upstream']:.2f}×** (median of the per-round paired ratios: {on['ours']['speedup_vs_upstream']:.2f}×; "
                     f"{gpu['date_utc'][:10]}, section 'GPU' below).")
        if 'ours+bf16' in sph:
            lines.append(f"- Our step in bf16 against upstream's loop in fp32, same GPU: {sph['ours+bf16'] / sph['upstream']:.2f}× "
                         "(the loop and the precision both change).")
    runs = {(r['variant'], r['batch']): r['steps_per_hour'] for r in (loop or {}).get('runs', []) if not r.get('error')}
    best = max((k for k in runs if k[1] == 2), key=runs.get, default=None)
    if best and ('eager-fp32', 2) in runs:
        lines.append(f"- Our whole training loop, its options against its plain form on one GPU ({loop['machine'].get('gpu')}, batch 2, "
                     f"{loop['date_utc'][:10]}): {best[0]} {runs[best]:,.0f} against eager-fp32 {runs[('eager-fp32', 2)]:,.0f} steps/h = "
                     f"{runs[best] / runs[('eager-fp32', 2)]:.2f}×; upstream's loop was not timed on this GPU.")
    if lines:
        ratios = ([f"our fp32 step on the {gpu['full']['machine'].get('gpu')} {sph['ours'] / ORIGINAL_STEPS_PER_HOUR:.2f}×"] if gpu else []) + (
                 [f"{best[0]} on the {loop['machine'].get('gpu')} {runs[best] / loop['original_run_steps_per_hour']:.2f}×"] if best else [])
        lines.append(f"- Against the original run's logged rate (~{ORIGINAL_STEPS_PER_HOUR:,} steps/h, from its log's timestamps), "
                     f"{ORIGINAL_RUN_CAVEAT}: {', '.join(ratios)}.")
    return ['## Speed on a GPU, like for like first', ''] + lines + [''] if lines else []

def _gpu_section(gpu: dict | None) -> list[str]:
    if gpu is None:
        return ['## GPU', '', 'Not run. On a GPU machine: `python benchmarks/run_all.py --device cuda --results-dir OUT`, '
                'then copy OUT/gpu.json to benchmarks/results/ and run `python benchmarks/run_all.py --render`.', '']
    stamp = {'command': gpu['command'], 'date_utc': gpu['date_utc']}
    f = {**gpu['full'], **stamp}
    lines = [f"## GPU: {f['machine'].get('gpu')}", '',
             f"`{gpu['command']}` — {gpu['date_utc']} — torch {f['machine']['torch']}, CUDA {f['machine'].get('cuda')}. "
             "fp32 means PyTorch's defaults: cuDNN convolutions may use TF32 (`torch.backends.cudnn.allow_tf32` is on by default), matmuls do not.", '']
    per = f['timing']['gan_on']['variants']
    lines += [f"Steps per hour at full size (batch 2, GAN on / off); with GAN on, × upstream's loop on this GPU (like for like) and × the original "
              f"run's logged ~{ORIGINAL_STEPS_PER_HOUR:,}/h ({ORIGINAL_RUN_CAVEAT}):", '']
    for v in f['variants']:
        on, off = per[v]['median_s'], f['timing']['gan_off']['variants'][v]['median_s']
        lines.append(f"- {v}: {3600 / on:,.0f} / {3600 / off:,.0f} steps/h ({per['upstream']['median_s'] / on:.2f}× upstream's loop here; "
                     f"{3600 / on / ORIGINAL_STEPS_PER_HOUR:.2f}× the original's rate)")
    lines += [''] + _step_section('GPU, full size', f, '')[2:]
    if gpu.get('quickstart'): lines += _step_section('GPU, quickstart size', {**gpu['quickstart'], **stamp}, '')
    if gpu.get('bf16_deviation'): lines += _bf16_section({**gpu['bf16_deviation'], **stamp}, {'cpu_bf16': True})
    if gpu.get('profile'): lines += ['GPU profile of our step (full size, GAN on):', '', '```', gpu['profile'], '```', '']
    return lines

def _data_section(d: dict | None) -> list[str]:
    if d is None: return ['## Data throughput', '', 'Not measured (benchmarks/bench_data.py missing or failed).', '']
    if 'error' in d: return ['## Data throughput', '', f"Failed: {d['error']}", '']
    g = d['generate']
    lines = ['## Data throughput (benchmarks/bench_data.py)', '', f"`{d['command']}` — {d['date_utc']}; maps {d['size']}×{d['size']}, batch {d['batch_size']}.", '',
             f"- synthetic generation, one core: {g['maps_per_s_cpu']:.1f} maps/s (CPU time), {g['maps_per_s_wall']:.1f} maps/s (wall)"]
    for key, label in (('load_png', 'RadioMapSeer-layout PNG loading'), ('synthetic_loader', 'on-the-fly synthetic dataset')):
        if key in d: lines.append(f"- {label}: " + ', '.join(f"{w} workers {v:.1f} maps/s" for w, v in d[key]['maps_per_s'].items()))
    return lines + ['']

def _main_job_section(m: dict | None) -> list[str]:
    how = ('Run `radiodiff-vae reproduce --out runs/<name>` (its `reproduce.json` records each stage\'s seconds), copy its figures '
           'into `benchmarks/results/main_job.json`, then `python benchmarks/run_all.py --render`.')
    if m is None: return ['## Main job wall time', '', 'No main-job record stored. ' + how, '']
    if m.get('source', '').startswith('given'):
        return ['## Main job wall time', '', f"{m['seconds'] / 60:.1f} min ({m['source']}).", '']
    state = 'complete' if m.get('complete') else f"**not finished** when read ({len(m.get('stages') or {})} of {len(m.get('planned') or []) or '?'} stages done)"
    lines = ['## Main job wall time', '', f"`{m['source']}` ({m['date_utc']}), settings {json.dumps(m.get('settings'))}: {state}."]
    if m.get('machine'): lines[-1] += f" Machine: {_machine_name(m['machine'])}; command: `{m.get('command', '')}`; {m.get('precision', '')}."
    if m.get('wall_seconds'): lines.append(f"- wall clock, start-up included: {m['wall_seconds'] / 60:.1f} min")
    for k, v in (m.get('stages') or {}).items(): lines.append(f"- {k}: {v / 60:.1f} min")
    if m.get('complete'): lines.append(f"- total: {m['seconds'] / 60:.1f} min")
    else: lines.append('- ' + how)
    if (q := m.get('real_maps_native_256')):
        lines.append(f"- its model on the 26 bundled real maps at 256x256 (from upstream's training split; EMA): PSNR {q['psnr_ema']:.2f} dB "
                     f"{q.get('psnr_ema_ci', '')} (95% interval over the maps), SSIM {q['ssim_ema']:.3f}")
    if (f := m.get('fp32_same_cpu')):
        lines.append(f"- the same job in fp32 on the same machine ({f['date_utc']}, `{f['command']}`, {f['note']}): "
                     f"{f['wall_seconds'] / 60:.1f} min wall, training {f['stages']['train'] / 60:.1f} min; real maps {f['real_maps_psnr_ema']:.2f} dB")
    return lines + ['']

def _data_feed(runs: list) -> str:
    "How the loop got its synthetic maps: DataLoader workers ahead of the steps, or the training process itself."
    workers = sorted({r.get('data_workers', 0) for r in runs})
    if workers == [0]: return ('The maps were generated in the training process between the steps (data.num_workers=0), '
                               'while the GPU waited: host time a real run, which loads its maps in workers, does not spend.')
    return f"The maps were generated ahead of the steps by {'/'.join(map(str, workers))} DataLoader workers, as a real run loads them."

def _gpu_compiled_section(g: dict | None, which: str = '') -> list[str]:
    "The whole training loop at full size on a GPU (benchmarks/bench_gpu.py): eager vs compiled, fp32 vs bf16, per batch size."
    if not g: return []
    runs = [r for r in g['runs'] if not r.get('error')]
    ref = {r['batch']: r for r in runs if r['variant'] == 'eager-fp32'}
    lines = [f"## Whole training loop on a GPU at full size: eager vs compiled{', ' + which if which else ''} (benchmarks/bench_gpu.py)", '',
             f"{g['date_utc']}, {g['machine'].get('gpu', '?')} (torch {g['machine'].get('torch', '?')}); `{g['command']}`. {_data_feed(runs)} {g.get('note', '')}.", '',
             "| variant | batch | steps/h | images/s | x eager fp32, same GPU and batch | x the original run's logged 19,606 steps/h (not like for like) | first-step total loss, relative to eager fp32 | peak GB |",
             '|---|---|---|---|---|---|---|---|']
    for r in sorted(runs, key=lambda r: (r['batch'], r['variant'])):
        base = ref.get(r['batch'], {}).get('first_step', {}).get('train/total_loss')
        dev = abs(r['first_step']['train/total_loss'] - base) / abs(base) if base else None
        same = ref.get(r['batch'], {}).get('steps_per_hour')
        vs_same = f"{r['steps_per_hour'] / same:.2f}" if same else ''
        lines.append(f"| {r['variant']} | {r['batch']} | {r['steps_per_hour']:,.0f} | {r['images_per_s']:.1f} | {vs_same} | "
                     f"{r['steps_per_hour'] / g['original_run_steps_per_hour']:.2f} | {'' if dev is None else f'{dev:.1e}'} | "
                     f"{r.get('peak_memory_gb') or 0:.1f} |")
    missing = [f"{r['variant']} at batch {r['batch']} ({r['error']})" for r in g['runs'] if r.get('error') and not any(
               x['variant'] == r['variant'] and x['batch'] == r['batch'] for x in runs)]
    if missing: lines += ['', 'Not measured: ' + '; '.join(missing) + '.']
    profiled = [r for r in runs if r.get('profile')]
    if profiled: lines += ['', 'Where a step\'s time goes (torch.profiler, steps after the timed ones; host: the CPU\'s own time in operators):', '']
    for r in profiled:
        p = r['profile']
        lines.append(f"- {r['variant']}, batch {r['batch']}: {p['wall_s_per_step'] * 1e3:.1f} ms per step; host {p['host_self_s_per_step'] * 1e3:.1f} ms, "
                     f"device {p['device_s_per_step'] * 1e3:.1f} ms; {p['kernel_launches_per_step']:.0f} kernel launches, "
                     f"{p['synchronizations_per_step']:.0f} synchronisations per step")
    return lines + ['']

def _machine_name(mc: dict) -> str:
    isa = mc.get('cpu_isa') or mc.get('isa') or []
    return f"{mc.get('cpu', '?')}, {mc.get('logical_cpus', '?')} logical CPUs ({', '.join(isa)})"

# ----------------------------------------------------------------------------------------------- running
def run_cpu(args, command: str):
    rd = Path(args.results_dir)
    if not args.skip_step:
        print('[run_all] quickstart step benchmark', flush=True)
        r = bench_step.run_benchmark('quickstart', warmup=2, steps=args.quick_steps)
        save(rd, 'step_quickstart', r, command); render_to(rd)
        if args.bf16_steps > 0:
            print('[run_all] bf16 deviation', flush=True)
            save(rd, 'bf16_deviation', bench_step.bf16_deviation('quickstart', args.bf16_steps), command); render_to(rd)
    if args.full:
        print('[run_all] full-size step benchmark', flush=True)
        r = bench_step.run_benchmark('full', warmup=1, steps=args.full_steps)
        save(rd, 'step_full', r, command); render_to(rd)
    if not args.skip_data:
        print('[run_all] bench_data.py', flush=True)
        tmp = rd / '.data.json.tmp'   # its own process: bench_data sets torch to one thread
        p = subprocess.run([sys.executable, str(HERE / 'bench_data.py'), '--json', str(tmp)], capture_output=True, text=True, cwd=REPO)
        save(rd, 'data', json.loads(tmp.read_text()) if p.returncode == 0 else {'error': p.stderr[-1500:]}, command)
        tmp.unlink(missing_ok=True)

def run_gpu(args, command: str):
    "Full size (fp32 + bf16 + channels_last + checkpointing), quickstart, bf16 deviation: one gpu.json (bench_gpu.py profiles the loop)."
    dev, out = args.device, {}
    for key, measure in (('full', lambda: bench_step.run_benchmark('full', warmup=3, steps=args.gpu_steps, device=dev)),
                         ('bf16_deviation', lambda: bench_step.bf16_deviation('quickstart', args.bf16_steps, dev)),
                         ('quickstart', lambda: bench_step.run_benchmark('quickstart', warmup=3, steps=args.gpu_steps, device=dev, memory=False))):
        out[key] = measure(); save(Path(args.results_dir), 'gpu', out, command)   # each part kept as soon as it is measured

def render_to(results_dir: Path):
    "Write RESULTS.md next to the stored parts' default location (only for the repository's results folder)."
    if results_dir.resolve() == RESULTS_DIR.resolve():
        tmp = RESULTS_MD.with_suffix('.md.tmp'); tmp.write_text(render(results_dir)); os.replace(tmp, RESULTS_MD)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--full', action='store_true', help='also the full-size step benchmark (about an hour on 2 cores)')
    p.add_argument('--render', action='store_true', help='only rewrite RESULTS.md from benchmarks/results/')
    p.add_argument('--device', default='cpu', help="'cuda' on a GPU machine: full + quickstart + bf16 there, into gpu.json")
    p.add_argument('--results-dir', default=str(RESULTS_DIR))
    p.add_argument('--quick-steps', type=int, default=5, help='timed steps per variant and phase at quickstart size')
    p.add_argument('--full-steps', type=int, default=3, help='timed steps per variant and phase at full size (after 1 warm-up)')
    p.add_argument('--gpu-steps', type=int, default=20)
    p.add_argument('--bf16-steps', type=int, default=50, help='quickstart steps of the fp32-vs-bf16 loss deviation (0: skip)')
    p.add_argument('--skip-step', action='store_true', help='skip the quickstart step benchmark and bf16 deviation')
    p.add_argument('--skip-data', action='store_true', help='skip bench_data')
    p.add_argument('--note', action='append', default=None, help='a line for the "Status of these figures" section (repeatable; replaces the stored notes)')
    a = p.parse_args(argv)
    command = 'python benchmarks/run_all.py ' + ' '.join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    if a.note is not None: save(Path(a.results_dir), 'notes', {'lines': a.note}, command.strip())
    if not a.render:
        (run_gpu if a.device.startswith('cuda') else run_cpu)(a, command.strip())
    render_to(Path(a.results_dir))
    print(f'[run_all] done in {time.time() - t0:.0f} s; {RESULTS_MD if Path(a.results_dir).resolve() == RESULTS_DIR.resolve() else a.results_dir}', flush=True)
    return 0

if __name__ == '__main__':
    sys.exit(main())
