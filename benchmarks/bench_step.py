"""Time one VAE-GAN training step three ways on the same weights and batch (issue 8): (a) upstream's loop rebuilt from our
modules, (b) our `Trainer.train_step`, (c) (b) with one option each. What each is and how it is measured: benchmarks/README.md.
"""
from __future__ import annotations
import argparse, contextlib, copy, json, statistics, subprocess, sys, time, warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from radiodiff_vae.core import machine_info  # noqa: E402   the one record of the machine, shared with the package

VARIANTS = ('upstream', 'ours', 'ours+channels_last', 'ours+bf16', 'ours+checkpointing')
PHASES = ('gan_off', 'gan_on')
# what each size is: the config file it comes from and what the benchmark changes in it
SIZES = {
    'tiny': dict(config='configs/quickstart.yaml', tiny_model=True),   # tiny_config()'s model, maps and batch on the quickstart's training
    'quickstart': dict(config='configs/quickstart.yaml'),
    # upstream's full size; LPIPS on with a *random* VGG16 backbone (same FLOPs; the pretrained weights
    # must be downloaded and are not available offline)
    'full': dict(config='configs/radiodiff.yaml', loss=dict(perceptual_weight=1.0, lpips_pretrained=False)),
}


# ----------------------------------------------------------------------------------------------- machine
def sync(device: str):
    if device.startswith('cuda'): torch.cuda.synchronize()

def measure_peaks(device: str = 'cpu', reps: int = 5) -> dict:
    "GFLOP/s of a large fp32 matmul and a large 3x3 convolution (best of `reps`, contiguous and channels_last): the machine's peak."
    n = 2048 if device == 'cpu' else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b; sync(device)
    def mm():
        t0 = time.perf_counter(); a @ b; sync(device); return 2 * n**3 / (time.perf_counter() - t0) / 1e9
    shape = (2, 128, 128, 128) if device == 'cpu' else (8, 256, 128, 128)
    conv = {fmt: max(conv_peak_once(device, shape, fmt == 'channels_last') for _ in range(reps)) for fmt in ('contiguous', 'channels_last')}
    return dict(matmul=dict(n=n, gflops=max(mm() for _ in range(reps))), conv3x3=dict(shape=list(shape), **conv),
                conv_peak_gflops=max(conv.values()))


# ----------------------------------------------------------------------------------------------- setup
def bench_config(size: str) -> dict:
    "The model/loss/batch settings of `size` (tiny, quickstart, full), from the project's config files."
    from radiodiff_vae.config import load_config, tiny_config
    if size not in SIZES: raise ValueError(f'size {size!r}: expected one of {", ".join(SIZES)}')
    spec, cfg = SIZES[size], load_config(REPO / SIZES[size]['config'])
    if spec.get('tiny_model'):
        t = tiny_config()
        spec = {**spec, 'ddconfig': t['model']['ddconfig'], 'loss': {'disc_ndf': t['model']['lossconfig']['disc_ndf']},
                'batch_size': t['data']['batch_size'], 'map_size': t['data']['size']}
    ddconfig = {**cfg['model']['ddconfig'], **spec.get('ddconfig', {})}
    lossconfig = {**cfg['model']['lossconfig'], **spec.get('loss', {})}
    return dict(size=size, config=spec['config'], ddconfig=ddconfig, embed_dim=cfg['model']['embed_dim'],
                lossconfig=lossconfig, trainer=cfg['trainer'],
                batch_size=spec.get('batch_size', cfg['data']['batch_size']),
                map_size=spec.get('map_size', cfg['data']['size']))

def real_batch(batch_size: int, map_size: int) -> torch.Tensor:
    "A batch of the bundled real RadioMapSeer maps, scaled to [-1, 1] (area-resized when `map_size` < 256)."
    from radiodiff_vae.core import real_maps_dir
    from radiodiff_vae.data import read_gray_png, scale_gain
    files = sorted((real_maps_dir() / 'gain' / 'DPM').glob('*.png'))
    if not files: raise FileNotFoundError(f'{real_maps_dir()}/gain/DPM: no maps found')
    x = torch.stack([scale_gain(read_gray_png(files[i % len(files)], size=None)) for i in range(batch_size)])
    return x if x.shape[-1] == map_size else F.interpolate(x, size=(map_size, map_size), mode='area')

