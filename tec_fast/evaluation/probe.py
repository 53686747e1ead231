"""Frozen-feature evaluation: weighted k-NN and a linear probe (accuracies in [0, 1]).

- k-NN: DINO's weighted k-NN. Cosine similarity to every training feature; the k nearest vote
  for their label with weight exp(similarity / T), T = 0.07; the class with the largest summed
  weight wins.
- Linear probe: features standardised with the training statistics, projected onto the top 256
  principal components of the training set when they are wider (a 3072-dim raw-pixel probe took
  161 s with a generic solver), then multinomial logistic regression fitted full-batch with
  torch's L-BFGS. Its L2 strength is picked from a small grid on a stratified 20% hold-out of
  the training set, then the probe is refitted on the whole training set. Small CPU problems
  (the demo) run on one intra-op thread: much faster on shared cores.
Both run on the device of the features they are given.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

KNN_TEMPERATURE = 0.07
PROBE_MAX_DIM = 256
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)

Progress = Callable[[int, int], None]  # (done, total)


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature matrix, got shape {tuple(t.shape)}")
    return t.float()


def _as_labels(y, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().flatten()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} labels for {n} feature rows")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} holds negative labels (an unlabeled folder?); evaluation needs classes")
    return t


def _check_pair(train_f, train_y, test_f, test_y):
    train_f, test_f = _as_features(train_f, "train_f"), _as_features(test_f, "test_f")
    if train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"train_f has {train_f.shape[1]} dims but test_f has {test_f.shape[1]}")
    if train_f.shape[0] == 0 or test_f.shape[0] == 0:
        raise ValueError("train_f and test_f must each hold at least one row")
    test_f = test_f.to(train_f.device)
    train_y = _as_labels(train_y, train_f.shape[0], "train_y").to(train_f.device)
    test_y = _as_labels(test_y, test_f.shape[0], "test_y").to(train_f.device)
    return train_f, train_y, test_f, test_y


def whole_dataset(dataset):
    """The dataset a Subset (``--n-train`` / ``--n-test``) is of, or ``dataset`` itself."""
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def split_folder(dataset) -> str:
    """`` under 'ROOT'`` for an image dataset (or a Subset of one), '' for in-memory data: which
    split a message is about."""
    root = getattr(whole_dataset(dataset), "root", None)
    return f" under {root!r}" if root else ""


@torch.no_grad()
def extract_features(base_model, dataset, batch_size: int = 256, pool: str = "mean",
                     num_workers: int = 0, progress: Optional[Progress] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``base_model.encode`` over a dataset of (image, label) items, in order, on the model's
    device. Returns (features [N, C] fp32 on CPU, labels [N] int64). Items that are ``None`` (the
    unreadable images of a ``drop_unreadable`` dataset) are left out, so N counts the readable
    ones; ValueError when none is."""
    from tec_fast.data.dataset import collate_readable

    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    param = next(base_model.parameters())
    device, dtype = param.device, param.dtype
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, collate_fn=collate_readable)
    feats, labels, done, total = [], [], 0, len(dataset)
    if progress is not None:
        progress(0, total)
    for batch in loader:
        done = min(done + batch_size, total)  # images read, the unreadable ones included
        if batch is not None:
            images, y = batch
            images = images.to(device, dtype=dtype, non_blocking=True)
            feats.append(base_model.encode(images, pool=pool).float().cpu())
            labels.append(torch.as_tensor(y).long())
        if progress is not None:
            progress(done, total)
    if not feats:
        raise ValueError(f"none of the {total} images{split_folder(dataset)} is readable: no features to "
                         f"evaluate")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20,
                 temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Weighted k-NN top-1 accuracy (DINO's: cosine similarity, votes exp(sim / T))."""
    train_f, train_y, test_f, test_y = _check_pair(train_f, train_y, test_f, test_y)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(k, train_f.shape[0])
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(train_f, dim=1)
    correct = 0
    for start in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[start:start + chunk], dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)       # [n, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_y[start:start + chunk]).sum())
    return correct / test_f.shape[0]


