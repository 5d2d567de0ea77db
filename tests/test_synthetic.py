"""Synthetic radio maps: determinism, physics, the on-the-fly dataset, the RadioMapSeer-layout writer and `make-data`."""
import json

import numpy as np
import pytest
import torch

from radiodiff_vae.core import ConfigError, RunFolderError, real_maps_dir
from radiodiff_vae.data import MapFolder, RadioMapSeer, read_gray_png, scale_gain
from radiodiff_vae.synthetic import (DEFAULT_PARAMS, SyntheticRadioMaps, db_to_gray, generate_radio_map, histogram_distance,
                                     pixel_histogram, place_transmitter, radio_map, random_city, shadow_loss,
                                     write_radiomapseer_layout)


def test_deterministic_per_seed_and_index():
    a, b = generate_radio_map(3, 11, size=64), generate_radio_map(3, 11, size=64)
    for k in ('gain', 'buildings', 'antenna'):
        assert np.array_equal(a[k], b[k])
    assert a['tx'] == b['tx']
    assert not np.array_equal(a['gain'], generate_radio_map(3, 12, size=64)['gain'])
    assert not np.array_equal(a['gain'], generate_radio_map(4, 11, size=64)['gain'])
    # no hidden global state: another map in between changes nothing
    generate_radio_map(9, 9, size=64)
    assert np.array_equal(generate_radio_map(3, 11, size=64)['gain'], a['gain'])


def test_map_format_and_invariants():
    m = generate_radio_map(0, 5)
    g, bld, ant = m['gain'], m['buildings'], m['antenna']
    assert g.shape == bld.shape == ant.shape == (256, 256) and g.dtype == np.uint8
    assert set(np.unique(bld)) <= {0, 255} and set(np.unique(ant)) == {0, 255}
    assert (g[bld > 0] == 0).all()                                     # buildings are 0
    assert ant[m['tx']] == 255 and ant.sum() == 255                     # one transmitter pixel
    assert bld[m['tx']] == 0 and g[m['tx']] == 255 and (g == 255).sum() == 1
    assert all(0.2 * 256 <= v < 0.8 * 256 for v in m['tx'])
    same_city = generate_radio_map(0, 5, tx_index=3)
    assert np.array_equal(same_city['buildings'], bld) and same_city['tx'] != m['tx']


def test_free_space_follows_the_distance_law():
    empty = np.zeros((64, 64), bool)
    g = radio_map(empty, (32, 32), exponent=2.0, extent_m=64.0).astype(float)
    # 10 m -> 100 m costs 20 dB at n = 2, i.e. 51 gray levels on the 100 dB scale; here 8 m -> 16 m along a row: 6.02 dB
    assert g[32, 40] - g[32, 48] == pytest.approx(6.02 * 2.55, abs=1.0)
    assert np.all(np.diff(g[32, 32:]) <= 0)
    assert shadow_loss(empty, (32, 32)).max() == 0


def test_shadow_behind_a_building_only():
    bld = np.zeros((64, 64), bool)
    bld[28:37, 40:49] = True
    lit = radio_map(np.zeros_like(bld), (32, 20), blur=0).astype(int)
    shadowed = radio_map(bld, (32, 20), blur=0).astype(int)
    assert (shadowed[:, :39] == lit[:, :39]).all()                      # in front: unchanged
    assert (shadowed[32, 50:] < lit[32, 50:] - 10).all()                # straight behind: darker
    assert (shadowed[5, 50:] == lit[5, 50:]).all()                      # beside: line of sight


def test_city_density_and_tx_placement():
    fractions = [random_city(np.random.default_rng([1, i]), 128)[0].mean() for i in range(12)]
    assert 0.12 < np.mean(fractions) < 0.35
    with pytest.raises(ConfigError, match='valid:'):
        generate_radio_map(0, 0, size=32, pitch_m=3)
    from radiodiff_vae.core import DataError
    with pytest.raises(DataError, match='all buildings'):
        place_transmitter(np.random.default_rng(0), np.ones((8, 8), bool), np.zeros((8, 8), bool))


def test_scaling_clips_to_the_floor_and_max():
    assert db_to_gray(np.array([-500.0, DEFAULT_PARAMS['floor_db'], DEFAULT_PARAMS['max_db'], 10.0])).tolist() == [0, 0, 255, 255]


