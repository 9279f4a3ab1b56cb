"""Shared fixtures: tiny datasets in torchvision's real on-disk formats, a tiny encoder, a script runner."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.datasets.cifar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread, here and in every script a test runs: the tensors of the tests are tiny, and a second thread
# mostly spins (CPU time that the suite's budget counts), more so on shared cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def class_images(rng, labels, size):
    """uint8 (N, size, size, 3) images whose mean colour depends on the class, so a probe has something to learn."""
    base = np.array([[40 + 20 * (c % 10), 200 - 15 * (c % 10), 30 * (c % 7)] for c in labels], dtype=np.float32)
    noise = rng.normal(0, 30, size=(len(labels), size, size, 3))
    return np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar10(root, n_train=50, n_test=20, seed=0):
    """A tiny CIFAR-10 as torchvision reads it: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta},
    pickled dicts with 'data' (N, 3072) uint8 in CHW order and 'labels'."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, n):
        labels = [i % 10 for i in range(n)]
        images = class_images(rng, labels, 32).transpose(0, 3, 1, 2).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, "labels": labels, "batch_label": name}, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", n_train // 5)
    dump("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": n_train // 5}, f)
    return Path(root)


def write_folder(root, classes=3, n_train=8, n_val=4, size=40, seed=0):
    """<root>/train/<class>/*.png and <root>/val/<class>/*.png, as ImageFolder reads them."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = Path(root) / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(class_images(rng, [c] * n, size)):
                Image.fromarray(img).save(d / f"{i}.png")
    return Path(root)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture
def no_md5(monkeypatch):
    """Bypass only torchvision's MD5 check of the CIFAR files (our tiny files cannot match the real checksums)."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


RUNNER = ("import sys, runpy, torchvision.datasets.cifar as c; c.check_integrity = lambda *a, **k: True; "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_script(script, *args, timeout=600):
    """Run one of our scripts as a user would, with torchvision's CIFAR MD5 check bypassed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", RUNNER, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class TinyEncoder(nn.Module):
    """A two-layer conv net standing in for the ResNet in fast tests (any encoder works through the Python API)."""

    def __init__(self, dim=16, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), norm(8), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)
