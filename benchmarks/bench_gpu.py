"""Whole-loop training throughput at full size on a GPU: eager vs compiled, fp32 vs bf16, several batch sizes, each
(variant, batch) in its own process. What a run is and how its rate is read: benchmarks/README.md.
"""
from __future__ import annotations
import argparse, json, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {   # name: (trainer.mixed_precision, trainer.compile (a torch.compile mode) or None for eager, other --set texts)
    'eager-fp32': ('no', None, []), 'eager-bf16': ('bf16', None, []),
    'compiled-fp32': ('no', 'default', []), 'compiled-bf16': ('bf16', 'default', []),
    'cudagraphs-bf16': ('bf16', 'reduce-overhead', []), 'cudagraphs-fp32': ('no', 'reduce-overhead', [])}
ORIGINAL_RUN_STEPS_PER_HOUR = 19606  # the original 150k-step run, batch 2, fp32, upstream's loop (reports/reference_run)


def run_one(variant: str, batch: int, warmup: int, steps: int, log_every: int, config: str = 'configs/radiodiff.yaml',
            size: int = 256, profile: int = 0, workers: int = 0) -> dict:
    "Train one variant in this process; its throughput and first logged losses."
    import torch
    from radiodiff_vae.config import load_config, FINISH_OFF
    from radiodiff_vae.trainer import Trainer
    precision, mode, extra = VARIANTS[variant]
    total = warmup + steps
    overrides = ['data.source=synthetic', f'data.size={size}', f'data.n_maps={max(batch, 8)}', 'data.val_maps=2',
                 f'data.batch_size={batch}', f'data.num_workers={workers}', 'model.lossconfig.disc_start=0',
                 'model.lossconfig.perceptual_weight=1.0', 'model.lossconfig.lpips_pretrained=false',
                 f'trainer.train_num_steps={total}', f'trainer.save_and_sample_every={10 * total}',
                 f'trainer.log_freq={log_every}', 'trainer.log_with=[]', f'trainer.mixed_precision={precision}',
                 f"trainer.compile={mode or 'null'}", 'trainer.warmup_steps=0', FINISH_OFF,  # one map size
                 *extra]
    cfg = load_config(ROOT / config, overrides)
    out = Path(tempfile.mkdtemp()) / 'run'
    t0 = time.time()
    trainer = Trainer(cfg, out_dir=out, progress=False)
    trainer.fit()
    recs = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    recs = [r for r in recs if 'train/total_loss' in r]
    timed = [r for r in recs if r['step'] >= warmup]
    a, b = timed[0], timed[-1]
    rate = (b['step'] - a['step']) / (b['wall_time'] - a['wall_time'])
    first = {k: v for k, v in recs[0].items() if k.startswith('train/')}
    return dict(variant=variant, batch=batch, data_workers=workers, steps_per_s=rate, steps_per_hour=rate * 3600, images_per_s=rate * batch,
                timed_steps=b['step'] - a['step'], wall_s=time.time() - t0, first_step=first,
                peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                profile=profile_steps(trainer, profile) if profile else None)


def profile_steps(trainer, steps: int) -> dict:
    "Where a warm step's time goes: wall, the host's own time (Python, launches) and the device's, per step; top operators."
    import torch
    from torch.profiler import profile, ProfilerActivity
    cuda = torch.cuda.is_available()
    trainer.t['train_num_steps'] += steps; trainer.t['log_freq'] = 10**9   # the run ended: a few more unlogged steps
    def step():
        trainer.train_step(); trainer.step += 1
        if cuda: torch.cuda.synchronize()
    step()                                                              # not profiled: the schedule's last value settles
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps): step()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    device = sum(getattr(e, 'self_device_time_total', 0) for e in events) / steps / 1e6
    host = sum(e.self_cpu_time_total for e in events) / steps / 1e6
    launches = sum(e.count for e in events if e.key in ('cudaLaunchKernel', 'cuLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernelEx')) / steps
    syncs = sum(e.count for e in events if 'Synchronize' in e.key) / steps
    top = lambda key: [dict(op=e.key[:60], ms_per_step=getattr(e, key) / steps / 1e3, calls_per_step=e.count / steps)
                       for e in sorted(events, key=lambda e: -getattr(e, key))[:15]]
    return dict(steps=steps, wall_s_per_step=wall, host_self_s_per_step=host, device_s_per_step=device,
                kernel_launches_per_step=launches, synchronizations_per_step=syncs,
                top_by_device=top('self_device_time_total') if cuda else [], top_by_host=top('self_cpu_time_total'))


def machine() -> dict:
    "What the benchmark ran on (the package's machine record, with the GPU where there is one)."
    import torch
    from radiodiff_vae.core import machine_info
    return machine_info('cuda' if torch.cuda.is_available() else 'cpu')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--variants', nargs='*', default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument('--batches', nargs='*', type=int, default=[2, 8, 32])
    ap.add_argument('--warmup', type=int, default=10, help='untimed steps (compilation happens here)')
    ap.add_argument('--steps', type=int, default=60, help='timed steps')
    ap.add_argument('--log-every', type=int, default=10)
    ap.add_argument('--timeout', type=float, default=300, help='seconds per variant')
    ap.add_argument('--config', default='configs/radiodiff.yaml', help='base config (a smaller one for a smoke test)')
    ap.add_argument('--size', type=int, default=256, help='map size')
    ap.add_argument('--workers', type=int, default=min(8, max(1, machine()['logical_cpus'] - 4)),
                    help='DataLoader workers generating the maps ahead of the steps (default: min(8, CPUs - 4))')
    ap.add_argument('--profile', type=int, default=0, help='after the timed steps, profile this many more (torch.profiler)')
    ap.add_argument('--out', type=Path, default=None)
    ap.add_argument('--append', action='store_true', help='add to the runs already in --out (one file for a session of several calls)')
    ap.add_argument('--one', nargs=2, metavar=('VARIANT', 'BATCH'), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print('RESULT ' + json.dumps(run_one(a.one[0], int(a.one[1]), a.warmup, a.steps, a.log_every, a.config, a.size, a.profile, a.workers)), flush=True)
        return 0
    results = dict(command='python benchmarks/bench_gpu.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
                   date_utc=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), machine=machine(),
                   original_run_steps_per_hour=ORIGINAL_RUN_STEPS_PER_HOUR, runs=[])
    if a.append and a.out and a.out.exists():
        before = json.loads(a.out.read_text())
        results.update(command=before['command'] + ' ; ' + results['command'], date_utc=before['date_utc'], runs=before['runs'])
    for batch in a.batches:
        for v in a.variants:
            cmd = [sys.executable, __file__, '--one', v, str(batch), '--warmup', str(a.warmup), '--steps', str(a.steps),
                   '--log-every', str(a.log_every), '--config', a.config, '--size', str(a.size), '--profile', str(a.profile),
                   '--workers', str(a.workers)]
            t0 = time.time()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
                line = next((l for l in p.stdout.splitlines() if l.startswith('RESULT ')), None)
                r = json.loads(line[7:]) if line else dict(variant=v, batch=batch, error=(p.stderr or p.stdout)[-1500:])
            except subprocess.TimeoutExpired:
                r = dict(variant=v, batch=batch, error=f'timed out after {a.timeout:.0f} s')
            r['process_s'] = time.time() - t0
            results['runs'].append(r)
            print(json.dumps({k: r.get(k) for k in ('variant', 'batch', 'steps_per_hour', 'images_per_s', 'process_s', 'error')}), flush=True)
            if a.out: a.out.parent.mkdir(parents=True, exist_ok=True); a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
