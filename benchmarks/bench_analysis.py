"""Time the analysis of a 150k-step run's log (issue 5): parse + derive, and drawing all figures.

A synthetic upstream-format log is written first: the config line, then two lines (autoencoder pass and
discriminator pass) per logged step, every 100 steps of a 150,000-step run, with upstream's five-decimal
values and loss composition (disc_start 50,001, d_weight clamp 5,000, 256x256 maps). 3,000 lines = 1,500
logged steps, the size of a full upstream run's log. Budgets: parse + derive < 2 s, all figures < 30 s (wall-clock
medians; the process CPU times are reported too, since a shared machine's load inflates wall time).

    python benchmarks/bench_analysis.py                 # prints JSON, exit 1 if a budget is exceeded
    python benchmarks/bench_analysis.py --lines 3000 --repeats 3 --samples data/reference_run/samples
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARSE_DERIVE_BUDGET_S, FIGURES_BUDGET_S = 2.0, 30.0


def write_synthetic_log(path, lines: int = 3000, total_steps: int = 150_000, every: int = 100, seed: int = 0) -> Path:
    "An upstream-format log of `lines` record lines (two per logged step) after the config line."
    from radiodiff_vae.core import reference_run_dir
    from radiodiff_vae.logs import load_config_file
    config = load_config_file(reference_run_dir() / 'first_radio_m.yaml')
    config['trainer']['gradient_accumulate_every'] = 2   # the log below has discriminator lines, as such a run writes
    rng = np.random.default_rng(seed)
    n = lines // 2
    steps = total_steps - n * every + np.arange(n) * every
    t0 = 1755290000.0
    out = ['2025-08-15 20:00:00,000 ' + repr(config)]
    for i, s in enumerate(steps):
        t = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0 + 18.0 * i)) + ',000'
        rec = rng.uniform(0.005, 0.045); nll = rec * 65536; kl = rng.uniform(1.4e5, 1.8e5); g = rng.normal(-0.45, 0.05)
        fac = float(s >= 50001); dw = 5000.0 if rng.random() > 0.02 else rng.uniform(1000, 5000)
        total = nll + 1e-6 * kl + dw * fac * g
        out.append(f'{t} [Train Step] {s}/{total_steps}: train/total_loss: {total:.5f}, train/logvar: 0.00000, '
                   f'train/kl_loss: {kl:.5f}, train/nll_loss: {nll:.5f}, train/rec_loss: {rec:.5f}, train/d_weight: {dw:.5f}, '
                   f'train/disc_factor: {fac:.5f}, train/g_loss: {g:.5f}, lr: 0.00000, ')
        out.append(f'{t} [Train Step] {s}/{total_steps}: train/disc_loss: {fac * rng.uniform(0.9, 1.1):.5f}, '
                   f'train/logits_real: {rng.normal():.5f}, train/logits_fake: {rng.normal():.5f}, lr: 0.00000, ')
    path = Path(path); path.write_text('\n'.join(out) + '\n')
    return path


def measure_analysis(lines: int = 3000, repeats: int = 3, figures: bool = True, samples=None, smoothing: float = 0.9,
                     dpi: int = 110) -> dict:
    "Median wall time of read_run + analyze_run over `repeats`, and of drawing+saving all figures once per repeat."
    from radiodiff_vae.logs import read_run, find_samples
    from radiodiff_vae.run_analysis import RunData, analyze_run
    from radiodiff_vae.figures import save_figures
    from radiodiff_vae.core import machine_info
    import matplotlib; matplotlib.use('Agg')
    sample_paths = find_samples(samples) if samples else []
    with tempfile.TemporaryDirectory() as tmp:
        log = write_synthetic_log(Path(tmp) / '2025-08-15-20-00_.log', lines)
        n_lines = sum(1 for _ in open(log)) - 1
        parse, derive, figs, pd_cpu, fig_cpu = [], [], [], [], []
        for _ in range(repeats):
            c0 = time.process_time(); t0 = time.perf_counter(); df, info = read_run(log)
            t1 = time.perf_counter(); a, table = analyze_run(df, info, name='bench')
            t2 = time.perf_counter(); parse.append(t1 - t0); derive.append(t2 - t1); pd_cpu.append(time.process_time() - c0)
            if figures:
                c3 = time.process_time(); t3 = time.perf_counter()
                saved = save_figures([RunData('bench', table, a, sample_paths)], Path(tmp) / 'figs', smoothing, dpi=dpi)
                figs.append(time.perf_counter() - t3); fig_cpu.append(time.process_time() - c3)
    pd_total = [p + d for p, d in zip(parse, derive)]
    res = dict(record_lines=n_lines, logged_steps=len(df), skipped_lines=info['skipped_lines'], repeats=repeats,
               parse_s=statistics.median(parse), derive_s=statistics.median(derive), parse_derive_s=statistics.median(pd_total),
               parse_derive_max_s=max(pd_total), parse_derive_cpu_s=statistics.median(pd_cpu), parse_derive_budget_s=PARSE_DERIVE_BUDGET_S,
               figures=(sorted(saved) if figures else []), gallery_images=len(sample_paths),
               figures_s=statistics.median(figs) if figs else None, figures_max_s=max(figs) if figs else None,
               figures_cpu_s=statistics.median(fig_cpu) if fig_cpu else None,
               figures_budget_s=FIGURES_BUDGET_S, machine=machine_info())
    res['within_budget'] = bool(res['parse_derive_s'] < PARSE_DERIVE_BUDGET_S and (not figures or res['figures_s'] < FIGURES_BUDGET_S))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--lines', type=int, default=3000, help='record lines of the synthetic log (two per logged step)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--no-figures', action='store_true')
    ap.add_argument('--samples', default=str(REPO / 'data' / 'reference_run'), help="folder with sample-*.png for the gallery ('' for none)")
    args = ap.parse_args(argv)
    res = measure_analysis(args.lines, args.repeats, not args.no_figures, args.samples or None)
    print(json.dumps(res, indent=1))
    return 0 if res['within_budget'] else 1


if __name__ == '__main__':
    sys.exit(main())
