"""Datasets for the demo: scikit-learn's bundled digits (no download) and CIFAR-10 from a local
``cifar-10-batches-py`` folder (no torchvision needed)."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


@dataclass
class Split:
    """Normalised images ``[N, C, H, W]`` (float32) and labels ``[N]`` (int64)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.numel()


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Split, Split, int]:
    """scikit-learn's 8x8 digits, split reproducibly; returns ``(train, test, n_classes)``."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Split(x[train], y[train]), Split(x[test], y[test]), 10


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10: missing {path} (expected the standard "
                                f"'cifar-10-batches-py' folder)")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed file
        raise ValueError(f"CIFAR-10: {path} is not a valid CIFAR-10 python batch ({e})") from e
    if len(labels) != len(data):
        raise ValueError(f"CIFAR-10: {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(data_dir: str | Path) -> tuple[Split, Split, int]:
    """CIFAR-10 from ``data_dir`` (the ``cifar-10-batches-py`` folder or its parent)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10: data dir {root} does not exist")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def load(names):
        parts = [_read_cifar_batch(root / n) for n in names]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255.0
        return x, torch.from_numpy(np.concatenate([p[1] for p in parts]))

    xtr, ytr = load(CIFAR_TRAIN)
    xte, yte = load(CIFAR_TEST)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return Split((xtr - mean) / std, ytr), Split((xte - mean) / std, yte), 10


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> tuple[Split, Split, int]:
    """``digits`` or ``cifar10`` (which needs ``data_dir``)."""
    if name == "digits":
        return load_digits(seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--dataset cifar10 needs --data-dir pointing at cifar-10-batches-py")
        return load_cifar10(data_dir)
    raise ValueError(f"dataset must be 'digits' or 'cifar10', got {name!r}")


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None):
    """Minibatches of ``split``; shuffled when a generator is given."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield split.x[idx], split.y[idx]