def _pca_basis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Top-``dim`` principal directions of centred rows x [N, D] -> [D, dim]: exact, from the
    smaller of the two Gram matrices (formed in fp32, decomposed in fp64)."""
    n, d = x.shape
    if d <= n:
        evals, evecs = torch.linalg.eigh((x.T @ x).double())  # ascending
        return evecs[:, -dim:].flip(1).float()
    evals, evecs = torch.linalg.eigh((x @ x.T).double())
    evals, evecs = evals[-dim:].flip(0), evecs[:, -dim:].flip(1)
    return ((x.T.double() @ evecs) / evals.clamp_min(1e-12).sqrt()).float()


SMALL_PROBLEM = 1 << 25  # feature-matrix elements below which the probe runs on one CPU thread


@contextlib.contextmanager
def _one_cpu_thread_if_small(x: torch.Tensor):
    """A small probe (PCA + thousands of tiny L-BFGS ops) is dominated by per-op overhead, which
    intra-op threads on CPU only add to (each op pays for waking and joining the threads, worse
    when the cores are shared). The previous setting is restored."""
    if x.device.type != "cpu" or x.numel() > SMALL_PROBLEM:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                max_iter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + weight_decay/2 * |W|^2, L-BFGS."""
    W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _holdout_split(y: torch.Tensor, fraction: float = 0.2, seed: int = 0):
    """Stratified split of row indices (fit, hold-out); classes with one example stay in fit."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        where = torch.nonzero(y == c).flatten()
        where = where[torch.randperm(len(where), generator=g).to(where.device)]
        n_held = int(len(where) * fraction) if len(where) > 1 else 0
        held.append(where[:n_held])
        fit.append(where[n_held:])
    return torch.cat(fit), torch.cat(held)


def linear_probe_accuracy(train_f, train_y, test_f, test_y, max_dim: int = PROBE_MAX_DIM,
                          weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
                          max_iter: int = 300) -> float:
    """Linear-probe top-1 accuracy: standardise, PCA to ``max_dim`` when wider, logistic
    regression (L-BFGS) with its weight decay chosen on a hold-out of the training set."""
    train_f, train_y, test_f, test_y = _check_pair(train_f, train_y, test_f, test_y)
    with _one_cpu_thread_if_small(train_f):
        return _linear_probe(train_f, train_y, test_f, test_y, max_dim, list(weight_decays), max_iter)


def _linear_probe(train_f, train_y, test_f, test_y, max_dim, weight_decays, max_iter) -> float:
    mean, std = train_f.mean(dim=0), train_f.std(dim=0, unbiased=False).clamp_min(1e-6)
    train_x, test_x = (train_f - mean) / std, (test_f - mean) / std
    if max_dim and train_x.shape[1] > max_dim:
        basis = _pca_basis(train_x, min(max_dim, train_x.shape[0]))
        train_x, test_x = train_x @ basis, test_x @ basis
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if len(weight_decays) > 1:
        fit, held = _holdout_split(train_y)
        if len(held):
            scores = []
            for wd in weight_decays:
                W, b = _fit_logreg(train_x[fit], train_y[fit], num_classes, wd, max_iter)
                scores.append(float(((train_x[held] @ W + b).argmax(1) == train_y[held]).float().mean()))
            best = max(scores)  # ties: the weakest of the best decays, in whatever order they were given
            weight_decays = [min(wd for wd, score in zip(weight_decays, scores) if score == best)]
    W, b = _fit_logreg(train_x, train_y, num_classes, weight_decays[0], max_iter)
    return float(((test_x @ W + b).argmax(dim=1) == test_y).float().mean())


def pixel_baseline(train_images, train_labels, test_images, test_labels,
                   k: int = 20) -> Dict[str, float]:
    """k-NN and linear probe on raw pixels (any [N, ...] arrays, e.g. ``demo_arrays()``'s uint8
    [N, 32, 32, 3]: ``pixel_baseline(*demo_arrays(seed))``). Pixels are first centred and scaled
    with the training statistics, per channel for channels-last [N, H, W, 1|3] arrays (the
    normalisation the models see), else over all values; the probe then standardises per pixel
    and reduces with PCA like any other features."""
    train = torch.as_tensor(np.asarray(train_images)).float()
    test = torch.as_tensor(np.asarray(test_images)).float()
    if train.dim() < 2 or tuple(train.shape[1:]) != tuple(test.shape[1:]):
        raise ValueError(f"train_images {tuple(train.shape)} and test_images {tuple(test.shape)} "
                         f"must be [N, ...] arrays with the same per-image shape")
    channels_last = train.dim() == 4 and train.shape[-1] in (1, 3)
    axes = tuple(range(train.dim() - 1)) if channels_last else tuple(range(train.dim()))
    mean, std = train.mean(dim=axes), train.std(dim=axes).clamp_min(1e-6)
    train_f = ((train - mean) / std).reshape(train.shape[0], -1)
    test_f = ((test - mean) / std).reshape(test.shape[0], -1)
    return {"knn": knn_accuracy(train_f, train_labels, test_f, test_labels, k=k),
            "linear": linear_probe_accuracy(train_f, train_labels, test_f, test_labels)}


def evaluate_encoder(base_model, train_ds, test_ds, pool: str = "mean", k: int = 20,
                     batch_size: int = 256, num_workers: int = 0,
                     progress: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, float]:
    """Frozen features of both splits, then {'knn': weighted k-NN, 'linear': linear probe}.
    ``progress(split, done, total)`` is called after every batch, split in {'train', 'test'}."""
    feats = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        cb = (lambda done, total, s=split: progress(s, done, total)) if progress else None
        feats[split] = extract_features(base_model, ds, batch_size=batch_size, pool=pool,
                                        num_workers=num_workers, progress=cb)
    device = next(base_model.parameters()).device  # k-NN and probe where the model runs (GPU: fast)
    (tr_f, tr_y), (te_f, te_y) = [(f.to(device), y.to(device)) for f, y in (feats["train"], feats["test"])]
    return {"knn": knn_accuracy(tr_f, tr_y, te_f, te_y, k=k),
            "linear": linear_probe_accuracy(tr_f, tr_y, te_f, te_y)}