def test_synthetic_dataset():
    ds = SyntheticRadioMaps(4, seed=2, size=32, offset=5)
    assert len(ds) == 4
    item = ds[2]
    assert item['name'] == '7_0' and item['image'].shape == (1, 32, 32) and item['image'].dtype == torch.float32
    assert torch.equal(item['image'], scale_gain(generate_radio_map(2, 7, 32)['gain']))
    assert torch.equal(ds[-1]['image'], ds[3]['image'])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ConfigError):
        SyntheticRadioMaps(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
    batch = next(iter(loader))
    assert batch['image'].shape == (2, 1, 32, 32) and batch['name'] == ['5_0', '6_0']


def test_layout_round_trip_and_rerun(tmp_path):
    out = tmp_path / 'syn'
    write_radiomapseer_layout(out, 3, seed=4, size=32, num_tx=2, progress=False)
    info = json.loads((out / 'make_data.json').read_text())
    assert info['complete'] and info['n'] == 3 and info['num_tx'] == 2
    ds = RadioMapSeer(out, maps=[1, 2, 3], num_tx=2, size=32, with_cond=True)
    assert len(ds) == 6
    assert torch.equal(ds[2]['image'], SyntheticRadioMaps(3, seed=4, size=32, offset=1)[1]['image'])
    assert torch.equal(ds[3]['image'], scale_gain(generate_radio_map(4, 2, 32, tx_index=1)['gain']))
    assert len(MapFolder(out, size=32)) == 6
    write_radiomapseer_layout(out, 1, seed=4, size=32, num_tx=1, progress=False)     # its own output: replaced
    assert MapFolder(out, size=32).names == ['1_0']
    assert not (out / 'png' / 'buildings_complete' / '3.png').exists()


def test_layout_refuses_foreign_folders(tmp_path):
    (tmp_path / 'mine.txt').write_text('keep')
    with pytest.raises(RunFolderError, match='not empty'):
        write_radiomapseer_layout(tmp_path, 1, size=32, progress=False)
    assert (tmp_path / 'mine.txt').read_text() == 'keep' and not (tmp_path / 'gain').exists()
    with pytest.raises(RunFolderError, match='found a file'):
        write_radiomapseer_layout(tmp_path / 'mine.txt', 1, size=32, progress=False)
    with pytest.raises(ConfigError):
        write_radiomapseer_layout(tmp_path / 'new', 0, size=32, progress=False)


def test_make_data_cli(tmp_path, capsys):
    from radiodiff_vae.cli import main
    out = tmp_path / 'data'
    assert main(['make-data', '--out', str(out), '--n', '2', '--size', '32', '--num-tx', '2', '--seed', '1']) == 0
    assert sorted(p.name for p in (out / 'gain' / 'DPM').iterdir()) == ['1_0.png', '1_1.png', '2_0.png', '2_1.png']
    assert np.array_equal(read_gray_png(out / 'gain' / 'DPM' / '2_1.png', 32), generate_radio_map(1, 2, 32, tx_index=1)['gain'])
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'x').write_text('x')
    assert main(['make-data', '--out', str(tmp_path / 'other'), '--n', '1', '--size', '32']) == 2
    assert 'not empty' in capsys.readouterr().err


def test_close_to_the_real_maps():
    "A guard against regressions in realism: gray-level histogram of 30 maps within 4 gray levels (W1) of the 26 real maps."
    real = [read_gray_png(f) for f in MapFolder(real_maps_dir()).files]
    syn = [generate_radio_map(0, i)['gain'] for i in range(30)]
    d = histogram_distance(pixel_histogram(real), pixel_histogram(syn))
    assert d['w1'] < 4.0, d
    assert abs(np.mean([(m == 0).mean() for m in real]) - np.mean([(m == 0).mean() for m in syn])) < 0.06


def test_phase_split_of_a_make_data_folder(tmp_path):
    from radiodiff_vae.data import radiomapseer_split
    out = write_radiomapseer_layout(tmp_path / 'syn', 12, seed=0, size=32, num_tx=2, progress=False)
    parts = {ph: RadioMapSeer(out, phase=ph, size=32) for ph in ('train', 'val', 'test')}
    assert all(ds.num_tx == 2 for ds in parts.values())
    assert {ph: ds.maps for ph, ds in parts.items()} == {ph: radiomapseer_split(ph, n_maps=12) for ph in parts}
    assert set(parts['train'].maps) | set(parts['test'].maps) == set(range(1, 13))
    assert len(parts['train']) == 2 * len(parts['train'].maps)


# Today's 256-px maps (seed, map id, transmitter) hashed before the transmitter was drawn in metres: they must not change,
# so that the released model's card (scored on 256-px synthetic maps) stays reproducible.
MAPS_256 = [(0, i, 0) for i in (0, 1, 2, 3, 5, 18, 19, 100, 2999, 3000, 3015, 3016, 3047)] + [(1, 4916, 0), (7, 3, 1), (7, 3, 2), (123, 45, 0)]
MAPS_256_SHA256 = '3b5b338ed1fbfdc702f3e0687c6a365762752c33b95662ef2cf244fa73bbc4af'


def test_256_px_maps_are_unchanged():
    import hashlib
    h = hashlib.sha256()
    for seed, index, tx_index in MAPS_256:
        m = generate_radio_map(seed, index, 256, tx_index=tx_index)
        for k in ('gain', 'buildings', 'antenna'): h.update(m[k].tobytes())
        h.update(repr(m['tx']).encode())
    assert h.hexdigest() == MAPS_256_SHA256


@pytest.mark.parametrize('seed,index,tx_index', [(0, i, 0) for i in range(1, 21)] + [(3, 7, 1), (5, 4916, 2)])
def test_the_same_scene_at_every_size(seed, index, tx_index):
    "Map m of a seed is one 256 m scene: the city and the transmitter's position in metres agree at 64, 128, 192 and 256 px."
    full = generate_radio_map(seed, index, 256, tx_index=tx_index)
    for size in (64, 128, 192):
        m = generate_radio_map(seed, index, size, tx_index=tx_index)
        step = 256 // np.gcd(256, size)                      # pixels of `size` and of 256 px that sit on the same metres
        every = size // np.gcd(256, size)
        assert np.array_equal(m['buildings'][::every, ::every], full['buildings'][::step, ::step]), size
        pitch = 256 / size
        assert m['tx_m'] == full['tx_m'], (size, m['tx_m'], full['tx_m'])
        assert all(abs(p * pitch - t) <= pitch for p, t in zip(m['tx'], m['tx_m'])), (size, m['tx'], m['tx_m'])
        assert m['buildings'][m['tx']] == 0 and m['gain'][m['tx']] == 255


def test_small_maps_with_an_empty_district():
    "At 16 px a district can hold no pixel (map 4916 of seed 0 did: ValueError in `_district`); it must still generate."
    m = generate_radio_map(0, 4916, 16)
    assert m['gain'].shape == (16, 16) and m['buildings'][m['tx']] == 0
