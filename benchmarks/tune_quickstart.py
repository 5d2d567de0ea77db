"""Tune the quickstart config (the model the main job trains) for held-out quality per minute on a 2-core CPU.

    python benchmarks/tune_quickstart.py time                  # per-step cost of each arm's step shape, fp32 vs bf16, interleaved
    python benchmarks/tune_quickstart.py search                # train every arm (seed 0), score it on held-out synthetic maps
    python benchmarks/tune_quickstart.py search --arms a,b --seeds 0,1
    python benchmarks/tune_quickstart.py guard --arm NAME      # the chosen arm, seeds 0-2, bf16 and fp32: PSNR on the real maps
    python benchmarks/tune_quickstart.py show                  # print the stored tables

Held-out discipline: every arm is scored on HELDOUT_N synthetic maps at 256x256 (default generator parameters, so
1 m per pixel like the real maps) drawn from map indices HELDOUT_OFFSET.. of stream 0, far past any training or
validation index. Settings are chosen on that score only; the 26 real maps are scored only by `guard`, for the
chosen arm. The score is the mean PSNR of the deterministic reconstruction (posterior mode), computed with the
package's own `map_metrics`, as `radiodiff-vae evaluate` reports it (`mode` PSNR).

Every run trains through the CLI in a child process (`python -m radiodiff_vae.cli train`), niced, with logs under
runs/tune/; results are merged into benchmarks/results/quickstart_tuning.json (a run already stored is skipped
unless --force).
"""
from __future__ import annotations
import argparse, datetime, json, math, os, platform, resource, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / 'results' / 'quickstart_tuning.json'
RUNS = REPO / 'runs' / 'tune'
CONFIG = REPO / 'configs' / 'quickstart.yaml'
HELDOUT_N, HELDOUT_OFFSET, HELDOUT_SIZE = 32, 100_000, 256

# Every arm sets every tuned key, so an arm means the same thing whatever configs/quickstart.yaml holds.
BASE = {
    'data.size': 64, 'data.crop': None, 'data.synthetic': {}, 'data.batch_size': 8, 'data.n_maps': 800, 'model.ddconfig.resolution': 64,
    'trainer.mixed_precision': 'no', 'trainer.train_num_steps': 600, 'trainer.lr': 1.0e-3, 'trainer.min_lr': 1.0e-5,
    'trainer.schedule': 'cosine', 'trainer.warmup_steps': 20, 'model.lossconfig.disc_start': 300,
    'trainer.ema_decay': 0.99, 'trainer.save_and_sample_every': 150,
    'model.ddconfig.num_res_blocks': 1,   # tuned from round 6 on
    'data.finish_size': None, 'data.finish_steps': 0,   # from round 7 on
    'trainer.finish_lr': None, 'data.finish_batch_size': None,   # from round 8 on
    'data.finish_crop': None,   # from round 9 on
}

# The quickstart after round 5. Its seeds 0-5 were not trained again: runs/tune/fp32_b2_1200_gan960-s<N> were links to the
# guard's fp32 runs (guard_bf16_b2_4mpx_1200_gan960_no-s<N>, the same settings), which `search` then scored
ROUND6_BASE = 'fp32_b2_1200_gan960'

