"""Evaluation: metric functions against plain NumPy, end-to-end evaluations of tiny checkpoints, and bad input."""
import math, os
import numpy as np
import pytest
import torch
from scipy import stats

from radiodiff_vae.core import DataError
from radiodiff_vae.evaluation import map_metrics, nmse_per_map, rmse_per_map, psnr_per_map, ssim_per_map, summarize


# ---------- independent NumPy references (no torch, no torchmetrics) ----------

def np_gaussian_window(size=11, sigma=1.5):
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def np_filter_valid(img, window):
    """Weighted mean of every window-sized patch wholly inside `img` (a 'valid' correlation)."""
    patches = np.lib.stride_tricks.sliding_window_view(img, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def np_ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM of two 2-D maps, Wang et al. (2004), Gaussian window centred on every pixel (borders reflected)."""
    pad = (size - 1) // 2
    x = np.pad(x.astype(np.float64), pad, mode="reflect")
    y = np.pad(y.astype(np.float64), pad, mode="reflect")
    w = np_gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = np_filter_valid(x, w), np_filter_valid(y, w)
    vx = np_filter_valid(x * x, w) - mx ** 2
    vy = np_filter_valid(y * y, w) - my ** 2
    cxy = np_filter_valid(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


def np_metrics(pred, target):
    err = pred.astype(np.float64) - target.astype(np.float64)
    mse = np.mean(err ** 2)
    return dict(nmse=np.sum(err ** 2) / np.sum(target.astype(np.float64) ** 2), rmse=np.sqrt(mse),
                psnr=10 * np.log10(1.0 / mse), ssim=np_ssim(pred, target))


def _pair(seed, h=24, w=20, noise=0.1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    target = np.clip(0.5 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + 0.05 * rng.standard_normal((h, w)), 0, 1)
    pred = np.clip(target + noise * rng.standard_normal((h, w)), 0, 1)
    return pred, target


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None]


# ---------- metric functions ----------

@pytest.mark.parametrize("seed,noise", [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_metrics_match_numpy(seed, noise):
    pred, target = _pair(seed, noise=noise)
    ours = map_metrics(_t(pred), _t(target))
    ref = np_metrics(pred, target)
    for k in ("nmse", "rmse"):
        assert ours[k].item() == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    assert ours["ssim"].item() == pytest.approx(ref["ssim"], abs=2e-6)     # computed in float32 for speed
    assert ours["psnr"].item() == pytest.approx(ref["psnr"], abs=1e-4)   # torchmetrics takes log10 in float32


def test_metrics_per_map_in_a_batch():
    pairs = [_pair(s, noise=0.05 * (s + 1)) for s in range(4)]
    pred = torch.cat([_t(p) for p, _ in pairs]); target = torch.cat([_t(t) for _, t in pairs])
    ours = map_metrics(pred, target)
    for i, (p, t) in enumerate(pairs):
        ref = np_metrics(p, t)
        assert ours["ssim"][i].item() == pytest.approx(ref["ssim"], abs=2e-6)
        assert ours["nmse"][i].item() == pytest.approx(ref["nmse"], rel=1e-9)
    # noisier maps score worse on every metric
    assert (ours["psnr"].diff() < 0).all() and (ours["ssim"].diff() < 0).all() and (ours["rmse"].diff() > 0).all()


def test_numpy_ssim_reference_is_sane():
    pred, target = _pair(3)
    assert np_ssim(target, target) == pytest.approx(1.0)
    assert np_ssim(pred, target) < 0.95
    assert np_ssim(1 - target, target) < 0


def test_metrics_clamp_reconstruction_and_psnr_identity():
    pred, target = _pair(4, noise=0.2)
    over = _t(pred) * 1.5 - 0.25            # values outside [0, 1]
    m = map_metrics(over, _t(target))
    ref = np_metrics(np.clip(pred * 1.5 - 0.25, 0, 1), target)
    assert m["rmse"].item() == pytest.approx(ref["rmse"], rel=1e-9)
    assert m["psnr"].item() == pytest.approx(-20 * math.log10(m["rmse"].item()), abs=1e-4)


def test_metrics_bad_shapes():
    with pytest.raises(DataError, match="one shape"):
        map_metrics(torch.zeros(2, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(DataError, match="SSIM window"):
        map_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_summarize_against_scipy():
    rng = np.random.default_rng(0)
    v = rng.normal(30, 2, size=17)
    s = summarize(list(v) + [float("nan"), float("inf")])
    assert s["n"] == 17 and s["n_nonfinite"] == 2
    lo, hi = stats.t.interval(0.95, 16, loc=v.mean(), scale=stats.sem(v))
    assert s["ci_low"] == pytest.approx(lo) and s["ci_high"] == pytest.approx(hi)
    assert s["std"] == pytest.approx(np.std(v, ddof=1))


# ---------- end-to-end evaluation of tiny checkpoints ----------

import json
import pandas as pd
import yaml

from radiodiff_vae.cli import main as cli_main
from radiodiff_vae.config import resolve_config, tiny_config
from radiodiff_vae.core import CheckpointError, ConfigError, atomic_torch_save, real_maps_dir
from radiodiff_vae.data import MapFolder, unscale_gain
from radiodiff_vae.data_spec import dataset_from_spec
from radiodiff_vae.evaluation import evaluate_checkpoint
from radiodiff_vae.losses import LPIPSWithDiscriminator
from radiodiff_vae.model import AutoencoderKL

TINY = tiny_config("model.ddconfig.ch_mult=[1,1,1]", "model.lossconfig.logvar_init=0.3", "data.n_maps=20", "data.val_maps=4",
                   "data.data_seed=3")


def _tiny_checkpoint(path, cfg_raw=TINY, with_config=True, with_ema=True, seed=0):
    """A checkpoint in the trainer's format (model, ema with ema_model. prefix, config, loss state, step)."""
    cfg = resolve_config(cfg_raw)
    torch.manual_seed(seed)
    ae = AutoencoderKL(cfg["model"]["ddconfig"], cfg["model"]["embed_dim"])
    ema = AutoencoderKL(cfg["model"]["ddconfig"], cfg["model"]["embed_dim"])
    loss = LPIPSWithDiscriminator(**cfg["model"]["lossconfig"])
    ckpt = {"model": ae.state_dict(), "step": 7, "loss": loss.state_dict()}
    if with_ema:
        ckpt["ema"] = {**{f"ema_model.{k}": v for k, v in ema.state_dict().items()}, "initted": torch.tensor(True)}
    if with_config:
        ckpt["config"] = cfg
    atomic_torch_save(ckpt, path)
    return path, cfg


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model-1.pt")


def _check_outputs(out, res, n_maps, weights):
    for name in ["per_map.csv", "summary.json", "evaluation.md", "psnr_histogram.png"] + [f"reconstructions_{w}.png" for w in weights]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    df = pd.read_csv(out / "per_map.csv")
    assert len(df) == n_maps * len(weights) and list(df["weights"].unique()) == weights
    numeric = df.select_dtypes("number")
    assert np.isfinite(numeric.to_numpy()).all()
    # PSNR = 10 log10(1/MSE) = -20 log10(RMSE), for both reconstructions
    for kind in ("mode", "sample"):
        np.testing.assert_allclose(df[f"{kind}_psnr"], 10 * np.log10(1 / df[f"{kind}_mse"]), atol=1e-4)
        np.testing.assert_allclose(df[f"{kind}_psnr"], -20 * np.log10(df[f"{kind}_rmse"]), atol=1e-4)
        assert ((df[f"{kind}_ssim"] <= 1) & (df[f"{kind}_ssim"] > -1)).all()
    # total = nll + kl_weight * kl at step 0 (disc_start > 0: no GAN term)
    kl_weight = res["summary"]["lossconfig"]["kl_weight"]
    np.testing.assert_allclose(df["loss_total"], df["loss_nll"] + kl_weight * df["loss_kl"], rtol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    for w in weights:
        s, g = summary["results"][w], df[df["weights"] == w]
        m = s["metrics"]["mode"]["psnr"]
        assert m["mean"] == pytest.approx(g["mode_psnr"].mean()) and m["std"] == pytest.approx(g["mode_psnr"].std(ddof=1))
        assert m["ci_low"] < m["mean"] < m["ci_high"]
        assert s["losses"]["rec"]["mean"] == pytest.approx(g["loss_rec"].mean())
        z = s["latents"]["sample"]
        assert len(z["channel_mean"]) == 3 and s["scale_factor"] == pytest.approx(1 / z["std"])
        assert s["worst_map"]["psnr"] == pytest.approx(g["mode_psnr"].min())
        assert s["worst_map"]["name"] == g.loc[g["mode_psnr"].idxmin(), "name"]
    md = (out / "evaluation.md").read_text()
    assert md.startswith("## Reconstruction quality") and "scale factor" in md and "reconstructions_" in md
    return df, summary


def test_evaluate_synthetic_both_weights(tiny_ckpt, tmp_path):
    path, cfg = tiny_ckpt
    res = evaluate_checkpoint(path, "synthetic:5", out_dir=tmp_path, use_ema="both", batch_size=2, progress=False)
    df, summary = _check_outputs(tmp_path, res, 5, ["raw", "ema"])
    # held out: the same generator stream, after the 20 training and 4 validation maps
    assert summary["data"]["offset"] == 24 and summary["data"]["seed"] == 3 and summary["sizes"] == {"32x32": 5}
    assert list(df["name"][:5]) == [f"{i}_0" for i in range(24, 29)]
    # raw and EMA weights differ here, so their reconstructions do
    raw, ema = df[df.weights == "raw"].reset_index(), df[df.weights == "ema"].reset_index()
    assert (raw["mode_mse"] - ema["mode_mse"]).abs().max() > 1e-6
    # the loss state came from the checkpoint: logvar 0.3 -> nll = rec / e^0.3 + 0.3 per pixel, summed
    np.testing.assert_allclose(raw["loss_nll"], (raw["loss_rec"] / math.exp(0.3) + 0.3) * 32 * 32, rtol=1e-4)


def test_evaluation_matches_an_independent_forward_pass(tiny_ckpt):
    path, cfg = tiny_ckpt
    res = evaluate_checkpoint(path, "synthetic:3:11", batch_size=3, progress=False)
    df = res["per_map"]
    model = AutoencoderKL.from_checkpoint(path).eval()
    ds, _ = dataset_from_spec("synthetic:3:11:32")
    x = torch.stack([ds[i]["image"] for i in range(3)])
    with torch.no_grad():
        post = model.encode(x)
        rec = model.decode(post.mode())
    target = unscale_gain(x).numpy()[:, 0].astype(np.float64)
    pred = np.clip(unscale_gain(rec).numpy()[:, 0].astype(np.float64), 0, 1)
    for i in range(3):
        ref = np_metrics(pred[i], target[i])
        assert df["mode_rmse"][i] == pytest.approx(ref["rmse"], rel=1e-4)
        assert df["mode_nmse"][i] == pytest.approx(ref["nmse"], rel=1e-4)
        assert df["mode_ssim"][i] == pytest.approx(ref["ssim"], abs=1e-4)
    np.testing.assert_allclose(df["loss_kl"], post.kl().numpy(), rtol=1e-4)


def test_per_map_numbers_do_not_depend_on_batching(tiny_ckpt):
    path, _ = tiny_ckpt
    a = evaluate_checkpoint(path, "synthetic:4", batch_size=1, progress=False)["per_map"]
    b = evaluate_checkpoint(path, "synthetic:4", batch_size=3, progress=False)["per_map"]
    cols = ["mode_psnr", "sample_psnr", "sample_ssim", "loss_total"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4)
    c = evaluate_checkpoint(path, "synthetic:4", batch_size=3, progress=False, sample_seed=1)["per_map"]
    assert (c["sample_psnr"] - b["sample_psnr"]).abs().max() > 1e-6      # another seed, other posterior samples
    np.testing.assert_allclose(c["mode_psnr"], b["mode_psnr"], rtol=1e-6)  # the mode does not depend on it


@pytest.mark.slow   # 26 maps of 256x256: ~6 min on 2 shared cores, well under a minute on a free machine
def test_evaluate_bundled_real_maps(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    res = evaluate_checkpoint(path, "real", out_dir=tmp_path, batch_size=8, progress=False)
    df, summary = _check_outputs(tmp_path, res, 26, ["raw"])
    assert summary["sizes"] == {"256x256": 26} and summary["data"]["kind"] == "real"
    assert sorted(df["name"]) == sorted(p.stem for p in (real_maps_dir() / "gain" / "DPM").glob("*.png"))
    notes = " ".join(summary["notes"])
    assert "26 bundled real RadioMapSeer maps" in notes and "training split" in notes
    assert "differs from the training size 32x32" in notes


def test_upstream_checkpoint_without_config(tmp_path):
    path, cfg = _tiny_checkpoint(tmp_path / "model-3.pt", with_config=False, with_ema=False)
    with pytest.raises(CheckpointError, match="another architecture"):   # default: RadioDiff's ch=128 architecture
        evaluate_checkpoint(path, "synthetic:2:0:32", progress=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    res = evaluate_checkpoint(path, "synthetic:2:0:32", progress=False, config=tmp_path / "tiny.yaml")
    assert res["summary"]["checkpoint"]["config_source"].endswith("tiny.yaml") and len(res["per_map"]) == 2
    with pytest.raises(CheckpointError, match="'ema'"):
        evaluate_checkpoint(path, "synthetic:2:0:32", progress=False, config=tmp_path / "tiny.yaml", use_ema=True)


def test_bad_input_is_a_clear_error(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    with pytest.raises(DataError, match="multiples of 4"):           # 3 levels: sides must be multiples of 4
        evaluate_checkpoint(path, "synthetic:1:0:30", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png maps"):
        evaluate_checkpoint(path, str(tmp_path / "empty"), progress=False)
    with pytest.raises(DataError, match="synthetic:N"):
        evaluate_checkpoint(path, "synthetic:0", progress=False)
    with pytest.raises(ConfigError, match="limit"):
        evaluate_checkpoint(path, "synthetic:2", limit=0, progress=False)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate_checkpoint(tmp_path / "missing.pt", "synthetic:2", progress=False)
    other = resolve_config({**TINY, "model": {**TINY["model"], "ddconfig": {**TINY["model"]["ddconfig"], "ch": 64}}})
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(CheckpointError, match="another architecture"):
        evaluate_checkpoint(path, "synthetic:2", config=tmp_path / "other.yaml", progress=False)


def test_cli(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:3", "--out", str(out), "--ema",
                     "--limit", "2", "--batch-size", "2", "--no-progress"]) == 0
    assert "synthetic:3 [ema]: 2 maps, PSNR" in capsys.readouterr().out
    assert len(pd.read_csv(out / "per_map.csv")) == 2 and (out / "reconstructions_ema.png").is_file()
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:1:0:30", "--out", str(out), "--no-progress"]) == 2
    assert "multiples of 4" in capsys.readouterr().err


def test_evaluate_many_and_cli_with_several_specs(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    out = tmp_path / "many"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:2", "synthetic:2:9", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic-2 [raw]: 2 maps" in printed and "synthetic-2-9 [raw]: 2 maps" in printed
    md = (out / "evaluation.md").read_text()
    assert md.count("## Reconstruction quality") == 2 and "](synthetic-2-9/reconstructions_raw.png)" in md
    headline = json.loads((out / "summary.json").read_text())["posterior_mode_means"]
    per_map = pd.read_csv(out / "synthetic-2-9" / "per_map.csv")
    assert headline["synthetic-2-9"]["raw"]["psnr"] == pytest.approx(per_map["mode_psnr"].mean())


def test_pipeline_notebook_runs_with_small_parameters(tiny_ckpt, tmp_path):
    papermill = pytest.importorskip("papermill")
    from pathlib import Path
    path, _ = tiny_ckpt
    nb = Path(__file__).resolve().parents[1] / "nbs" / "pipelines" / "evaluate.ipynb"
    papermill.execute_notebook(str(nb), str(tmp_path / "executed.ipynb"), kernel_name="python3", progress_bar=False,
                               parameters=dict(checkpoint=str(path), data=["synthetic:2"], out_dir=str(tmp_path / "out"),
                                               use_ema=True, batch_size=2))
    assert (tmp_path / "out" / "synthetic-2" / "reconstructions_ema.png").is_file()
    assert "| ema | posterior mode |" in (tmp_path / "out" / "evaluation.md").read_text()


def test_a_dataset_object_instead_of_a_spec(tiny_ckpt):
    from radiodiff_vae.synthetic import SyntheticRadioMaps
    path, _ = tiny_ckpt
    res = evaluate_checkpoint(path, SyntheticRadioMaps(3, seed=5, size=32), limit=2, progress=False)
    assert res["summary"]["data"]["kind"] == "dataset" and "SyntheticRadioMaps" in res["summary"]["data"]["description"]
    assert list(res["per_map"]["name"]) == ["0_0", "1_0"]


class _Payload:
    "Unpickling it runs a shell command, as a hostile model-N.pt could."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return (__import__("os").system, (self.cmd,))


def test_cli_refuses_a_checkpoint_that_runs_code(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    marker = tmp_path / "it-ran"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "extra": _Payload(f"touch {marker}")}, tmp_path / "evil.pt")
    args = ["evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--data", "synthetic:1", "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "evil.pt: refused to load" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert cli_main(args + ["--trust-checkpoint"]) == 0          # the user vouches for the file: read, and its code ran
    assert marker.exists() and (tmp_path / "out" / "per_map.csv").is_file()


def _radiomapseer_root(root, n=20, size=32):
    "A complete RadioMapSeer layout of `n` maps, one transmitter each (as make-data writes it)."
    from PIL import Image
    (root / "gain" / "DPM").mkdir(parents=True)
    (root / "make_data.json").write_text(json.dumps({"n": n, "num_tx": 1}))
    rng = np.random.default_rng(0)
    for m in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "gain" / "DPM" / f"{m}_0.png")
    return root


def test_radiomapseer_test_split_leaves_out_the_map_train_also_holds(tiny_ckpt, tmp_path, capsys):
    from radiodiff_vae.data import leaked_maps, radiomapseer_split
    path, _ = tiny_ckpt
    root = _radiomapseer_root(tmp_path / "rms")
    leaked = leaked_maps(20)
    assert len(leaked) == 1 and leaked[0] in radiomapseer_split("train", 20)
    held = evaluate_checkpoint(path, str(root), progress=False)
    names = set(held["per_map"]["name"])
    assert f"{leaked[0]}_0" not in names and len(names) == len(radiomapseer_split("test", 20, include_leaked=True)) - 1
    assert held["summary"]["data"]["left_out"] == leaked and "left out" in " ".join(held["summary"]["notes"])
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", str(root), "--out", str(tmp_path / "up"),
                     "--include-leaked", "--no-progress"]) == 0
    up = pd.read_csv(tmp_path / "up" / "per_map.csv")
    assert f"{leaked[0]}_0" in set(up["name"]) and len(up) == len(names) + 1
    summary = json.loads((tmp_path / "up" / "summary.json").read_text())
    assert summary["settings"]["include_leaked"] is True and "includes map(s)" in " ".join(summary["notes"])


@pytest.mark.parametrize("bad", ["/no/such/maps", "synthetic:1:0:30", "synthetic:2"])
def test_a_bad_spec_among_several_leaves_nothing_behind(tiny_ckpt, tmp_path, capsys, bad):
    path, _ = tiny_ckpt
    out = tmp_path / "out"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:2", bad, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("radiodiff-vae evaluate: error:")
    assert not out.exists()
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", "synthetic:2", "synthetic:3",
                     "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


# ---------- issue 34: old outputs, degenerate maps, odd file names ----------

def test_stale_outputs_of_an_earlier_evaluation_are_removed_and_named(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:2", "synthetic:2:9", "--out", str(out), "--no-progress"]) == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "mine").mkdir(); (out / "mine" / "draft.md").write_text("mine")
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:2", "--out", str(out), "--ema", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert not (out / "synthetic-2").exists() and not (out / "synthetic-2-9").exists()      # the earlier run's subfolders
    assert "removed" in printed and "synthetic-2-9" in printed
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "mine" / "draft.md").read_text() == "mine"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:2", "synthetic:1:5", "--out", str(out), "--no-progress"]) == 0
    assert not (out / "per_map.csv").exists() and not (out / "reconstructions_ema.png").exists()   # single-spec files of the last run
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.md", "mine", "my_notes.txt", "summary.json", "synthetic-1-5", "synthetic-2"]


def _png_folder(folder, maps: dict):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in maps.items(): Image.fromarray(array).save(folder / name if isinstance(name, str) else os.fsdecode(bytes(folder) + b"/" + name), format="PNG")
    return folder


def test_a_map_with_no_signal_and_exact_reconstructions_are_defined_and_named(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    rng = np.random.default_rng(0)
    maps = _png_folder(tmp_path / "maps", {"zero.png": np.zeros((32, 32), np.uint8), "city.png": rng.integers(0, 255, (32, 32), dtype=np.uint8)})
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", f"folder:{maps}", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "NMSE" in printed and "zero" in printed                                                # the left-out map is named
    df = pd.read_csv(out / "per_map.csv")
    assert math.isnan(df.loc[df.name == "zero", "mode_nmse"].iloc[0])                            # undefined, not infinite
    md = (out / "evaluation.md").read_text()
    assert "no signal" in md and "zero" in md
    # exact reconstructions: PSNR +inf for every map; the summary still writes, naming them
    from radiodiff_vae.evaluation import summarize_rows, markdown_section
    rows = [dict(index=i, name=f"m{i}", height=32, width=32, **{f"{k}_{m}": v for k in ("mode", "sample") for m, v in
            dict(nmse=0.0, rmse=0.0, psnr=math.inf, ssim=1.0, mse=0.0).items()}, **{f"loss_{t}": 0.0 for t in ("rec", "kl", "nll", "total", "g")})
            for i in range(2)]
    s = summarize_rows(rows, {})
    assert s["typical_map"]["psnr"] == math.inf and s["metrics"]["mode"]["psnr"]["n_nonfinite"] == 2


def test_a_checkpoint_with_nan_weights_is_one_line(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    bad = tmp_path / "model-9.pt"; atomic_torch_save(ckpt, bad)
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", str(bad), "--data", "synthetic:2", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model-9.pt" in err and "non-finite" in err
    assert not (tmp_path / "out").exists()
    assert cli_main(["evaluate", "--checkpoint", str(bad), "--data", "synthetic:2", "--out", str(tmp_path / "out"), "--ema", "--no-progress"]) == 0


def test_file_names_that_are_not_utf8(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    rng = np.random.default_rng(1)
    maps = _png_folder(tmp_path / "maps", {b"caf\xe9.png": rng.integers(0, 255, (32, 32), dtype=np.uint8)})
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", str(maps), "--out", str(out), "--no-progress"]) == 0
    assert "caf\ufffd" in pd.read_csv(out / "per_map.csv")["name"].iloc[0] and (out / "reconstructions_raw.png").is_file()


def test_every_accepted_seed_works(tiny_ckpt, tmp_path):
    "issue 34 item 9: --seed takes 0..2**63-1; the per-map noise seed must not overflow torch's 64 bits for the large ones."
    path, _ = tiny_ckpt
    assert cli_main(["evaluate", "--checkpoint", str(path), "--data", "synthetic:1", "--out", str(tmp_path / "e"), "--seed", str(2**63 - 1),
                     "--no-progress"]) == 0
