"""`radiodiff-vae encode`: the latents of a dataset in resumable safetensors shards, whose decode matches evaluate's
reconstruction metrics; bad input answers in one line with exit status 2."""
import json

import numpy as np
import torch

from radiodiff_vae.cli import main
from radiodiff_vae.core import pretrained_path, repo_dir
from radiodiff_vae.formats import release_record
from radiodiff_vae.data import unscale_gain
from radiodiff_vae.encode import SHARD, read_latents
from radiodiff_vae.data_spec import dataset_from_spec
from radiodiff_vae.evaluation import map_metrics
from radiodiff_vae.pretrained import load_pretrained

RECORD = release_record('released')


def test_encode_the_26_real_maps_and_decode_them_back_as_evaluate_scored_them(tmp_path, capsys):
    out = tmp_path / 'latents'
    assert main(['encode', '--checkpoint', 'released', '--data', 'real', '--out', str(out), '--shard-size', '16', '--no-progress']) == 0
    assert 'maps/s' in capsys.readouterr().out
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['count'] == 26 and stats['shards'] == 2 and stats['weights_sha256'] == RECORD['weights_sha256']
    assert abs(stats['scale_factor'] - RECORD['latents_real']['scale_factor']) < 0.005     # exact moments vs the card's one draw
    means, names = zip(*[(read_latents(out, k)[0], read_latents(out, k)[2]) for k in range(2)])
    model, real = load_pretrained(), dataset_from_spec('real')[0]
    with torch.no_grad(): rec = model.decode(torch.cat(means))
    x = torch.stack([real[i]['image'] for i in range(len(real))])
    psnr = map_metrics(unscale_gain(rec), unscale_gain(x))['psnr'].numpy()
    card = {m['name']: m['mode_psnr'] for m in RECORD['per_map']['real']}
    np.testing.assert_allclose(psnr, [card[n] for n in sum(names, [])], atol=1e-3)


def test_a_rerun_keeps_finished_shards(tmp_path, capsys):
    out = tmp_path / 'latents'
    args = ['encode', '--checkpoint', 'released', '--data', 'real', '--out', str(out), '--shard-size', '10', '--limit', '20', '--no-progress']
    assert main(args) == 0
    first = (out / SHARD.format(0)).read_bytes(); (out / SHARD.format(1)).unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert '10 kept from an earlier run' in capsys.readouterr().out
    assert (out / SHARD.format(0)).read_bytes() == first and (out / SHARD.format(1)).is_file()


def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    def one_line_error(args, expect):
        assert main(['encode', *args, '--no-progress']) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err
    one_line_error(['--checkpoint', str(tmp_path / 'missing.pt'), '--data', 'real', '--out', str(tmp_path / 'a')], 'no such checkpoint file')
    (tmp_path / 'empty').mkdir()
    one_line_error(['--checkpoint', 'released', '--data', str(tmp_path / 'empty'), '--out', str(tmp_path / 'b')], 'no .png maps')
    one_line_error(['--checkpoint', 'released', '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'c')], 'does not exist')
    assert not any((tmp_path / d).exists() for d in 'abc')
    other = tmp_path / 'other.pt'
    state = torch.load(pretrained_path('released'), weights_only=True)
    torch.save({'model': {k: v * 1.01 for k, v in state['model'].items()}, 'config': state['config']}, other)
    out = tmp_path / 'lat'
    assert main(['encode', '--checkpoint', 'released', '--data', 'real', '--out', str(out), '--limit', '2', '--no-progress']) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(['--checkpoint', str(other), '--data', 'real', '--out', str(out), '--limit', '2'], 'holds latents of other weights')
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