def arm(steps, **changes) -> dict:
    "BASE with `changes` (keys with '__' for '.'): `steps` steps, GAN and checkpoints from half-way unless changed."
    return {**BASE, 'trainer.train_num_steps': steps, 'trainer.save_and_sample_every': steps // 2,
            'model.lossconfig.disc_start': steps // 2, **{k.replace('__', '.'): v for k, v in changes.items()}}

def finishing_arm(n: int, k: int, side: int, **changes) -> dict:
    "Batch 2 (warm-up 60) for `n` steps, then `k` finishing steps of one `side`x`side` map each; GAN from 30 steps before the phase."
    return arm(n + k, data__batch_size=2, trainer__warmup_steps=60, model__lossconfig__disc_start=n - 30,
               trainer__save_and_sample_every=(n + k) // 2, data__finish_size=side, data__finish_steps=k,
               data__finish_batch_size=1, **changes)

M64, M128 = {'extent_m': 64.0}, {'extent_m': 128.0}
ARMS = {
    # today's quickstart, and its cheap precision change
    'today_fp32_600': arm(600, trainer__save_and_sample_every=150),
    'today_bf16_600': arm(600, trainer__save_and_sample_every=150, trainer__mixed_precision='bf16'),
    # training resolution: 64x64 maps covering 256 m (4 m/px, today), 128 m (2 m/px) or 64 m (1 m/px = the real maps' scale)
    'bf16_b8_2mpx_400': arm(400, trainer__mixed_precision='bf16', data__synthetic=M128),
    'bf16_b8_1mpx_400': arm(400, trainer__mixed_precision='bf16', data__synthetic=M64),
    'bf16_b8_4mpx_400': arm(400, trainer__mixed_precision='bf16'),
    # 128x128 maps at 1 m/px (128 m), batch 2: same pixels per step as 64x64 batch 8
    'bf16_s128b2_1mpx_400': arm(400, trainer__mixed_precision='bf16', data__synthetic=M128, data__size=128,
                                model__ddconfig__resolution=128, data__batch_size=2),
    # batch size at equal pixels seen: batch 4 for twice the steps
    'bf16_b4_1mpx_800': arm(800, trainer__mixed_precision='bf16', data__synthetic=M64, data__batch_size=4),
    # learning-rate peak
    'bf16_b8_1mpx_400_lr2e-3': arm(400, trainer__mixed_precision='bf16', data__synthetic=M64, trainer__lr=2.0e-3),
    # GAN start: late (the last fifth) instead of half-way
    'bf16_b8_1mpx_400_gan320': arm(400, trainer__mixed_precision='bf16', data__synthetic=M64, model__lossconfig__disc_start=320),
    # round 2, after 1 m/px lost 6 dB to 4 m/px on the held-out maps: variations of the 4 m/px arm
    'bf16_b8_4mpx_400_lr2e-3': arm(400, trainer__mixed_precision='bf16', trainer__lr=2.0e-3),
    'bf16_b8_4mpx_400_gan320': arm(400, trainer__mixed_precision='bf16', model__lossconfig__disc_start=320),
    # round 3 (after the released model's run trained on windows of whole maps): random 64x64 windows of 256x256 maps of
    # 256 m, i.e. the real maps' 1 m/px scale *and* their far field, at today's step cost
    'bf16_b8_crop64_400_gan320': arm(400, trainer__mixed_precision='bf16', model__lossconfig__disc_start=320,
                                     data__size=256, data__crop=64, model__ddconfig__resolution=256),
    # round 4 (the crop arm tied the 4 m/px arm on the held-out maps): more, smaller updates at a similar cost. A batch of
    # 4 costs 0.16 s and one of 2 costs 0.10 s for the autoencoder's forward and backward, against 0.30 s for 8 (bf16, 2 threads)
    'bf16_b4_4mpx_760_gan608': arm(760, trainer__mixed_precision='bf16', data__batch_size=4, trainer__warmup_steps=38,
                                   model__lossconfig__disc_start=608),
    'bf16_b2_4mpx_1200_gan960': arm(1200, trainer__mixed_precision='bf16', data__batch_size=2, trainer__warmup_steps=60,
                                    model__lossconfig__disc_start=960),
    # round 5 (batch 2 beat batch 4 and 8): batch 1, and batch 2 at half and at twice the peak learning rate
    'bf16_b1_4mpx_1900_gan1520': arm(1900, trainer__mixed_precision='bf16', data__batch_size=1, trainer__warmup_steps=95,
                                     model__lossconfig__disc_start=1520),
    'bf16_b2_4mpx_1200_gan960_lr5e-4': arm(1200, trainer__mixed_precision='bf16', data__batch_size=2, trainer__warmup_steps=60,
                                           model__lossconfig__disc_start=960, trainer__lr=5.0e-4),
    'bf16_b2_4mpx_1200_gan960_lr2e-3': arm(1200, trainer__mixed_precision='bf16', data__batch_size=2, trainer__warmup_steps=60,
                                           model__lossconfig__disc_start=960, trainer__lr=2.0e-3),
    # round 6 (the quickstart after round 5: fp32, batch 2, 1,200 steps, GAN from 960), each over several seeds: its six seeds
    # spread 28.4-31.4 dB on the held-out maps, so one seed cannot settle a difference under about 2 dB
    **{f'fp32_b2_1200_{k}': arm(1200, **{'data__batch_size': 2, 'trainer__warmup_steps': 60, 'model__lossconfig__disc_start': 960, **v}) for k, v in {
        'gan960': {}, 'gan1080': dict(model__lossconfig__disc_start=1080),
        # warm-up, the peak rate held, a linear fall over the last 20% (the cosine spends half its steps below half the peak)
        'wsd': dict(trainer__schedule='wsd', trainer__decay_fraction=0.2),
        # what the GAN phase costs in PSNR: the discriminator never switched on
        'nogan': dict(model__lossconfig__disc_start=1200),
        # the training maps' scale. The six seeds of the round-5 choice end within 0.3 dB of each other on their own
        # 64x64 validation maps but 3 dB apart on the held-out 256x256 ones: what varies is how a model trained at 4 m/px
        # carries over to 1 m/px. Random 64x64 windows of 256x256 maps (1 m/px) or of 128x128 maps (2 m/px), same step cost
        'crop64': dict(data__size=256, data__crop=64, model__ddconfig__resolution=256),
        's128crop64': dict(data__size=128, data__crop=64, model__ddconfig__resolution=128),
        # both windowed arms lost 2-4 dB (seed 0), and rounds 1-2 found 4 m/px 3-6 dB above 2 and 1 m/px: so the other
        # way, 64x64 maps of 384 m (6 m/px) and of 512 m (8 m/px)
        'extent384': dict(data__synthetic={'extent_m': 384.0}), 'extent512': dict(data__synthetic={'extent_m': 512.0})}.items()},
    # 384 m lost 1.6 dB and 512 m 5.2 dB (seed 0): the whole 256 m of the held-out maps in view is what counts, so the same
    # 256 m at more pixels per map (96x96, batch 1), and batch 1 at 64x64, at about the same training time. Step costs (fp32,
    # 2 threads, GAN off/on; `time`): 64x64 batch 2 0.140/0.154 s, 96x96 batch 1 0.166/0.205 s, 64x64 batch 1 0.082/0.099 s
    'fp32_s96b1_1000_gan800': arm(1000, data__size=96, model__ddconfig__resolution=96, data__batch_size=1,
                                  trainer__warmup_steps=50, model__lossconfig__disc_start=800),
    'fp32_b1_1700_gan1360': arm(1700, data__batch_size=1, trainer__warmup_steps=85, model__lossconfig__disc_start=1360),
    # two residual blocks per level cost 1.3x per step (0.185/0.198 against 0.140/0.154 s): 950 steps for about the same time
    'fp32_b2_nrb2_950_gan760': arm(950, data__batch_size=2, trainer__warmup_steps=48, model__lossconfig__disc_start=760,
                                   model__ddconfig__num_res_blocks=2),
    # probe, not a candidate (the base's 1,200 steps plus 200 more): does a short last phase on 1 m/px windows help a model
    # trained at 4 m/px carry over to 1 m/px? The same 200 steps on the base's own 4 m/px maps are the control
    **{f'ft200_{k}_from_base': arm(200, _init_from=ROUND6_BASE, data__batch_size=2, trainer__lr=2.0e-4, trainer__warmup_steps=10,
                                   model__lossconfig__disc_start=200, **v)
       for k, v in {'1mpx': dict(data__size=256, data__crop=64, model__ddconfig__resolution=256), '4mpx': {}}.items()},
    # round 7. On the held-out maps half of the base's error at 1 m/px (seed 3: 51%, seed 1: 15%) is one brightness offset
    # per map, which the same models hardly make at their training scale (1% at 64x64, 4 m/px; 1-24% at 128x128, 2 m/px).
    # Probes (not candidates, more cost than the base): a short last phase on whole maps at a finer scale, from the base
    **{f'ft{n}_{k}_from_base': arm(n, _init_from=ROUND6_BASE, trainer__lr=2.0e-4, trainer__warmup_steps=5,
                                   model__lossconfig__disc_start=n, data__n_maps=400, **v)
       for n, k, v in [(100, 's128b2', dict(data__size=128, model__ddconfig__resolution=128, data__batch_size=2)),
                       (50, 's256b1', dict(data__size=256, model__ddconfig__resolution=256, data__batch_size=1))]},
    # both probes lifted seed 3 by 3.0-3.3 dB. Candidates: the base's training time, its last steps on the same maps at 128x128
    # (2 m/px) in the same run (`data.finish_size`), fewer 64x64 steps to pay for them. A 128x128 step costs 3.5x a 64x64 one
    # (0.55 against 0.157 s, GAN on; `time`), so 850 + 100 and 1,020 + 50 steps (950 and 1,070 in all) cost what the base's 1,200 do; the others 6-15% more
    **{f'fp32_b2_{n}_f128x{k}': arm(n, data__batch_size=2, trainer__warmup_steps=60, model__lossconfig__disc_start=int(0.8 * n),
                                    data__finish_size=128, data__finish_steps=k)
       for n, k in [(1100, 100), (1150, 50), (1000, 150), (950, 100), (1070, 50), (900, 150)]},
    # the cosine gives the finishing steps 1-7% of the peak rate; wsd (flat, then a linear fall over the last 20%) 1-75%
    **{f'fp32_b2_{n}_f128x{k}_wsd': arm(n, data__batch_size=2, trainer__warmup_steps=60, model__lossconfig__disc_start=int(0.8 * n),
                                        data__finish_size=128, data__finish_steps=k, trainer__schedule='wsd', trainer__decay_fraction=0.2)
       for n, k in [(1100, 100), (1000, 150), (950, 100)]},
    # round 8. The chosen arm's finishing steps get 1-9% of the peak rate from the cosine, while the probe that gained most
    # (ft100_s128b2_from_base) trained its 100 steps from a fresh 2e-4. The chosen arm with the rate restarted at the phase
    # (`trainer.finish_lr`: a new cosine from that peak down to min_lr over the phase): same steps, same cost
    **{f'fp32_b2_900_f128x150_flr{k}': arm(900, data__batch_size=2, trainer__warmup_steps=60, model__lossconfig__disc_start=720,
                                         data__finish_size=128, data__finish_steps=150, trainer__finish_lr=v)
       for k, v in [('1e-4', 1.0e-4), ('2e-4', 2.0e-4), ('4e-4', 4.0e-4)]},
    # the restart lost on every seed (2e-4: -0.18, -0.18, -1.18 dB; 4e-4: -0.45, -0.85), so the finishing phase wants a low
    # rate. Next, the same finishing time spent at a finer scale with one map per step (`data.finish_batch_size`): 150 steps
    # of 128x128 batch 2 cost 82 s; the step costs below (`time`, timing-only arms) size the phases at about that cost
    **{f'time_s{s}b{b}': arm(100, data__size=s, model__ddconfig__resolution=s, data__batch_size=b) for s, b in [(128, 1), (192, 1), (256, 1)]},
    # GAN on: 128x128 batch 1 0.36 s, batch 2 0.55 s, 192x192 batch 1 0.76 s, 256x256 batch 1 1.48 s. So the chosen arm's 750
    # steps at 64x64, then 82 s of finishing: 226 steps at 128x128, 108 at 192x192 (1.33 m/px) or 55 at 256x256 (1 m/px,
    # the real maps' scale), one map per step. GAN from step 720 as in the chosen arm
    **{f'fp32_b2_{750 + k}_f{s}b1x{k}': finishing_arm(750, k, s) for s, k in [(128, 226), (192, 108), (256, 55)]},
    # round 9. With the 192x192 finishing phase (1.33 m/px) a brightness offset per map still makes 17-33% of the error at
    # 256x256 (1 m/px, the real maps' scale): the phase fixes the offset at the scale it shows. So the same phase on random
    # windows of the 256x256 maps (`data.finish_crop`): the real maps' 1 m pixels, and most of a map in view (a 192x192
    # window covers 56% of it; round 6's 64x64 windows, 6%, lost the far field). Same step cost as the 192x192 arm; and
    # 160x160 windows (39% of a map) for more steps at the same finishing time
    **{f'fp32_b2_{750 + k}_f256c{c}b1x{k}': finishing_arm(750, k, 256, data__finish_crop=c) for c, k in [(192, 108), (160, 163)]},   # 160x160 at batch 1: 0.46 s per step against 0.695 s at 192x192 (`time`, idle)
    'time_s160b1': arm(100, data__size=160, model__ddconfig__resolution=160, data__batch_size=1),
    # the quality guard again, on today's quickstart: its seeds spread half as much on the real maps as round 5's (sd 0.27
    # against 0.53 dB), so a new bf16 check is sharper than the one that kept the quickstart in fp32. The fp32 side is the
    # chosen arm's own runs (seeds 0-5, scored on the real maps after round 8's choice)
    'time_s192b1_bf16': arm(100, data__size=192, model__ddconfig__resolution=192, data__batch_size=1, trainer__mixed_precision='bf16'),
    'bf16_b2_858_f192b1x108': finishing_arm(750, 108, 192, trainer__mixed_precision='bf16'),
    # bf16 passed that check (real maps, six seeds: -0.15 dB [-0.64, +0.35] paired, within the 0.3 dB allowed), so `auto`
    # may train the quickstart in bf16 where the CPU has it. bf16 steps (`time`, 2 threads, idle): 64x64 batch 2 0.125/0.121 s,
    # 192x192 batch 1 0.481/0.511 s (GAN off/on), against fp32's 0.142/0.163 and 0.649/0.737 s, so the shipped steps cost
    # 149 s of stepping in bf16 against 190 s in fp32 (`show`). Round 9 spends the freed time (about 190 s in all, as in fp32): more
    # steps at 64x64, more at 192x192, or both. GAN from 30 steps before the phase, as in the shipped config
    **{f'bf16_b2_{n + k}_f192b1x{k}': finishing_arm(n, k, 192, trainer__mixed_precision='bf16')
       for n, k in [(1080, 108), (750, 190), (900, 150)]},
    # the choice (1,080 + 108 steps) in fp32: what `auto` runs on a CPU without native bf16 (scored after the choice)
    'fp32_b2_1188_f192b1x108': finishing_arm(1080, 108, 192),
    # timed only (`time`): the round-6 base with torch.compile of the autoencoder and discriminator steps
    'fp32_b2_1200_compiled': arm(1200, data__batch_size=2, trainer__warmup_steps=60, model__lossconfig__disc_start=960,
                                 trainer__compile=True),
}
CHOSEN = 'bf16_b2_4mpx_1200_gan960'   # best held-out synthetic PSNR per training minute (rounds 4-5); the guard trains it in bf16 and fp32

# ---------------------------------------------------------------------------------------------------------------- utils

def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def cpu_flags() -> list[str]:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                return sorted(set(line.split(':', 1)[1].split()) & {'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'})
    except OSError: pass
    return []

def machine() -> dict:
    import torch
    return dict(cpu=cpu_model(), logical_cpus=os.cpu_count(), isa=cpu_flags(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), python=platform.python_version())

def now() -> str: return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')

def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}