class FixedMaps(torch.utils.data.Dataset):
    "The benchmark batch as a dataset (items like MapFolder's), so the trainer's own batch stream serves it."
    def __init__(self, x): self.x = x
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'image': self.x[i], 'name': f'bench-{i}'}

def trainer_config(cfg: dict, variant: str) -> dict:
    "The trainer config of `variant`: the size's config, in-memory data, no TensorBoard."
    from radiodiff_vae.config import load_config, resolve_config
    c = load_config(REPO / cfg['config'])
    c['model']['ddconfig'], c['model']['lossconfig'] = copy.deepcopy(cfg['ddconfig']), copy.deepcopy(cfg['lossconfig'])
    c['model']['ckpt_path'] = None
    c['data'].update(batch_size=cfg['batch_size'], size=cfg['map_size'], num_workers=0,
                     finish=None)   # one map size: a config's finishing phase is not timed here
    c['trainer'].update(cfg['trainer'])
    c['trainer'].update(log_with=[],
                        mixed_precision='bf16' if variant.endswith('bf16') else 'no',   # accelerate autocasts the prepared steps
                        gradient_accumulate_every=1)
    return resolve_config(c)

class StepState:
    "One variant: a real `Trainer` (model, loss, optimizers, batch stream) and the variant's options, set through public hooks."
    def __init__(self, trainer, variant: str, folder, x):
        self.tr, self.variant, self.folder, self.device = trainer, variant, folder, str(trainer.device)
        self.model, self.loss, self.x = trainer.ae, trainer.loss, x.to(trainer.device)
        self.channels_last, self.bf16 = variant.endswith('channels_last'), variant.endswith('bf16')
        self.marks, self.batch = {}, None
        trainer.gen.register_forward_pre_hook(self._batch_in)      # the autoencoder pass: its batch and posterior noise
        trainer.disc.register_forward_pre_hook(self._disc_starts)  # the discriminator pass begins: the AE/D time split

    def _batch_in(self, module, args):
        x, eps, *rest = args
        self.batch = x, eps
        if self.channels_last: return (x.contiguous(memory_format=torch.channels_last), eps, *rest)   # the trainer's batches are contiguous

    def _disc_starts(self, module, args):
        sync(self.device); self.marks.setdefault('disc', time.perf_counter())

    def autocast(self):
        return torch.autocast(self.device.split(':')[0], dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def close(self):
        "Release the trainer's run folder (its lock and log files: what `fit()` releases at its end)."
        import shutil
        self.tr.logs.close(); self.tr.lock.release()
        shutil.rmtree(self.folder, ignore_errors=True)

def build_state(cfg: dict, variant: str, x, device: str = 'cpu') -> StepState:
    "A fresh trainer for `variant` (weights from the config's seed: identical for every variant) serving batch `x`."
    import tempfile
    from radiodiff_vae.trainer import Trainer
    folder = tempfile.mkdtemp(prefix=f'bench-{variant}-')
    tr = Trainer(trainer_config(cfg, variant), folder, progress=False, dataset=FixedMaps(x))
    if tr.device.type != torch.device(device).type:   # the trainer takes a GPU wherever one is visible
        raise RuntimeError(f'bench_step: --device {device}, but the trainer runs on {tr.device}; for the CPU hide the GPUs (CUDA_VISIBLE_DEVICES=)')
    st = StepState(tr, variant, folder, x)
    if st.channels_last:
        st.tr.ae.to(memory_format=torch.channels_last); st.tr.loss.to(memory_format=torch.channels_last)
    st.tr.ae.gradient_checkpointing = variant.endswith('checkpointing')   # the model's option (no trainer setting)
    return st


# ----------------------------------------------------------------------------------------------- the steps
def _floats(log: dict) -> dict:
    "A loss log as plain floats (taken before the optimizer step changes logged parameters such as logvar)."
    return {k: float(v) for k, v in log.items()}

def phase_step(cfg: dict, phase: str, logged: bool = False) -> int:
    "A global step with the GAN term off (< disc_start) or on, that the trainer logs (`logged`) or does not."
    freq = int(cfg['trainer']['log_freq'])
    s = 0 if phase == 'gan_off' else int(cfg['lossconfig']['disc_start'])
    while (s % freq == 0) != logged: s += 1
    if phase == 'gan_off' and s >= int(cfg['lossconfig']['disc_start']): raise ValueError('disc_start too small for a GAN-off step')
    return s

def upstream_step(st: StepState, global_step: int, batch=None) -> dict:
    """(a) RadioDiff's train_vae.py step: AE pass, then a D pass that runs the AE forward again; losses / 2; clip after the steps.
    `batch`: (x, eps) to use (the batch and noise our step saw, to compare losses); else the benchmark batch and a fresh sample."""
    from radiodiff_vae.nll import reconstruction_loss, nll_loss, batch_sum
    model, loss, tr = st.model, st.loss, st.tr
    x, eps = batch if batch is not None else (st.x, None)
    if st.channels_last: x = x.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    tr.opt_ae.zero_grad(set_to_none=True)
    with st.autocast():
        post = model.encode(x)    # upstream's model(x); with `eps`, the noise our step drew
        rec = model.decode(post.mean + post.std * eps if eps is not None else post.sample())
        ae_loss, ae_log = loss(x, rec, post, 0, global_step, last_layer=model.get_last_layer(), split='train')
    (ae_loss / 2).backward()      # gradient_accumulate_every = 2 divided each pass's loss
    ae_log = _floats(ae_log)
    tr.opt_ae.step()
    sync(st.device); t1 = time.perf_counter()
    tr.opt_disc.zero_grad(set_to_none=True)
    with st.autocast():
        rec2, post2 = model(x)    # defect 1: a second forward with a fresh posterior sample ...
        r = reconstruction_loss(x, rec2, loss.perceptual_loss, loss.perceptual_weight)   # ... and the NLL, LPIPS, KL
        nll_loss(r, loss.logvar, None); batch_sum(post2.kl())                            # upstream computes, then drops
        d_loss, d_log = loss(x, rec2, post2, 1, global_step, last_layer=model.get_last_layer(), split='train')
    (d_loss / 2).backward()
    d_log = _floats(d_log)
    tr.opt_disc.step()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # defect 2: after the steps, so it clips nothing
    torch.nn.utils.clip_grad_norm_(loss.discriminator.parameters(), 1.0)
    sync(st.device)
    return dict(ae_log=ae_log, d_log=d_log, t_ae=t1 - t0, t_disc=time.perf_counter() - t1)

def ours_step(st: StepState, global_step: int) -> dict:
    "(b)/(c) our trainer's own `Trainer.train_step` (its AE pass and D pass timed apart: the split is the D pass's first forward)."
    st.marks.clear(); st.tr.step = global_step
    t0 = time.perf_counter()
    vals = st.tr.train_step()
    sync(st.device); t2 = time.perf_counter()
    t1 = st.marks.get('disc', t2)
    is_d = lambda k: k.split('/')[-1] in ('disc_loss', 'logits_real', 'logits_fake')
    return dict(ae_log={k: v for k, v in vals.items() if k.startswith('train/') and not is_d(k)},
                d_log={k: v for k, v in vals.items() if is_d(k)}, t_ae=t1 - t0, t_disc=t2 - t1)

def run_step(variant: str, st: StepState, global_step: int, seed: int = 0, batch=None) -> dict:
    "One step of `variant`; the global RNG (posterior noise) seeded with `seed` first."
    torch.manual_seed(seed)
    return upstream_step(st, global_step, batch) if variant == 'upstream' else ours_step(st, global_step)


# ----------------------------------------------------------------------------------------------- measurements
def compare_losses(cfg: dict, x, device: str = 'cpu', seed: int = 0) -> dict:
    "AE-pass losses of (a) and (b) on fresh, identical weights, the batch and noise our step drew, per phase (logged steps)."
    out = {}
    for phase in PHASES:
        gs, logs, batch = phase_step(cfg, phase, logged=True), {}, None
        for v in ('ours', 'upstream'):
            st = build_state(cfg, v, x, device)
            try:
                logs[v] = _floats(run_step(v, st, gs, seed=seed, batch=batch)['ae_log'])
                batch = st.batch
            finally: st.close()
        la, lb = logs['upstream'], logs['ours']
        keys = [k for k in la if k in lb and not k.endswith('d_weight_clamped')]
        if not keys: raise RuntimeError(f'no common loss keys to compare: upstream {sorted(la)}, ours {sorted(lb)}')
        rel = {k: abs(la[k] - lb[k]) / max(abs(la[k]), 1e-12) for k in keys}
        out[phase] = dict(global_step=gs, max_rel_diff=max(rel.values()), worst_key=max(rel, key=rel.get),
                          upstream=la, ours=lb, compared=keys)
    return out

def count_flops(variant: str, st: StepState, global_step: int) -> int:
    "FLOPs of one step (forward, backward, adaptive-weight autograd), counted by torch's FlopCounterMode."
    with FlopCounterMode(display=False) as fc:
        run_step(variant, st, global_step)
    return int(fc.get_total_flops())

def conv_peak_once(device: str = 'cpu', shape=None, channels_last: bool = True) -> float:
    "GFLOP/s of one warm 3x3 convolution (channels_last: the peak sampled between timed steps, under the same load)."
    bsz, c, h, w = shape or ((2, 128, 128, 128) if device == 'cpu' else (8, 256, 128, 128))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(bsz, c, h, w, device=device).contiguous(memory_format=fmt)
    wt = torch.randn(c, c, 3, 3, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        F.conv2d(x, wt, padding=1); sync(device)
        t0 = time.perf_counter(); F.conv2d(x, wt, padding=1); sync(device)
    return 2 * bsz * c * h * w * c * 9 / (time.perf_counter() - t0) / 1e9

def _summary(times: list[dict], flops) -> dict:
    med = lambda k: statistics.median(t[k] for t in times)
    return dict(step_s=[t['total'] for t in times], median_s=med('total'), median_ae_s=med('ae'),
                median_disc_s=med('disc'), median_cpu_s=med('cpu'), flops=flops)

def time_variants(cfg: dict, x, variants, warmup: int, steps: int, device: str = 'cpu') -> dict:
    "Median s/step of each variant and phase, the variants interleaved step by step; FLOPs counted in the first warm-up step."
    if warmup < 1: raise ValueError('warmup must be >= 1 (the first step is the FLOP-counted warm-up)')
    res = {}
    for phase in PHASES:
        gs = phase_step(cfg, phase)
        states = {v: build_state(cfg, v, x, device) for v in variants}
        times, flops, peaks = {v: [] for v in variants}, {}, []
        try:
            for i in range(warmup + steps):
                for v in variants:
                    if i == 0: flops[v] = count_flops(v, states[v], gs); continue
                    c0 = time.process_time()
                    r = run_step(v, states[v], gs, seed=i)
                    if i >= warmup: times[v].append(dict(total=r['t_ae'] + r['t_disc'], ae=r['t_ae'], disc=r['t_disc'], cpu=time.process_time() - c0))
                if i >= warmup: peaks.append(conv_peak_once(device))
                print(f'[bench_step] {phase} round {i + 1}/{warmup + steps} done', file=sys.stderr, flush=True)
        finally:
            for st in states.values(): st.close()
        del states
        res[phase] = dict(global_step=gs, conv_peak_gflops_samples=peaks, conv_peak_gflops_median=statistics.median(peaks),
                          variants={v: _summary(times[v], flops[v]) for v in variants})
    return res

def derive(timing: dict) -> None:
    "Add speed-ups vs (a), achieved GFLOP/s, fraction of the in-run conv peak and the FLOPs/peak floor to each variant."
    for phase, ph in timing.items():
        per, peak = ph['variants'], ph['conv_peak_gflops_median']
        ref = per['upstream']['median_s'] if 'upstream' in per else None
        ref_rounds = per['upstream']['step_s'] if 'upstream' in per else None
        for v, r in per.items():
            # useful work: our step's FLOPs for every ours+option variant (checkpointing's recompute is not useful
            # work, and FlopCounterMode misses some channels_last backward kernels)
            r['useful_flops'] = per['ours']['flops'] if v.startswith('ours') and 'ours' in per else r['flops']
            # the variants run interleaved, so round i of each is paired with round i of (a): the median of the per-round
            # ratios cancels the machine's drift between rounds (up to +-30% on the shared 2-core VM), a ratio of medians does not
            r['speedup_vs_upstream_of_medians'] = ref / r['median_s'] if ref else None
            r['speedup_vs_upstream'] = (statistics.median(a / b for a, b in zip(ref_rounds, r['step_s']))
                                        if ref_rounds and len(ref_rounds) == len(r['step_s']) else r['speedup_vs_upstream_of_medians'])
            r['gflops_achieved'] = r['useful_flops'] / r['median_s'] / 1e9
            r['fraction_of_conv_peak'] = r['gflops_achieved'] / peak if peak else None
            r['floor_s'] = r['useful_flops'] / (peak * 1e9) if peak else None
            r['ratio_to_floor'] = r['median_s'] / r['floor_s'] if r['floor_s'] else None

class RssSampler:
    "Highest resident set size seen by a background thread sampling every `interval` s (torch ops release the GIL)."
    def __init__(self, interval: float = 0.002):
        import psutil, threading
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss); self._stop.wait(self.interval)
    def __enter__(self): self.peak = self.proc.memory_info().rss; self._thread.start(); return self
    def __exit__(self, *exc): self._stop.set(); self._thread.join(); self.peak = max(self.peak, self.proc.memory_info().rss)

def memory_worker(size: str, variant: str, device: str = 'cpu') -> dict:
    "Peak memory of one variant alone: build it, then one GAN-off and one GAN-on step (RSS sampled during the build and the steps)."
    import psutil
    cfg = bench_config(size)
    with RssSampler() as build:
        st = build_state(cfg, variant, real_batch(cfg['batch_size'], cfg['map_size']), device)
    if device.startswith('cuda'): torch.cuda.reset_peak_memory_stats()
    after_build, peak_build = psutil.Process().memory_info().rss / 2**20, build.peak / 2**20
    try:
        with RssSampler() as sampler:
            for phase in PHASES: run_step(variant, st, phase_step(cfg, phase))
    finally: st.close()
    # ru_maxrss is not used: on Linux a child keeps its parent's high-water mark across fork + exec, so in this worker
    # it reports the benchmark process's RSS, not the variant's
    out = dict(variant=variant, size=size, rss_after_build_mb=after_build, peak_rss_build_mb=peak_build,
               peak_rss_mb=max(peak_build, sampler.peak / 2**20), peak_rss_steps_mb=sampler.peak / 2**20,
               step_increment_mb=sampler.peak / 2**20 - after_build)
    if device.startswith('cuda'): out['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20
    return out

def measure_memory(size: str, variants, device: str = 'cpu', timeout: float = 3600) -> dict:
    "Peak RSS (and CUDA peak) of each variant, each in its own subprocess."
    res = {}
    for v in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), '--memory-worker', v, '--size', size, '--device', device]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if p.returncode != 0: raise RuntimeError(f'memory worker {v} failed (exit {p.returncode}): {p.stderr[-3000:]}')
        res[v] = json.loads(p.stdout.strip().splitlines()[-1])
    return res

