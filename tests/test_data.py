"""RadioMapSeer split and scaling, the layout and folder datasets, and every bad-input error they raise."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff_vae.core import ConfigError, DataError, RadioDiffError, real_maps_dir
from radiodiff_vae.data import (MapFolder, RadioMapSeer, gray_levels, leaked_maps, radiomapseer_split, read_gray_png, scale_gain,
                                unscale_gain)


def png(path, array, mode=None):
    "Write `array` as a PNG at `path` (parents created) and return the path."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)
    return path


def layout(root, maps=(1, 2), num_tx=2, size=16, simulation='DPM', cond=True):
    "A small RadioMapSeer-layout folder: gain value = 10*map + tx, buildings and antenna masks."
    for m in maps:
        if cond: png(root / 'png' / 'buildings_complete' / f'{m}.png', np.full((size, size), 255))
        for t in range(num_tx):
            png(root / 'gain' / simulation / f'{m}_{t}.png', np.full((size, size), 10 * m + t))
            if cond: png(root / 'png' / 'antennas' / f'{m}_{t}.png', np.zeros((size, size)))
    return root


# ---------------------------------------------------------------- split

class RadioUNetC:
    """The part of upstream's `RadioUNet_c` loader (lib/loaders.py, the loader its VAE training uses) that picks maps,
    transcribed from its rule, not from our ranges: indices 0..699 shuffled under np.random.seed(42); each phase reads the
    inclusive positions ind1..ind2 of the shuffled array (train 0, 600; val 600, 650; test 600, 699), item `idx` of a phase
    is position ind1 + idx // numTx, and its file's map id is the index there + 1."""
    RANGES = {'train': (0, 600), 'val': (600, 650), 'test': (600, 699)}   # RadioUNet_c's (ind1, ind2) per phase

    def __init__(self, phase, numTx=80):
        state = np.random.get_state()
        try:
            np.random.seed(42)
            self.maps_inds = np.arange(0, 700, 1, dtype=np.int16)
            np.random.shuffle(self.maps_inds)
        finally:
            np.random.set_state(state)
        self.ind1, self.ind2 = self.RANGES[phase]
        self.numTx = numTx

    def __len__(self): return (self.ind2 - self.ind1 + 1) * self.numTx

    def map_id(self, idx):
        "The map id of item `idx`, as its __getitem__ names the file `{id}_{tx}.png`."
        return int(self.maps_inds[idx // self.numTx + self.ind1]) + 1


def upstream_split():
    "Each phase's map ids in the order upstream's loader reads them (one transmitter per map)."
    return {phase: np.array([RadioUNetC(phase, 1).map_id(i) for i in range(len(RadioUNetC(phase, 1)))])
            for phase in ('train', 'val', 'test')}


@pytest.mark.parametrize('phase,size', [('train', 601), ('val', 51), ('test', 100)])
def test_split_matches_upstream(phase, size):
    expected = upstream_split()[phase]
    got = radiomapseer_split(phase, include_leaked=True)
    assert len(got) == size
    assert got == [int(v) for v in expected]


def test_split_first_ids_and_overlap():
    """Upstream's val and test both start at the position-600 map, which train holds too; by default val (50 maps) and
    test (99) leave it out and share no map with train. Before the fix val was positions 501-600: 100 training maps."""
    up = upstream_split()
    assert radiomapseer_split('train')[0] == int(up['train'][0])
    train, val, test = (set(radiomapseer_split(p, include_leaked=True)) for p in ('train', 'val', 'test'))
    leak = {int(up['train'][600])}
    assert train & val == leak and train & test == leak and val <= test   # position 600 is in all three phases
    assert train | test == set(range(1, 701))
    held_val = radiomapseer_split('val')
    assert len(held_val) == 50 and not set(held_val) & set(radiomapseer_split('train'))
    assert held_val == [int(v) for v in up['val'][1:]] == radiomapseer_split('test')[:50]


def test_test_split_leaves_out_the_map_train_also_holds():
    "The default test split is held out: upstream's 100 test maps less the one at position 600 (also in train)."
    up = upstream_split()
    leaked = int(up['train'][600])
    assert leaked_maps() == [leaked] and leaked == int(up['test'][0])
    test = radiomapseer_split('test')
    assert len(test) == 99 and leaked not in test and test == [int(v) for v in up['test'][1:]]
    assert not set(test) & set(radiomapseer_split('train'))
    # at another size, the scaled positions still overlap in one map, and it is left out too
    assert len(leaked_maps(20)) == 1 and leaked_maps(20)[0] not in radiomapseer_split('test', n_maps=20)


def test_radiomapseer_test_phase_excludes_the_leaked_map(tmp_path):
    ids = radiomapseer_split('test', include_leaked=True)
    root = layout(tmp_path / 'rms', maps=ids, num_tx=1, size=8, cond=False)
    held_out = RadioMapSeer(root, phase='test', num_tx=1, size=8)
    assert len(held_out) == 99 and leaked_maps()[0] not in held_out.maps
    assert len(RadioMapSeer(root, phase='test', num_tx=1, size=8, include_leaked=True)) == 100


def test_split_other_sizes_and_errors():
    ids = radiomapseer_split('train', n_maps=20)
    assert set(ids) <= set(range(1, 21)) and len(ids) == len(set(ids))
    assert radiomapseer_split('test', seed=1) != radiomapseer_split('test')
    with pytest.raises(ConfigError, match='train, val, test'):
        radiomapseer_split('validation')


# ---------------------------------------------------------------- scaling

def test_scaling_round_trip_and_range():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = scale_gain(g)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0          # upstream (RadioUNet_c, DPM): g / 255
    assert torch.allclose(x, torch.from_numpy(g).float()[None] * 2 / 255 - 1, rtol=0, atol=1e-6)
    assert torch.equal(gray_levels(x), torch.from_numpy(g)[None])      # all 256 levels come back exactly
    assert torch.allclose(unscale_gain(x), torch.from_numpy(g).float()[None] / 255, atol=1e-7)
    assert unscale_gain(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_png_extremes_map_to_the_ends_of_the_range(tmp_path):
    png(tmp_path / 'm' / '1_0.png', np.array([[0, 255], [255, 0]]))
    x = MapFolder(tmp_path / 'm', size=2)[0]['image']
    assert x.tolist() == [[[-1.0, 1.0], [1.0, -1.0]]]
    assert unscale_gain(x).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]


def test_scaling_rejects_non_uint8_and_bad_shapes():
    with pytest.raises(DataError, match='uint8'):
        scale_gain(np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match='shape'):
        scale_gain(np.zeros((2, 4, 4), np.uint8))


# ---------------------------------------------------------------- RadioMapSeer layout

def test_radiomapseer_items_lengths_and_cond(tmp_path):
    root = layout(tmp_path / 'rms', maps=(1, 2, 3), num_tx=2)
    ds = RadioMapSeer(root, maps=[3, 1], num_tx=2, size=16, with_cond=True)
    assert len(ds) == 4
    item = ds[1]
    assert item['name'] == '3_1'
    assert torch.allclose(item['image'], scale_gain(np.full((16, 16), 31, np.uint8)))
    assert item['cond'].shape == (2, 16, 16)
    assert ds[-1]['name'] == '1_1'
    with pytest.raises(IndexError):
        ds[4]
    assert len(RadioMapSeer(root, maps=[1], num_tx=1, size=16)) == 1


def test_radiomapseer_phase_uses_split(tmp_path):
    ids = radiomapseer_split('val')
    root = layout(tmp_path / 'rms', maps=ids, num_tx=1, size=8, cond=False)
    ds = RadioMapSeer(root, phase='val', num_tx=1, size=8)
    assert len(ds) == 50 and ds[0]['name'] == f'{ids[0]}_0' and leaked_maps()[0] not in ds.maps


def test_missing_root_and_simulation(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        RadioMapSeer(tmp_path / 'nowhere', maps=[1])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no gain/ folder'):
        RadioMapSeer(tmp_path / 'empty', maps=[1])
    root = layout(tmp_path / 'rms', maps=(1,), num_tx=1, simulation='IRT2')
    (root / 'gain' / 'IRT4').mkdir()
    with pytest.raises(DataError, match=r'DPM.*IRT2, IRT4') as e:
        RadioMapSeer(root, simulation='DPM', maps=[1], num_tx=1, size=16)
    assert str(root / 'gain' / 'DPM') in str(e.value)


def test_missing_files_fail_at_construction(tmp_path):
    root = layout(tmp_path / 'rms', maps=(1, 2), num_tx=2)
    (root / 'gain' / 'DPM' / '2_1.png').unlink()
    with pytest.raises(DataError, match=r'1 of 4 expected files are missing: .*2_1\.png'):
        RadioMapSeer(root, maps=[1, 2], num_tx=2, size=16)
    with pytest.raises(DataError, match=r'7_0\.png'):
        RadioMapSeer(root, maps=[1, 7], num_tx=1, size=16)
    (root / 'png' / 'antennas' / '1_0.png').unlink()
    with pytest.raises(DataError, match=r'antennas.*1_0\.png'):
        RadioMapSeer(root, maps=[1], num_tx=1, size=16, with_cond=True)
    with pytest.raises(DataError, match='empty'):
        RadioMapSeer(root, maps=[], num_tx=1, size=16)


def test_wrong_size_at_construction_and_at_read(tmp_path):
    root = layout(tmp_path / 'rms', maps=(1, 2), num_tx=1, size=16, cond=False)
    with pytest.raises(DataError, match=r'1_0\.png: image is 16x16 \(HxW\), expected 32x32'):
        RadioMapSeer(root, maps=[1, 2], num_tx=1, size=32)
    ds = RadioMapSeer(root, maps=[1, 2], num_tx=1, size=16)
    png(root / 'gain' / 'DPM' / '2_0.png', np.zeros((8, 16)))
    with pytest.raises(DataError, match=r'2_0\.png: image is 8x16'):
        ds[1]


def test_colour_unreadable_and_16bit_images(tmp_path):
    grey = np.full((8, 8), 77, np.uint8)
    ok = png(tmp_path / 'rgb_equal.png', np.stack([grey] * 3, -1))
    assert read_gray_png(ok, 8)[0, 0] == 77
    assert read_gray_png(png(tmp_path / 'rgba.png', np.dstack([grey] * 3 + [np.full((8, 8), 255)])), 8)[0, 0] == 77
    bad = png(tmp_path / 'rgb.png', np.dstack([grey, grey, grey + 1]))
    with pytest.raises(DataError, match=r'rgb\.png: colour image \(RGB\) whose channels differ'):
        read_gray_png(bad, 8)
    junk = tmp_path / 'junk.png'
    junk.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    with pytest.raises(DataError, match=r'junk\.png: cannot read it as an image'):
        read_gray_png(junk, 8)
    deep = tmp_path / 'deep.png'
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(deep)
    with pytest.raises(DataError, match=r'deep\.png: image mode I'):
        read_gray_png(deep, 8)
    assert issubclass(DataError, RadioDiffError)


def test_unreadable_file_in_layout_at_read(tmp_path):
    root = layout(tmp_path / 'rms', maps=(1, 2), num_tx=1, size=16, cond=False)
    ds = RadioMapSeer(root, maps=[1, 2], num_tx=1, size=16)
    (root / 'gain' / 'DPM' / '2_0.png').write_bytes(b'garbage')
    with pytest.raises(DataError, match=r'2_0\.png: cannot read'):
        ds[1]


# ---------------------------------------------------------------- MapFolder

def test_mapfolder_on_bundled_real_maps():
    ds = MapFolder(real_maps_dir())
    assert len(ds) == 26
    assert ds.names[:3] == ['1_0', '3_0', '5_0'] and ds.names[-1] == '61_0'
    item = ds[0]
    assert item['image'].shape == (1, 256, 256) and -1 <= item['image'].min() and item['image'].max() <= 1
    flat = MapFolder(real_maps_dir() / 'gain' / 'DPM', recursive=False)
    assert torch.equal(flat[5]['image'], ds[5]['image'])


def test_mapfolder_skips_masks_of_a_layout_and_names(tmp_path):
    root = layout(tmp_path / 'rms', maps=(1, 2), num_tx=1, size=16)
    ds = MapFolder(root, size=16)
    assert ds.names == ['1_0', '2_0']             # png/buildings_complete and png/antennas are not maps
    png(tmp_path / 'f' / 'a' / 'x.png', np.zeros((4, 4)))
    png(tmp_path / 'f' / 'b' / 'x.png', np.zeros((4, 4)))
    assert MapFolder(tmp_path / 'f', size=4).names == ['a/x', 'b/x']


def test_mapfolder_errors(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        MapFolder(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('x')
    with pytest.raises(DataError, match=r'empty: no \.png maps found'):
        MapFolder(tmp_path / 'empty')
    png(tmp_path / 'sub' / 'deep' / '1.png', np.zeros((4, 4)))
    with pytest.raises(DataError, match='no .png maps'):
        MapFolder(tmp_path / 'sub', size=4, recursive=False)
    assert len(MapFolder(tmp_path / 'sub', size=4)) == 1
    with pytest.raises(DataError, match='expected 8x8'):
        MapFolder(tmp_path / 'sub', size=8)
    file = png(tmp_path / 'one.png', np.zeros((4, 4)))
    with pytest.raises(DataError, match='expected a folder'):
        MapFolder(file)
