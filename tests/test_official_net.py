"""The official code's net and pixels: ``OmniglotConvNet.official`` (TensorFlow's "same" padding,
BatchNorm ε = 1e-3, Glorot-uniform kernels and zero biases), ``MiniImageNetConvNet.official`` and
``pixels="official"`` (the official loader's nearest-neighbour 28×28, white 1, ink 0), and the
omniglot job's ``--net official --pixels official``."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _fake_omniglot import job_data, make_runs
from reptile_fast import MiniImageNetConvNet, OmniglotConvNet
from reptile_fast.cli import main
from reptile_fast.models import SamePad2d
from reptile_fast.tasks import Omniglot
from reptile_fast.tasks.images import decode_grey
from reptile_fast.tasks.omniglot import load_official_runs, load_omniglot_images

from test_backend_torch import class_tasks, equivalence


@pytest.mark.parametrize("size, before, after", [(28, 0, 1), (14, 0, 1), (7, 1, 1), (4, 0, 1), (5, 1, 1), (2, 0, 1),
                                                 (1, 1, 1)])
def test_same_padding_is_tensorflows(size, before, after):
    """TensorFlow's 'same' for a 3×3 window at stride 2 (its documented rule: out = ceil(n / 2),
    total padding max((out − 1)·2 + 3 − n, 0), the odd one after), written out per size."""
    x = torch.randn(1, 2, size, size + 1, generator=torch.Generator().manual_seed(size))
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    cols = size + 1
    total_c = max(((cols + 1) // 2 - 1) * 2 + 3 - cols, 0)
    want = F.conv2d(F.pad(x, (total_c // 2, total_c - total_c // 2, before, after)), w, stride=2)
    got = F.conv2d(SamePad2d(3, 2)(x), w, stride=2)
    assert got.shape[-2:] == ((size + 1) // 2, (cols + 1) // 2)
    assert torch.equal(got, want)


def test_official_omniglot_net():
    torch.manual_seed(0)
    net = OmniglotConvNet.official(5)
    assert [f.shape for f in (net.features(torch.zeros(2, 1, 28, 28)),)] == [(2, 64, 2, 2)]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 4 and all(c.padding == (0, 0) for c in convs)
    assert all(n.eps == 1e-3 for n in norms)
    # Glorot-uniform: U(±b), b = sqrt(6 / (fan_in + fan_out)), fans over the 3×3 receptive field;
    # n weights have variance b²/3 within a relative standard error sqrt(0.8 / n): checked within
    # 5 % for the 36864 of a 64→64 conv (~11 standard errors) and 12 % for the first conv's 576
    # (~3) and the classifier's 1280 (~4.6); PyTorch's default init is 1/3 (conv) and 0.29x
    # (classifier) of these variances (the control: the default net fails the same check)
    def glorot(w, fan_in, fan_out, within):
        w, bound = w.detach(), (6 / (fan_in + fan_out)) ** 0.5
        return bool(w.abs().max() <= bound) and abs(float(w.var()) / (bound ** 2 / 3) - 1) < within

    assert glorot(convs[1].weight, 64 * 9, 64 * 9, 0.05) and glorot(convs[0].weight, 9, 64 * 9, 0.12)
    assert glorot(net.classifier.weight, 256, 5, 0.12)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (*convs, net.classifier))
    # the default net is PyTorch's, as before (its state_dict keys too)
    default = OmniglotConvNet(5)
    assert [k for k in default.state_dict()][:2] == ["features.0.weight", "features.0.bias"]
    assert all(c.padding == (1, 1) for c in default.modules() if isinstance(c, nn.Conv2d))
    assert float(default.features[0].bias.detach().abs().max()) > 0
    assert not glorot(default.features[3].weight, 64 * 9, 64 * 9, 0.05)
    assert not glorot(default.classifier.weight, 256, 5, 0.12)
    mini = MiniImageNetConvNet.official(5)
    assert all(m.eps == 1e-3 for m in mini.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(float(m.bias.detach().abs().max()) == 0 for m in mini.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert mini(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_bad_net_options_are_refused_by_name():
    for kwargs, match in ((dict(padding="valid"), "padding must be one of"), (dict(init="he"), "init must be one of"),
                          (dict(bn_eps=0.0), "bn_eps"), (dict(bn_eps="1e-3"), "bn_eps"),
                          (dict(padding=None), "padding must be one of")):
        with pytest.raises((TypeError, ValueError), match=match):
            OmniglotConvNet(5, **kwargs)
    with pytest.raises(ValueError, match="init must be one of"):
        MiniImageNetConvNet(5, init="xavier")


def test_the_backends_agree_on_the_official_net():
    """vmap over the padding module (sizes read from the shapes): backend torch against reference."""
    torch.manual_seed(3)
    model = OmniglotConvNet.official(3, channels=4, image_size=8, n_blocks=2)
    tasks_fn = lambda n, seed: class_tasks(n, (1, 8, 8), 3, 12, seed)  # noqa: E731
    equivalence(model, tasks_fn, 4, 6, 12, batch=6, loss="cross_entropy", inner_lr=0.1, outer_lr=0.5,
                paths=(True,))


def _one_bit_png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.ones((105, 105), dtype=bool)  # white
    for _ in range(6):  # a few dark strokes, 3 pixels wide
        r, c = rng.integers(5, 100, size=2)
        pixels[r - 1:r + 2, 10:95] = False
        pixels[10:95, c - 1:c + 2] = False
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def test_official_pixels_are_the_official_loaders():
    """The official loader restated: ``np.array(Image.open(f).resize((28, 28))).astype('float32')``
    on Omniglot's 1-bit PNGs (Pillow resizes mode "1" by nearest neighbour)."""
    from PIL import Image

    for seed in range(3):
        data = _one_bit_png(seed)
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "1"
            want = torch.from_numpy(np.array(img.resize((28, 28))).astype("float32"))
        assert torch.equal(decode_grey(data, 28, pixels="official"), want)
        area = decode_grey(data, 28)  # the default: area-averaged, inverted
        assert not torch.equal(area, want) and float(area.max()) <= 1 and float((1 - want).max()) == 1
    with pytest.raises(ValueError, match="pixels must be one of"):
        decode_grey(_one_bit_png(0), 28, pixels="nearest")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("official_net_job"))