def bf16_deviation(size: str = 'quickstart', steps: int = 50, device: str = 'cpu') -> dict:
    "Train fp32 and bf16-autocast trainers from the same weights on the same batches (as fit() does); loss deviation per step."
    cfg = copy.deepcopy(bench_config(size))
    cfg['lossconfig']['disc_start'] = steps // 2          # half the steps without, half with the GAN term
    cfg['trainer']['log_freq'] = 1                       # every step's losses
    x = real_batch(26, cfg['map_size'])
    states = {name: build_state(cfg, v, x, device) for name, v in (('fp32', 'ours'), ('bf16', 'ours+bf16'))}
    rows, secs = [], {'fp32': 0.0, 'bf16': 0.0}
    keys = ('total_loss', 'rec_loss', 'nll_loss', 'kl_loss', 'g_loss')
    try:
        for i in range(steps):
            r = {}
            for name, st in states.items():
                t0 = time.perf_counter()
                r[name] = _floats(run_step('ours', st, i, seed=i)['ae_log'])
                with warnings.catch_warnings():   # the D optimizer has not stepped while the GAN term is off
                    warnings.simplefilter('ignore', UserWarning)
                    st.tr.sched_ae.step(); st.tr.sched_disc.step()
                secs[name] += time.perf_counter() - t0
            rows.append({k: (r['fp32'][f'train/{k}'], r['bf16'][f'train/{k}']) for k in keys})
            print(f'[bf16_deviation] step {i + 1}/{steps}: fp32 {secs["fp32"]:.1f} s, bf16 {secs["bf16"]:.1f} s so far', file=sys.stderr, flush=True)
    finally:
        for st in states.values(): st.close()
    rel = {k: [abs(b - a) / max(abs(a), 1e-12) for a, b in (row[k] for row in rows)] for k in keys}
    return dict(size=size, steps=steps, disc_start=cfg['lossconfig']['disc_start'], seconds=secs,
                max_rel_dev={k: max(v) for k, v in rel.items()}, median_rel_dev={k: statistics.median(v) for k, v in rel.items()},
                final={k: rows[-1][k] for k in keys}, first={k: rows[0][k] for k in keys},
                rec_loss_curve=[row['rec_loss'] for row in rows])

