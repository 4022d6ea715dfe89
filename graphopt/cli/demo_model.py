"""The example model of ``graphopt demo``: a small CNN for scikit-learn's bundled digits.

The digits dataset (1797 8x8 grayscale images, 10 classes) ships with scikit-learn, so
nothing is downloaded. Training is seeded and takes a few seconds on a CPU; the trained
weights are cached so later runs start at once.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from graphopt.emit import install, staging_dir

CACHE_NAME = "digits_net-v1.pt"     # bump the version when DigitsNet or train() changes


class DigitsNet(nn.Module):
    """N x 1 x 8 x 8 images in [0, 1] -> N x 10 logits; has BatchNorm and Dropout to fold
    and remove."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Dropout(0.25), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images N x 1 x 8 x 8 float32 in [0, 1],
    int64 labels; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def train(seed: int = 0, epochs: int = 15) -> DigitsNet:
    """A DigitsNet trained on the training split with Adam; returned in eval mode."""
    torch.manual_seed(seed)
    model = DigitsNet()
    _fit(model, epochs, 3e-3, seed)
    return model.eval()


def finetune(model: nn.Module, *, epochs: int = 8, seed: int = 0) -> None:
    """Train ``model`` (the demo's pruned graph, say) further on the training split: the
    demo pipeline's ``finetune`` step, ``data={"train": finetune}``."""
    _fit(model, epochs, 1e-3, seed)


def _fit(model: nn.Module, epochs: int, lr: float, seed: int) -> None:
    """Adam with a cosine schedule over seeded batches of 32, in train mode.

    Runs on one thread: faster for a model this small (several times so on a busy
    machine) and the same weights for a seed whatever the core count.
    """
    x_train, y_train, _, _ = load_data(seed)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x_train), generator=shuffle).split(32):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                loss.backward()
                optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)


def default_cache_dir() -> Path:
    """``$GRAPHOPT_CACHE`` if set, else ``~/.cache/graphopt``."""
    return Path(os.environ.get("GRAPHOPT_CACHE") or "~/.cache/graphopt").expanduser()


def load_or_train(cache_dir: Path | None = None) -> DigitsNet:
    """The trained DigitsNet (eval mode): loaded from ``cache_dir / CACHE_NAME``, or
    trained and cached there when that file is missing or unreadable."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME
    model = DigitsNet()
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError):
        pass                                           # missing or corrupt: train over it
    model = train()
    try:
        with staging_dir(path.parent) as tmp:
            torch.save(model.state_dict(), tmp / CACHE_NAME)
            install(tmp / CACHE_NAME, path)
    except OSError as e:
        warnings.warn(f"could not cache the demo model at {path}: {e}", stacklevel=2)
    return model


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax of ``logits`` equals the label in ``y``."""
    return (logits.argmax(dim=1) == y).double().mean().item()


def unlabeled_digits() -> torch.Tensor:
    """The training split's images, without labels: the demo's ``graphopt tune --data``."""
    return load_data()[0]


def held_out_accuracy(runner) -> float:
    """Top-1 accuracy of an artifact's runner on the held-out digits (fed one at a time, as artifacts have a
    batch of 1): the demo's ``graphopt tune --eval``."""
    _, _, x_test, y_test = load_data()
    return accuracy(torch.cat([runner([x_test[i:i + 1]])[0] for i in range(len(x_test))]), y_test)
