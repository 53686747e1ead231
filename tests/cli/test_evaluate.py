"""k-NN, linear probe, raw-pixel baseline and the encoder evaluation on synthetic features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tec_fast import BaseModel, ViTConfig
from tec_fast.evaluation.probe import (_pca_basis, evaluate_encoder, extract_features, knn_accuracy,
                               linear_probe_accuracy, pixel_baseline)


def clusters(n_per_class=40, classes=5, dim=24, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_separable_features_score_one():
    x, y = clusters()
    xt, yt = clusters(n_per_class=10, seed=0)
    assert knn_accuracy(x, y, xt, yt, k=20) == 1.0
    assert linear_probe_accuracy(x, y, xt, yt) == 1.0


def test_linearly_separable_but_not_clustered():
    """Classes by the sign of one coordinate among wide noise: the probe finds it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 50, generator=g)
    y = (x[:, 7] > 0).long()
    x[:, 7] += torch.where(y == 1, 1.0, -1.0)  # margin
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.95


def test_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(500, 32, generator=g), torch.randn(300, 32, generator=g)
    y, yt = torch.randint(0, 4, (500,), generator=g), torch.randint(0, 4, (300,), generator=g)
    assert abs(knn_accuracy(x, y, xt, yt) - 0.25) < 0.1
    assert abs(linear_probe_accuracy(x, y, xt, yt) - 0.25) < 0.1


def test_knn_weighting_and_numpy_inputs():
    # one very close neighbour of class 1 outweighs two distant ones of class 0
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]], dtype=np.float32)
    labels = np.array([1, 0, 0])
    query = np.array([[1.0, 0.01]], dtype=np.float32)
    assert knn_accuracy(train, labels, query, np.array([1]), k=3) == 1.0
    # k larger than the training set is clamped
    assert knn_accuracy(train, labels, query, np.array([1]), k=50) == 1.0


def test_input_validation():
    x, y = clusters()
    with pytest.raises(ValueError, match="dims"):
        knn_accuracy(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="negative labels"):
        linear_probe_accuracy(x, -torch.ones_like(y), x, y)


def test_pca_basis_orthonormal_and_top():
    g = torch.Generator().manual_seed(0)
    for n, d in ((300, 40), (40, 300)):
        x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)
        x = x - x.mean(0)
        b = _pca_basis(x, 10)
        torch.testing.assert_close(b.T @ b, torch.eye(10), atol=1e-4, rtol=0)
        var = (x @ b).var(0)
        assert (var[:-1] >= var[1:] - 1e-4).all()  # sorted by explained variance


def test_probe_reduces_wide_features():
    x, y = clusters(dim=600)
    xt, yt = clusters(n_per_class=10, dim=600)
    assert linear_probe_accuracy(x, y, xt, yt, max_dim=16) == 1.0


def test_pixel_baseline_runs():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(20)
    imgs = (torch.rand(80, 8, 8, 3, generator=g) * 60).to(torch.uint8)
    imgs[:, :4] += (y * 50).to(torch.uint8).view(-1, 1, 1, 1)  # class-dependent brightness, top half
    out = pixel_baseline(imgs[::2].numpy(), y[::2].numpy(), imgs[1::2].numpy(), y[1::2].numpy(), k=5)
    assert set(out) == {"knn", "linear"}
    assert all(0.0 <= v <= 1.0 for v in out.values()) and out["knn"] > 0.5


def test_evaluate_encoder_on_tensor_dataset():
    vit = ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    base = BaseModel(vit, topk=None)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(12)
    images = torch.randn(36, 3, 8, 8, generator=g) * 0.1 + y.view(-1, 1, 1, 1).float()
    ds = torch.utils.data.TensorDataset(images, y)
    seen = []
    feats, labels = extract_features(base, ds, batch_size=10, progress=lambda d, n: seen.append((d, n)))
    assert feats.shape == (36, 16) and torch.equal(labels, y)
    assert seen[0] == (0, 36) and seen[-1] == (36, 36)
    torch.testing.assert_close(feats, base.encode(images))
    out = evaluate_encoder(base, ds, ds, pool="cls", k=5)
    assert set(out) == {"knn", "linear"} and all(0.0 <= v <= 1.0 for v in out.values())