def available_variants(device: str) -> list[str]:
    "All variants, bf16 only where the hardware computes it natively (CPU: AVX-512 BF16/AMX; CUDA: bf16 support)."
    m = machine_info(device)
    bf16_ok = m['gpu_bf16'] if device.startswith('cuda') else m['cpu_bf16']
    return [v for v in VARIANTS if v != 'ours+bf16' or bf16_ok]

def run_benchmark(size: str, warmup: int = 1, steps: int = 5, variants=None, device: str = 'cpu', memory: bool = True,
                  peaks: bool = True, peak_reps: int = 5) -> dict:
    "The step benchmark at `size`: losses (a) vs (b), interleaved timings, FLOPs, achieved vs peak GFLOP/s, memory."
    cfg = bench_config(size)
    variants = list(variants or available_variants(device))
    if 'upstream' not in variants or 'ours' not in variants: raise ValueError("variants must include 'upstream' and 'ours'")
    started = time.time()
    out = dict(size=size, device=device, config=cfg['config'], ddconfig=cfg['ddconfig'], batch_size=cfg['batch_size'],
               map_size=cfg['map_size'], perceptual_weight=cfg['lossconfig'].get('perceptual_weight'),
               lpips_pretrained=cfg['lossconfig'].get('lpips_pretrained'), warmup=warmup, steps=steps, variants=variants,
               machine=machine_info(device), argv=sys.argv)
    out['peaks'] = measure_peaks(device, reps=peak_reps) if peaks else None
    x = real_batch(cfg['batch_size'], cfg['map_size'])
    out['losses'] = compare_losses(cfg, x, device)
    out['timing'] = time_variants(cfg, x, variants, warmup, steps, device)
    derive(out['timing'])
    if memory: out['memory'] = measure_memory(size, variants, device)
    out['machine']['load_average_end'] = machine_info(device)['load_average']
    out['seconds'] = time.time() - started
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', default='quickstart', choices=list(SIZES))
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--device', default='cpu')
    p.add_argument('--variants', nargs='*', default=None, choices=list(VARIANTS))
    p.add_argument('--no-memory', action='store_true', help='skip the per-variant peak-memory subprocesses')
    p.add_argument('--bf16-steps', type=int, default=0, help='also run the fp32-vs-bf16 loss deviation over N quickstart steps')
    p.add_argument('--out', default=None, help='write the JSON here too')
    p.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_worker:
        print(json.dumps(memory_worker(a.size, a.memory_worker, a.device))); return 0
    res = run_benchmark(a.size, a.warmup, a.steps, a.variants, a.device, memory=not a.no_memory)
    if a.bf16_steps: res['bf16_deviation'] = bf16_deviation(a.size if a.size != 'full' else 'quickstart', a.bf16_steps, a.device)
    text = json.dumps(res, indent=1, default=str)
    if a.out: Path(a.out).write_text(text)
    print(text)
    return 0

if __name__ == '__main__':
    sys.exit(main())