def test_loaders_take_the_official_pixels(data, tmp_path):
    area, official = (load_omniglot_images([data["test"]], pixels=p) for p in ("area", "official"))
    assert official.pixels == "official" and area.pixels == "area"
    # the same drawings, another reading: background 1 instead of 0
    assert float(official.images[:, :, 0, 0].min()) == 1.0 and float(area.images[:, :, 0, 0].max()) == 0.0
    assert Omniglot(official, ways=3).data is official
    # read from the path too: the same images as the preloaded ones
    direct = Omniglot(data["test"], ways=3, pixels="official")
    assert direct.data.pixels == "official" and torch.equal(direct.data.images, official.images)
    assert torch.equal(Omniglot(data["test"], ways=3).data.images, area.images)
    with pytest.raises(ValueError, match="pixels='area' but the preloaded images were read with pixels='official'"):
        Omniglot(official, ways=3, pixels="area")
    with pytest.raises(ValueError, match="pixels must be one of"):
        load_omniglot_images([data["test"]], pixels="box")
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    (a, _), (o, _) = (load_official_runs(runs, pixels=p) for p in ("area", "official"))
    assert not torch.equal(a.support.x, o.support.x) and float(o.support.x[..., 0, 0].min()) == 1.0


def test_omniglot_job_builds_and_reads_as_the_official_code(data, tmp_path, monkeypatch, capsys):
    import reptile_fast.fewshot_job as job
    from reptile_fast.fewshot_job import load_trained

    read, loaded = [], []
    real = job.load_official_runs
    monkeypatch.setattr(job, "load_official_runs", lambda path, **kw: read.append(kw) or real(path, **kw))
    real_images = job.load_omniglot_images
    monkeypatch.setattr(job, "load_omniglot_images",
                        lambda sources, **kw: loaded.append(kw) or real_images(sources, **kw))
    base = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "2",
            "--threads", "1", "--no-progress"]
    out = tmp_path / "run"
    assert main(base + ["--net", "official", "--pixels", "official", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["net"], config["pixels"]) == ("official", "official")
    assert loaded == [{"pixels": "official"}] * 2  # training images, then the test set
    cfg, trainer = load_trained(out)
    assert isinstance(trainer.model.features[0], SamePad2d) and trainer.model.features[2].eps == 1e-3
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in saved.items())
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("minibatches", "adam_state", "net", "pixels")} == \
        {"minibatches": "epochs", "adam_state": "fresh", "net": "official", "pixels": "official"}
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    threads = []  # the threads the runs' evaluation ran with: the model's run's (1), or --threads
    real_eval = job.evaluate_episodes
    monkeypatch.setattr(job, "evaluate_episodes",
                        lambda *a, **kw: threads.append(torch.get_num_threads()) or real_eval(*a, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path)]) == 0
        assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path),
                     "--threads", "2"]) == 0
        assert threads == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert read == [{"pixels": "official"}] * 2
    written = json.loads((tmp_path / "runs_metrics.json").read_text())
    assert (written["net"], written["pixels"], written["adam_state"]) == ("official", "official", "fresh")
    # a model saved before the options existed is the default net on area pixels
    old = tmp_path / "old"
    assert main(base + ["--out", str(old)]) == 0
    blob = torch.load(old / "model.pt", weights_only=True)
    for key in ("net", "pixels"):
        del blob["config"][key]
    torch.save(blob, old / "model.pt")
    cfg, trainer = load_trained(old)
    assert (cfg.net, cfg.pixels) == ("torch", "area") and isinstance(trainer.model.features[0], nn.Conv2d)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(base + ["--net", "tf", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'tf'" in capsys.readouterr().err
    # a resume keeps the run's net and pixels: another is refused before any work (an old run's
    # are the defaults then, torch and area)
    for flag, value, saved in (("--net", "official", "'torch' net"), ("--pixels", "official", "--pixels 'area'")):
        assert main(["omniglot", "--resume", str(old), "--no-progress", "--out", str(tmp_path / "r"), flag,
                     value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}:" in err and saved in err and "resume without" in err
    assert main(["omniglot", "--resume", str(out), "--no-progress", "--out", str(tmp_path / "r2"),
                 "--net", "official", "--pixels", "official"]) == 0
    assert "overrides" not in capsys.readouterr().err