def update_results(path: list[str], value):
    "Set r[path[0]]...[path[-1]] = value in the stored results, under a lock (several searches may run at once)."
    import fcntl
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix('.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = load_results(); node = r
        for k in path[:-1]: node = node.setdefault(k, {})
        node[path[-1]] = value
        r['machine'], r['updated_utc'] = machine(), now()
        tmp = RESULTS.with_suffix(f'.{os.getpid()}.tmp'); tmp.write_text(json.dumps(r, indent=1, default=str)); os.replace(tmp, RESULTS)
        return r

def overrides(a: dict) -> list[str]:
    "`--set` arguments for arm `a` (values as YAML flow text); keys starting with '_' are the script's, not the config's."
    out = []
    for k, v in a.items():
        if k.startswith('_'): continue
        text = json.dumps(v) if isinstance(v, (dict, list)) or v is None else (f"'{v}'" if isinstance(v, str) else repr(v))
        out += ['--set', f'{k}={text}']
    return out

def t_interval(values, confidence=0.95) -> dict:
    "Mean and Student-t interval of `values`."
    from scipy import stats
    n = len(values); mean = sum(values) / n
    if n < 2: return dict(n=n, mean=mean, ci_low=None, ci_high=None, std=None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci_low=mean - half, ci_high=mean + half)

def welch(a, b, confidence=0.95) -> dict:
    "Difference of means a - b with a Welch t interval."
    from scipy import stats
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1); vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = math.sqrt(va / len(a) + vb / len(b))
    df = se ** 4 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)) if se > 0 else 1
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return dict(diff=ma - mb, ci_low=ma - mb - half, ci_high=ma - mb + half, df=df)

