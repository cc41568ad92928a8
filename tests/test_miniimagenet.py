"""Mini-ImageNet tasks on generated images in the standard layout, and the paper's Mini-ImageNet net."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reptile_fast import MiniImageNetConvNet, Reptile
from reptile_fast.tasks import Episodes, MiniImageNet, TaskBatch

SIZE = 12
CLASSES = {"train": ["n001", "n002", "n003", "n004"], "val": ["n005", "n006"], "test": ["n007", "n008", "n009"]}
PER_CLASS = 4


def colour(cls: str, k: int) -> np.ndarray:
    """A solid image whose colour encodes (class, k): exact under PNG, so the tests can identify it."""
    c = int(cls[1:])
    return np.full((SIZE, SIZE, 3), (10 * c, 20 * k, 7), dtype=np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("miniimagenet")
    (root / "images").mkdir()
    for split, classes in CLASSES.items():
        lines = ["filename,label"]
        for cls in classes:
            for k in range(PER_CLASS):
                name = f"{cls}{k:08d}.png"
                Image.fromarray(colour(cls, k)).save(root / "images" / name)
                lines.append(f"{name},{cls}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def identify(img: torch.Tensor):
    """(class number, k) from a [3, S, S] float image."""
    rgb = (img[:, 0, 0] * 255).round().to(torch.long).tolist()
    assert torch.all(img == img[:, :1, :1]), "solid colour"
    return rgb[0] // 10, rgb[1] // 20


def test_shapes_labels_and_splits(root):
    d = MiniImageNet(root, "train", ways=3, shots=2, query_shots=1, image_size=SIZE)
    assert d.n_classes == 4 and d.classes == CLASSES["train"]
    tasks = d.sample(2, generator=torch.Generator().manual_seed(0))
    assert isinstance(tasks, TaskBatch)
    assert tasks.x.shape == (2, 6, 3, SIZE, SIZE) and tasks.x.dtype == torch.float32
    assert torch.equal(tasks.y, torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, 6))
    ep = d.sample_episodes(3, generator=torch.Generator().manual_seed(0))
    assert isinstance(ep, Episodes) and ep.query.x.shape == (3, 3, 3, SIZE, SIZE)
    train_ids = {int(c[1:]) for c in CLASSES["train"]}
    for t in range(3):
        label_class = {}
        seen = set()
        for x, y in [*zip(ep.support.x[t], ep.support.y[t]), *zip(ep.query.x[t], ep.query.y[t])]:
            cls, k = identify(x)
            assert cls in train_ids
            assert label_class.setdefault(int(y), cls) == cls
            assert (cls, k) not in seen  # support and query images are distinct
            seen.add((cls, k))
    test = MiniImageNet(root, "test", ways=3, shots=1, image_size=SIZE)
    ep = test.sample_episodes(2, generator=torch.Generator().manual_seed(0))
    assert {identify(x)[0] for x in ep.support.x.flatten(0, 1)} <= {7, 8, 9}


def test_deterministic_under_a_generator_and_resizes(root):
    d = MiniImageNet(root, "val", ways=2, shots=1, query_shots=2, image_size=SIZE, cache=False)
    a = d.sample_episodes(4, generator=torch.Generator().manual_seed(5))
    b = d.sample_episodes(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
    big = MiniImageNet(root, "val", ways=2, shots=1, image_size=20)
    assert big.sample(1, generator=torch.Generator().manual_seed(0)).x.shape == (1, 2, 3, 20, 20)


def test_meta_training_step_with_the_paper_net(root):
    d = MiniImageNet(root, "train", ways=3, shots=3, query_shots=0, image_size=SIZE)
    model = MiniImageNetConvNet(3, channels=4, image_size=SIZE)
    trainer = Reptile(model, inner_lr=1e-3, inner_steps=2, inner_batch_size=4, outer_lr=1.0,
                      loss="cross_entropy", inner_optimizer="adam")
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(d, 2, meta_batch_size=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_miniimagenet_net_shapes():
    torch.manual_seed(0)
    net = MiniImageNetConvNet()
    assert net.classifier.in_features == 32 * 6 * 6  # 84 → 42 → 21 → 11 → 6, as 'same' pooling
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 4
    assert all(m.out_channels == 32 and m.kernel_size == (3, 3) for m in net.features if isinstance(m, torch.nn.Conv2d))
    pooled_first = MiniImageNetConvNet(pool_first=True)  # not the official net: test_review_qa22
    assert [type(m).__name__ for m in pooled_first.features] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] * 4
    assert pooled_first(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    with pytest.raises(ValueError, match="n_classes"):
        MiniImageNetConvNet(0)
    with pytest.raises(TypeError, match="pool_first"):
        MiniImageNetConvNet(pool_first=1)


def test_bad_input(root, tmp_path):
    with pytest.raises(ValueError, match="split"):
        MiniImageNet(root, "training")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        MiniImageNet(tmp_path, "train")
    (tmp_path / "train.csv").write_text("file,class\na.png,n1\n")
    with pytest.raises(ValueError, match="header"):
        MiniImageNet(tmp_path, "train")
    (tmp_path / "train.csv").write_text("filename,label\na.png\n")
    with pytest.raises(ValueError, match="expected 'filename,label'"):
        MiniImageNet(tmp_path, "train")
    (tmp_path / "train.csv").write_text("filename,label\na.png,n1\nb.png,n2\n")
    with pytest.raises(ValueError, match="has 1 images"):
        MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=1)
    d = MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=0)
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        d.sample(1)
    with pytest.raises(ValueError, match="need 5 classes"):
        MiniImageNet(root, "val", ways=5)
    with pytest.raises(ValueError, match="ways must be >= 2"):  # a 1-way task is always "right"
        MiniImageNet(root, "val", ways=1)
    # an image listed twice was counted twice: an episode could use it as support and as query
    (tmp_path / "train.csv").write_text("filename,label\na.png,n1\nb.png,n1\na.png,n1\nc.png,n2\nd.png,n2\n")
    with pytest.raises(ValueError, match=r"train.csv:4: image a.png is listed again \(first on line 2\)"):
        MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=1)
    with pytest.raises(ValueError, match="query_shots >= 1"):
        MiniImageNet(root, "val", ways=2, query_shots=0, image_size=SIZE).sample_episodes(1)


def test_a_class_shared_with_the_training_split_is_refused(root, tmp_path):
    """Test classes seen in meta-training were accepted silently (inflated accuracy)."""
    import shutil

    leak = tmp_path / "leak"
    shutil.copytree(root, leak)
    train = (leak / "train.csv").read_text()
    (leak / "train.csv").write_text(train + "n00700000000.png,n007\nn00700000001.png,n007\n")  # a test class
    for split in ("train", "test"):
        with pytest.raises(ValueError, match="train.csv and test.csv share 1 classes .e.g. n007."
                           if split == "train" else "test.csv and train.csv share 1 classes"):
            MiniImageNet(leak, split, ways=2, image_size=SIZE)
    MiniImageNet(leak, "val", ways=2, image_size=SIZE)  # val shares nothing
    (leak / "train.csv").unlink()
    MiniImageNet(leak, "test", ways=2, image_size=SIZE)  # nothing to compare with
