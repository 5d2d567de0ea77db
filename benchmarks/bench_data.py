"""Data throughput (issue 3): synthetic map generation, PNG loading and on-the-fly synthesis through a DataLoader, in maps
per second. What each figure is: benchmarks/README.md.
"""
from __future__ import annotations
import argparse, json, sys, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def _epoch_rate(dataset, workers: int, batch_size: int) -> float:
    "Maps per second (wall clock) of a full pass of `dataset` through a DataLoader with `workers` workers, once they run."
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0)
    for epoch in range(2 if workers > 0 else 1):          # with workers: the first pass starts them, the second is timed
        t0, n = time.perf_counter(), 0
        for batch in loader: n += batch['image'].shape[0]
    return n / (time.perf_counter() - t0)


def measure_data_throughput(n_generate: int = 100, size: int = 256, n_load: int = 200, workers=(0, 1, 2),
                            batch_size: int = 8, folder=None, seed: int = 0, synthetic_loader: bool = True) -> dict:
    "Maps/s of synthetic generation (one core), PNG loading and on-the-fly synthesis through DataLoaders; a JSON-able dict."
    from radiodiff_vae.core import machine_info
    from radiodiff_vae.data import MapFolder, RadioMapSeer
    from radiodiff_vae.synthetic import SyntheticRadioMaps, generate_radio_map, write_radiomapseer_layout
    torch.set_num_threads(1)
    generate_radio_map(seed, 10**6, size)                                    # build the cached geometry first
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n_generate): generate_radio_map(seed, i, size)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    result = dict(size=size, batch_size=batch_size, machine=machine_info(),
                  generate=dict(n=n_generate, maps_per_s_cpu=n_generate / cpu, maps_per_s_wall=n_generate / wall))
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            root = write_radiomapseer_layout(Path(tmp) / 'layout', n_load, seed=seed, size=size, progress=False)
            dataset, source = RadioMapSeer(root, maps=range(1, n_load + 1), num_tx=1, size=size), 'make-data layout'
        else:
            dataset, source = MapFolder(folder, size=size), str(folder)
        _epoch_rate(dataset, 0, batch_size)                                  # warm the file cache
        result['load_png'] = dict(source=source, n=len(dataset),
                                  maps_per_s={w: _epoch_rate(dataset, w, batch_size) for w in workers})
    if synthetic_loader:
        ds = SyntheticRadioMaps(n_load, seed=seed, size=size)
        result['synthetic_loader'] = dict(n=len(ds), maps_per_s={w: _epoch_rate(ds, w, batch_size) for w in workers})
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n-generate', type=int, default=100, help='maps generated for the generation rate')
    p.add_argument('--size', type=int, default=256, help='map side in pixels')
    p.add_argument('--n-load', type=int, default=200, help='maps in the folder that is loaded (and in the synthetic loader)')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2], help='DataLoader num_workers values to time')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--folder', default=None, help='load this folder of map PNGs (MapFolder) instead of writing a layout')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-synthetic-loader', action='store_true', help='skip timing SyntheticRadioMaps through the DataLoader')
    p.add_argument('--json', default=None, help='also write the result as JSON to this path')
    a = p.parse_args(argv)
    r = measure_data_throughput(a.n_generate, a.size, a.n_load, tuple(a.workers), a.batch_size, a.folder, a.seed,
                                synthetic_loader=not a.no_synthetic_loader)
    print(json.dumps(r, indent=1))
    if a.json: Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
