"""The demo's digits model: accurate after seeded training, cached atomically, robust to a
corrupt cache."""
from __future__ import annotations

import pytest
import torch

from graphopt.cli import demo_model
from graphopt.cli.demo_model import CACHE_NAME, DigitsNet, accuracy, load_data, load_or_train


@pytest.fixture
def fake_train(monkeypatch):
    """Replace training by a quick random DigitsNet; ``calls`` counts trainings."""
    calls = []

    def train(seed=0, epochs=0):
        calls.append(seed)
        torch.manual_seed(seed)
        return DigitsNet().eval()

    monkeypatch.setattr(demo_model, "train", train)
    return calls


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_data_is_a_fixed_stratified_split():
    x_train, y_train, x_test, y_test = load_data()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and 0 <= x_train.min() and x_train.max() <= 1
    per_class = torch.bincount(torch.cat([y_train, y_test]))
    assert (torch.bincount(y_test) - per_class * 0.25).abs().max() <= 1
    assert torch.equal(x_test, load_data()[2])


def test_trained_model_is_accurate_and_cached(tmp_path):
    _, _, x_test, y_test = load_data()
    model = load_or_train(tmp_path)
    assert not model.training
    with torch.no_grad():
        assert accuracy(model(x_test), y_test) >= 0.95
    cached = tmp_path / CACHE_NAME
    mtime = cached.stat().st_mtime_ns
    assert same_weights(load_or_train(tmp_path), model)
    assert cached.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_NAME]


def test_second_call_loads_instead_of_training(tmp_path, fake_train):
    first = load_or_train(tmp_path)
    second = load_or_train(tmp_path)
    assert len(fake_train) == 1
    assert same_weights(first, second) and not second.training


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated", "wrong keys"])
def test_corrupt_cache_is_trained_over(tmp_path, fake_train, content):
    cached = tmp_path / CACHE_NAME
    if content == "truncated":
        torch.save(DigitsNet().state_dict(), cached)
        content = cached.read_bytes()[:200]
    elif content == "wrong keys":
        torch.save({"weight": torch.zeros(3)}, cached)
        content = cached.read_bytes()
    cached.write_bytes(content)
    model = load_or_train(tmp_path)
    assert len(fake_train) == 1
    assert cached.read_bytes() != content
    assert same_weights(load_or_train(tmp_path), model) and len(fake_train) == 1


def test_cache_dir_defaults_to_env_var(tmp_path, monkeypatch, fake_train):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    load_or_train()
    assert (tmp_path / "cache" / CACHE_NAME).is_file()


def test_unwritable_cache_warns_and_still_returns_the_model(tmp_path, fake_train):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="could not cache"):
        assert isinstance(load_or_train(blocker), DigitsNet)


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 1])) == 0.5