# ---------------------------------------------------------------------------------------------------------- evaluation

def heldout_synthetic():
    "The held-out synthetic maps: HELDOUT_N maps of stream 0 from index HELDOUT_OFFSET, 256x256, default parameters."
    from radiodiff_vae.synthetic import SyntheticRadioMaps
    return SyntheticRadioMaps(HELDOUT_N, seed=0, size=HELDOUT_SIZE, offset=HELDOUT_OFFSET)

def real_maps():
    from radiodiff_vae.core import real_maps_dir
    from radiodiff_vae.data import MapFolder
    return MapFolder(real_maps_dir() / 'gain' / 'DPM', size=None, recursive=False)

def reconstructions(model, x, batch_size=4):
    "Posterior-mode reconstructions of the maps `x` (N x 1 x H x W in [-1, 1]), `batch_size` maps at a time."
    import torch
    from radiodiff_vae.model import reconstruct
    return torch.cat([reconstruct(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

def score(checkpoint: Path, dataset, batch_size=4) -> dict:
    "Mean posterior-mode PSNR (dB) of the raw and EMA weights of `checkpoint` on every map of `dataset` (fp32)."
    import torch
    from radiodiff_vae.evaluation import read_checkpoint, build_model, map_metrics
    from radiodiff_vae.data import unscale_gain
    ckpt, cfg, _ = read_checkpoint(checkpoint)
    x = torch.stack([dataset[i]['image'] for i in range(len(dataset))]).float()
    out = {}
    t0 = time.perf_counter()
    for which in ('raw', 'ema'):
        x_hat = reconstructions(build_model(ckpt, cfg, which, checkpoint), x, batch_size)
        psnr = map_metrics(unscale_gain(x_hat), unscale_gain(x))['psnr'].tolist()
        out[which] = dict(psnr=sum(psnr) / len(psnr), per_map=psnr)
    out['eval_s'] = time.perf_counter() - t0
    return out

def offset_share(checkpoint: Path, sizes=(64, 128, 256), batch_size=4) -> dict:
    "Per side: EMA PSNR on the held-out maps drawn at that side (same 256 m), and the share of the squared error that is one offset per map."
    import torch
    from radiodiff_vae.evaluation import read_checkpoint, build_model, map_metrics
    from radiodiff_vae.data import unscale_gain
    from radiodiff_vae.synthetic import SyntheticRadioMaps
    ckpt, cfg, _ = read_checkpoint(checkpoint)
    model, out = build_model(ckpt, cfg, 'ema', checkpoint), {}
    for size in sizes:
        ds = SyntheticRadioMaps(HELDOUT_N, seed=0, size=size, offset=HELDOUT_OFFSET)
        x = torch.stack([ds[i]['image'] for i in range(len(ds))]).float()
        target, x_hat = unscale_gain(x), unscale_gain(reconstructions(model, x, batch_size))   # in [0, 1], as scored
        err = x_hat - target
        out[str(size)] = dict(psnr=float(map_metrics(x_hat, target)['psnr'].mean()),
                              offset_share=float(err.mean((1, 2, 3)).pow(2).sum() / err.pow(2).mean((1, 2, 3)).sum()))
    return out

# ------------------------------------------------------------------------------------------------------------ training

def read_metrics(run: Path) -> dict:
    "Step rate of the run from its metrics records (median over logged intervals, excluding the first), and held-out val."
    recs = []
    for name in ('metrics.jsonl',):
        for p in run.rglob(name):
            recs += [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    rates = sorted(r['steps_per_s'] for r in recs if isinstance(r.get('steps_per_s'), (int, float)) and r['steps_per_s'] == r['steps_per_s'])
    val = [r for r in recs if any(k.startswith('val/') for k in r)]
    return dict(median_steps_per_s=rates[len(rates) // 2] if rates else None, last_val=val[-1] if val else None)

def train(name: str, a: dict, seed: int, force=False, threads=None) -> Path:
    "Train arm `a` with `seed` into runs/tune/<name>-s<seed> (through the CLI); returns the run folder."
    out = RUNS / f'{name}-s{seed}'
    if out.exists() and not force and any(out.glob('model-*.pt')) and (out / 'tune_train.json').exists(): return out
    if out.exists():
        import shutil; shutil.rmtree(out)
    RUNS.mkdir(parents=True, exist_ok=True)
    if a.get('_init_from'):   # a fine-tuning arm: starts from the EMA weights of the same seed's run of another arm
        a = {**a, 'model.ckpt_path': str(final_checkpoint(RUNS / f"{a['_init_from']}-s{seed}")), 'model.ckpt_weights': 'ema'}
    cmd = [sys.executable, '-m', 'radiodiff_vae.cli', 'train', '--config', str(CONFIG), '--out', str(out), '--seed', str(seed),
           '--no-progress', *overrides(a), '--set', 'trainer.tensorboard=false']
    if threads: cmd += ['--set', f'trainer.num_threads={threads}']
    env = {**os.environ, 'PYTHONPATH': str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    load0, t0, c0 = os.getloadavg(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(RUNS / f'{name}-s{seed}.log', 'w') as log:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode: raise RuntimeError(f'training {name} seed {seed} failed (exit {p.returncode}); see {RUNS / f"{name}-s{seed}.log"}')
    info = dict(command=' '.join(cmd), wall_s=wall, cpu_s=(c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
                load_start=load0, load_end=os.getloadavg(), date_utc=now(), **read_metrics(out))
    (out / 'tune_train.json').write_text(json.dumps(info, indent=1, default=str))
    return out

def final_checkpoint(run: Path) -> Path:
    from radiodiff_vae.trainer import list_checkpoints
    return list_checkpoints(run)[-1][1]

def run_arm(name: str, a: dict, seed: int, dataset, force=False, threads=None) -> dict:
    run = train(name, a, seed, force, threads)
    info = json.loads((run / 'tune_train.json').read_text())
    s = score(final_checkpoint(run), dataset)
    return dict(info, psnr_raw=s['raw']['psnr'], psnr_ema=s['ema']['psnr'], eval_s=s['eval_s'],
                per_map_ema=s['ema']['per_map'], per_map_raw=s['raw']['per_map'], run=str(run.relative_to(REPO)))

# ------------------------------------------------------------------------------------------------------------- timing

def step_cost(a: dict, steps=6, gan=True) -> dict:
    "Wall and CPU seconds per optimizer step of arm `a`'s step shape (data in memory, no checkpoints), GAN on or off."
    import tempfile
    from radiodiff_vae.config import resolve_config, read_yaml, apply_overrides, FINISH_OFF
    from radiodiff_vae.trainer import Trainer
    from radiodiff_vae.synthetic import SyntheticRadioMaps
    raw = read_yaml(CONFIG)
    sets = overrides(a)[1::2]   # the same `key=value` texts as the training runs' --set arguments
    sets += [f"model.lossconfig.disc_start={0 if gan else a['trainer.train_num_steps']}", 'trainer.tensorboard=false',
             *FINISH_OFF.split(), 'trainer.finish_lr=null',   # the main phase's shape; a finishing side is timed as its own arm
             'trainer.save_and_sample_every=100000', 'trainer.log_freq=100000']
    cfg = resolve_config(raw, sets)
    bs, size = cfg['data']['batch_size'], cfg['data']['size']
    ds = SyntheticRadioMaps(2 * bs, seed=0, size=size, **cfg['data']['synthetic'])
    ds = [ds[i] for i in range(len(ds))]
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, out_dir=Path(d) / 'run', progress=False, dataset=ds)
        try:
            for _ in range(2): tr.train_step(); tr.step += 1
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps): tr.train_step(); tr.step += 1
            return dict(wall=(time.perf_counter() - w0) / steps, cpu=(time.process_time() - c0) / steps)
        finally:
            tr.logs.close(); tr.lock.release()

def cmd_time(args):
    names = args.arms.split(',') if args.arms else list(dict.fromkeys(
        ['today_fp32_600', 'today_bf16_600', 'bf16_b4_1mpx_800', 'bf16_s128b2_1mpx_400']))
    for rnd in range(args.rounds):
        for n in names:
            for gan in (False, True):
                load = os.getloadavg()
                c = step_cost(ARMS[n], args.steps, gan)
                phase = 'gan_on' if gan else 'gan_off'
                rec = load_results().get('timing', {}).get(n, {}).get(phase, [])
                rec.append(dict(c, load_before=load, load_after=os.getloadavg(), date_utc=now(), steps=args.steps,
                                threads=__import__('torch').get_num_threads()))
                update_results(['timing', n, phase], rec)
                print(f'{n:28s} gan {"on " if gan else "off"} wall {c["wall"]:.3f} s/step cpu {c["cpu"]:.3f} s/step '
                      f'load {load[0]:.2f}', flush=True)

# ------------------------------------------------------------------------------------------------------- search, guard

def cmd_search(args):
    update_results(['heldout'], dict(kind='synthetic', n=HELDOUT_N, seed=0, offset=HELDOUT_OFFSET, size=HELDOUT_SIZE,
                                     params='generator defaults (256 m across: 1 m per pixel)'))
    ds = heldout_synthetic(); ds = [ds[i] for i in range(len(ds))]
    names = args.arms.split(',') if args.arms else list(ARMS)
    for n in names:
        for seed in [int(s) for s in args.seeds.split(',')]:
            if str(seed) in load_results().get('search', {}).get(n, {}).get('runs', {}) and not args.force: continue
            print(f'[search] {n} seed {seed} start {now()} load {os.getloadavg()[0]:.2f}', flush=True)
            res = run_arm(n, ARMS[n], seed, ds, args.force, args.threads)
            update_results(['search', n, 'overrides'], ARMS[n]); update_results(['search', n, 'runs', str(seed)], res)
            print(f'[search] {n} seed {seed}: held-out synthetic PSNR raw {res["psnr_raw"]:.2f} ema {res["psnr_ema"]:.2f} dB; '
                  f'train {res["wall_s"]:.0f} s wall, load {res["load_start"][0]:.1f}-{res["load_end"][0]:.1f}', flush=True)

def cmd_guard(args):
    a = ARMS[args.arm]
    real = real_maps(); real = [real[i] for i in range(len(real))]
    syn = heldout_synthetic(); syn = [syn[i] for i in range(len(syn))]
    update_results(['guard', 'arm'], args.arm); update_results(['guard', 'overrides'], a)
    seeds = [int(s) for s in args.seeds.split(',')]
    for seed in seeds:
        for prec in args.precisions.split(','):
            key = f'{prec}-s{seed}'
            if key in load_results().get('guard', {}).get('runs', {}) and not args.force: continue
            name = f'guard_{args.arm}_{prec}'
            print(f'[guard] {key} start {now()} load {os.getloadavg()[0]:.2f}', flush=True)
            run = train(name, {**a, 'trainer.mixed_precision': prec}, seed, args.force, args.threads)
            info = json.loads((run / 'tune_train.json').read_text())
            ck = final_checkpoint(run)
            s_real = score(ck, real)
            s_syn = score(ck, syn) if seed in args.synthetic_seeds else {w: dict(psnr=None) for w in ('raw', 'ema')}
            update_results(['guard', 'runs', key], dict(info, precision=prec, seed=seed, real_raw=s_real['raw']['psnr'], real_ema=s_real['ema']['psnr'],
                             syn_raw=s_syn['raw']['psnr'], syn_ema=s_syn['ema']['psnr'], real_eval_s=s_real['eval_s'],
                             real_per_map_ema=s_real['ema']['per_map'], run=str(run.relative_to(REPO))))
            print(f'[guard] {key}: real PSNR raw {s_real["raw"]["psnr"]:.2f} ema {s_real["ema"]["psnr"]:.2f}; '
                  f'held-out synthetic raw {s_syn["raw"]["psnr"]} ema {s_syn["ema"]["psnr"]} dB', flush=True)
    g = load_results()['guard']; summarize_guard(g); update_results(['guard', 'summary'], g['summary'])
    print(json.dumps(g['summary'], indent=1))

def cmd_real(args):
    "Score the chosen arm's search runs on the 26 real maps: run once, after the choice (the real maps never choose)."
    real = real_maps(); real = [real[i] for i in range(len(real))]
    for seed in [int(v) for v in args.seeds.split(',')]:
        s = score(final_checkpoint(RUNS / f'{args.arm}-s{seed}'), real)
        update_results(['real', args.arm, str(seed)], dict(raw=s['raw']['psnr'], ema=s['ema']['psnr'], per_map_ema=s['ema']['per_map'],
                                                            date_utc=now()))
        print(f"[real] {args.arm} seed {seed}: real-map PSNR raw {s['raw']['psnr']:.2f} ema {s['ema']['psnr']:.2f} dB", flush=True)
    runs = load_results()['real'][args.arm]
    t = t_interval([v['ema'] for v in runs.values()])
    ci = f" [{t['ci_low']:.2f}, {t['ci_high']:.2f}]" if t['n'] > 1 else ''
    print(f"[real] {args.arm}: EMA mean {t['mean']:.2f} dB{ci} over {t['n']} seed(s)")

def cmd_summarize(args):
    "Recompute the guard summary from the stored runs."
    g = load_results()['guard']; summarize_guard(g); update_results(['guard', 'summary'], g['summary'])
    print(json.dumps(g['summary'], indent=1))

def summarize_guard(g: dict):
    """Per weights: mean real-map PSNR over seeds per precision (95% t interval), bf16 - fp32 as a Welch interval and,
    since a seed fixes the initial weights and the data order in both precisions, as a paired interval over seeds."""
    out, runs = {}, g['runs']
    for w in ('ema', 'raw'):
        vals = {p: [v[f'real_{w}'] for v in runs.values() if v['precision'] == p] for p in ('bf16', 'no')}
        if min(len(v) for v in vals.values()) < 2: continue
        seeds = sorted({v['seed'] for v in runs.values()})
        paired = [runs[f'bf16-s{s}'][f'real_{w}'] - runs[f'no-s{s}'][f'real_{w}'] for s in seeds
                  if f'bf16-s{s}' in runs and f'no-s{s}' in runs]
        out[w] = dict(bf16=t_interval(vals['bf16']), fp32=t_interval(vals['no']), bf16_minus_fp32=welch(vals['bf16'], vals['no']),
                      paired_bf16_minus_fp32=dict(t_interval(paired), per_seed=paired))
        out[w]['within_0.3dB'] = abs(out[w]['bf16_minus_fp32']['diff']) <= 0.3
    g['summary'] = out

def shape(a: dict) -> tuple:
    "What a step costs depends on: map side, batch, precision, depth, compilation (not on the metres a map covers)."
    return (a['data.size'], a['data.batch_size'], a['trainer.mixed_precision'], a.get('model.ddconfig.num_res_blocks', 1),
            a.get('trainer.compile', False))

def shape_costs(r: dict, want: tuple) -> dict:
    "Median wall s/step per phase (GAN off, on) over the stored timings of every arm of step shape `want` (None if untimed)."
    out = {}
    for phase in ('gan_off', 'gan_on'):
        w = sorted(x['wall'] for n, t in r.get('timing', {}).items() if n in ARMS and shape(ARMS[n]) == want
                   for x in t.get(phase, []))
        out[phase] = w[len(w) // 2] if w else None
    return out

def arm_settings(r: dict, name: str) -> dict:
    "Arm `name`'s settings: as defined here, updated with those its stored runs were trained with."
    return {**ARMS.get(name, {}), **r.get('search', {}).get(name, {}).get('overrides', {})}

def step_costs(r: dict, name: str) -> dict:
    "Median wall s/step per phase of arm `name`'s step shape (its main phase: a finishing phase has its own shape)."
    return shape_costs(r, shape(arm_settings(r, name)))

def stepping_seconds(r: dict, a: dict) -> float | None:
    "Estimated seconds of arm `a`'s optimizer steps on 2 idle threads: each step at its shape's and GAN phase's median cost."
    T, gan_from, k, side = (a['trainer.train_num_steps'], a['model.lossconfig.disc_start'], a.get('data.finish_steps') or 0,
                            a.get('data.finish_size'))
    fin_shape = {**a, 'data.size': a.get('data.finish_crop') or side, 'data.batch_size': a.get('data.finish_batch_size') or a['data.batch_size']}
    main, fin = shape_costs(r, shape(a)), shape_costs(r, shape(fin_shape)) if side else {}
    total = 0.0
    for step_range, c in ((range(0, T - k), main), (range(T - k, T), fin)):
        n_on = sum(1 for i in step_range if i >= gan_from); n_off = len(step_range) - n_on
        if (n_off and c.get('gan_off') is None) or (n_on and c.get('gan_on') is None): return None
        total += n_off * (c.get('gan_off') or 0) + n_on * (c.get('gan_on') or 0)
    return total

def describe(a: dict) -> str:
    "Short text of an arm's settings."
    px = a['data.size']; m = a['data.synthetic'].get('extent_m', 256.0)
    return (f"{px}x{px} maps of {m:g} m ({m / px:g} m/px), batch {a['data.batch_size']}, {a['trainer.train_num_steps']} steps, "
            f"lr {a['trainer.lr']:g}, GAN from {a['model.lossconfig.disc_start']}, {a['trainer.mixed_precision']}"
            + (f", the last {a['data.finish_steps']} on the same maps at {a['data.finish_size']}x{a['data.finish_size']}"
               if a.get('data.finish_size') else ''))

def cmd_show(args):
    r = load_results()
    rows = []
    for n, s in r.get('search', {}).items():
        for seed, v in sorted(s['runs'].items()):
            c, est = step_costs(r, n), stepping_seconds(r, s['overrides'])
            rows.append([n, describe(s['overrides']), seed, f"{v['psnr_raw']:.2f}", f"{v['psnr_ema']:.2f}",
                         '' if c['gan_off'] is None else f"{c['gan_off']:.2f} / {c['gan_on']:.2f}", '' if est is None else f'{est:.0f}',
                         f"{v['wall_s']:.0f}", f"{v['load_start'][0]:.1f}-{v['load_end'][0]:.1f}"])
    head = ['arm', 'settings', 'seed', 'held-out syn PSNR raw', 'EMA', 's/step GAN off / on (2 threads)', 'stepping s (2 threads, est.)',
            'train wall s (shared)', 'load']
    print('| ' + ' | '.join(head) + ' |\n|' + '---|' * len(head))
    for row in rows: print('| ' + ' | '.join(str(x) for x in row) + ' |')
    print()
    for n, s in r.get('search', {}).items():   # seed-to-seed spread is about 1 dB (round 6): compare arms over seeds
        ema = [v['psnr_ema'] for v in s['runs'].values()]
        if len(ema) > 1:
            t = t_interval(ema); print(f"{n}: EMA mean {t['mean']:.2f} dB [{t['ci_low']:.2f}, {t['ci_high']:.2f}] over {t['n']} seeds")
            base = r['search'].get(ROUND6_BASE, {}).get('runs', {})
            common = sorted(set(s['runs']) & set(base), key=int)
            if n != ROUND6_BASE and len(common) > 1:
                d = t_interval([s['runs'][k]['psnr_ema'] - base[k]['psnr_ema'] for k in common])
                print(f"    paired against {ROUND6_BASE} (seeds {','.join(common)}): {d['mean']:+.2f} dB [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]")
    print()
    for n in r.get('timing', {}):
        c = step_costs(r, n); print(f"timing {n}: GAN off {c['gan_off']}, GAN on {c['gan_on']} s/step")
    for k, v in sorted(r.get('guard', {}).get('runs', {}).items()):
        print(f"guard {k}: real raw {v['real_raw']:.2f} ema {v['real_ema']:.2f}; held-out syn raw {v['syn_raw']} ema {v['syn_ema']}")
    if r.get('guard', {}).get('summary'): print(json.dumps(r['guard']['summary'], indent=1))

def compare(r: dict, a: str, b: str) -> dict:
    "Arm `a` against arm `b` on the seeds both have, EMA weights: means, Welch and paired 95% intervals, held-out and real."
    out = {}
    for where, runs in (('heldout_synthetic', lambda n: {k: v['psnr_ema'] for k, v in r.get('search', {}).get(n, {}).get('runs', {}).items()}),
                        ('real', lambda n: {k: v['ema'] for k, v in r.get('real', {}).get(n, {}).items()})):
        x, y = runs(a), runs(b)
        common = sorted(set(x) & set(y), key=int)
        if len(common) < 2: continue
        out[where] = dict(seeds=[int(k) for k in common], a=t_interval([x[k] for k in common]), b=t_interval([y[k] for k in common]),
                          welch=welch([x[k] for k in common], [y[k] for k in common]),
                          paired=t_interval([x[k] - y[k] for k in common]), per_seed={k: round(x[k] - y[k], 3) for k in common})
    return out

def cmd_pair(args):
    "Print (and store under `pairs`) arm --a against arm --b over their common seeds."
    c = compare(load_results(), args.a, args.b)
    update_results(['pairs', f'{args.a}_vs_{args.b}'], c)
    for where, v in c.items():
        print(f"{where} (seeds {','.join(map(str, v['seeds']))}): {args.a} {v['a']['mean']:.2f} [{v['a']['ci_low']:.2f}, {v['a']['ci_high']:.2f}], "
              f"{args.b} {v['b']['mean']:.2f} [{v['b']['ci_low']:.2f}, {v['b']['ci_high']:.2f}]; paired {v['paired']['mean']:+.2f} "
              f"[{v['paired']['ci_low']:+.2f}, {v['paired']['ci_high']:+.2f}], per seed {v['per_seed']}")

def cmd_offset(args):
    "How much of each run's held-out error is one brightness offset per map, with the maps drawn at 64, 128 and 256 px."
    for n in args.arms.split(','):
        for seed in [int(v) for v in args.seeds.split(',')]:
            res = offset_share(final_checkpoint(RUNS / f'{n}-s{seed}'))
            update_results(['offset', n, str(seed)], res)
            print(f'[offset] {n} seed {seed}: ' + ', '.join(f"{k}px {v['psnr']:.2f} dB, offset {100 * v['offset_share']:.0f}%"
                                                        for k, v in res.items()), flush=True)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    t = sub.add_parser('time'); t.add_argument('--arms'); t.add_argument('--steps', type=int, default=6); t.add_argument('--rounds', type=int, default=1)
    s = sub.add_parser('search'); s.add_argument('--arms'); s.add_argument('--seeds', default='0'); s.add_argument('--force', action='store_true')
    s.add_argument('--threads', type=int, help='trainer.num_threads of the runs (1 suits a busy machine: two searches side by side)')
    g = sub.add_parser('guard'); g.add_argument('--arm', required=True); g.add_argument('--seeds', default='0,1,2'); g.add_argument('--force', action='store_true')
    g.add_argument('--threads', type=int, help='trainer.num_threads of the runs')
    g.add_argument('--synthetic-seeds', type=lambda t: [int(x) for x in t.split(',') if x], default=[0],
                   help='seeds whose runs are also scored on the held-out synthetic maps (default 0)')
    g.add_argument('--precisions', default='bf16,no', help='which precisions to train')
    rl = sub.add_parser('real'); rl.add_argument('--arm', required=True); rl.add_argument('--seeds', default='0,1,2')
    o = sub.add_parser('offset'); o.add_argument('--arms', required=True); o.add_argument('--seeds', default='0')
    pr = sub.add_parser('pair'); pr.add_argument('--a', required=True); pr.add_argument('--b', required=True)
    sub.add_parser('show'); sub.add_parser('summarize')
    p.add_argument('--nice', type=int, default=15, help='niceness of this process and its training children')
    args = p.parse_args(argv)
    if args.nice: os.nice(args.nice)
    if getattr(args, 'threads', None):
        import torch; torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    dict(time=cmd_time, search=cmd_search, offset=cmd_offset, real=cmd_real, guard=cmd_guard, pair=cmd_pair, show=cmd_show, summarize=cmd_summarize)[args.cmd](args)

if __name__ == '__main__':
    main()
