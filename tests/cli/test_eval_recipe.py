"""The numbers of the evaluation protocols, pinned against the published recipes (DINO's weighted
k-NN, MAE's ``main_linprobe.py`` / ``main_finetune.py`` / FINETUNE.md, timm's RandAugment and
Mixup) with expected values written out here or computed independently (float64, PIL)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from tec_fast import ViTConfig
from tec_fast.evaluation import augment
from tec_fast.evaluation.augment import MixupCutmix, RandAugment, TrainTransform
from tec_fast.evaluation.finetune import FinetuneModel, layer_decay_optimizer
from tec_fast.evaluation.lars import LARS
from tec_fast.evaluation.linprobe import LinearProbeModel, lars_optimizer
from tec_fast.evaluation.probe import knn_accuracy, linear_probe_accuracy
from tec_fast.evaluation.protocol import RECIPES, build_training, recipe, run_protocol
from tec_fast.models.base import BaseModel
from tec_fast.training.optim import set_lr

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _at_cosine(s: float, angle: float) -> list:
    """A unit vector of R^3 at cosine ``s`` to e1."""
    r = math.sqrt(1.0 - s * s)
    return [s, r * math.cos(angle), r * math.sin(angle)]


# ------------------------------------------------------------------------------ quick probe
def test_knn_votes_use_temperature_0_07():
    """Guards against the k-NN vote temperature not being DINO's 0.07 (a flatter vote)."""
    query = torch.tensor([[1.0, 0.0, 0.0]])
    s = math.sqrt(0.19)
    train = torch.tensor([[1.0, 0.0, 0.0], [0.9, s, 0.0], [0.9, -s, 0.0]])
    labels = torch.tensor([1, 0, 0])
    # T = 0.07: exp(1/T) = 4.17 exp(0.9/T) > 2 exp(0.9/T): the single closer vector wins;
    # at T = 0.7 it would be 1.15 exp(0.9/T) < 2 exp(0.9/T)
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3) == 1.0
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=3) == 0.0


def test_knn_default_k_is_20():
    """Guards against the k-NN default k not being the documented 20."""
    # cosines to the query: class 0 x8 at 0.504, class 2 x3 at 0.503, class 1 x8 at 0.502, the 20th
    # (class 1) at 0.501, then class 0 at 0.500 and below. In units of exp(0.5 / 0.07): k = 19 gives
    # class 0 8 x 1.0588 = 8.47 > class 1 8 x 1.0290 = 8.23; k = 20 adds 1.0144 to class 1 (9.25);
    # k = 21 adds 1.0 to class 0 (9.47). Only k = 20 picks class 1.
    sims = [(0.504, 0)] * 8 + [(0.503, 2)] * 3 + [(0.502, 1)] * 8 + [(0.501, 1)] + [(0.500, 0)] * 10 \
        + [(0.2, 0)] * 10
    train = torch.tensor([_at_cosine(s, 0.37 * i) for i, (s, _) in enumerate(sims)], dtype=torch.float32)
    labels = torch.tensor([c for _, c in sims])
    query, truth = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1])
    assert knn_accuracy(train, labels, query, truth, k=19) == 0.0  # the construction is tight
    assert knn_accuracy(train, labels, query, truth, k=21) == 0.0
    assert knn_accuracy(train, labels, query, truth, k=20) == 1.0
    assert knn_accuracy(train, labels, query, truth) == 1.0  # the default


def test_linear_probe_standardises_features():
    """Guards against the L-BFGS probe fitting raw features (a tiny informative column is lost)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.randn(400, 20, generator=g, dtype=torch.float64) * 100.0
    x[:, 7] = (2.0 * y - 1.0) * 1e-3  # the only informative column, +-1e-3 by label
    acc = linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert acc > 0.95, acc


def test_linear_probe_picks_the_weight_decay_on_the_hold_out():
    """Guards against the probe's weight-decay grid search being ignored (one fixed value used)."""
    g = torch.Generator().manual_seed(0)
    # separable clusters, 3:1 imbalanced in training: a huge L2 (1e3) leaves only the bias, which
    # predicts the majority class; a small one separates the clusters
    def clusters(n0, n1):
        y = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
        centres = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
        return centres[y] + 0.1 * torch.randn(len(y), 4, generator=g), y
    train_x, train_y = clusters(300, 100)
    test_x, test_y = clusters(50, 50)
    for grid in ((1e-4, 1e3), (1e3, 1e-4)):
        acc = linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decays=grid)
        assert acc == 1.0, (grid, acc)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decays=(1e3,)) <= 0.6  # tight


# ------------------------------------------------------------------------------ linear probe
def test_lars_defaults_are_maes():
    """Guards against LARS defaults drifting from MAE's (trust 0.001, momentum 0.9, no decay)."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, dtype=torch.float64)
    grad = torch.randn(4, 3, dtype=torch.float64)

    def direct():
        w = nn.Parameter(w0.clone())
        return w, LARS([w], lr=0.5)

    def protocol():  # the linear probe's optimizer, as fit builds it
        head = nn.Linear(3, 4, bias=False).double()
        head.weight.data.copy_(w0)
        return head.weight, lars_optimizer()(head, 0.5)[0]

    for make in (direct, protocol):
        w, opt = make()
        expect, mu = w0.clone(), torch.zeros_like(w0)
        for _ in range(2):
            w.grad = grad.clone()
            opt.step()
            u = grad * (0.001 * expect.norm() / grad.norm())  # weight decay 0, trust 0.001
            mu = 0.9 * mu + u
            expect = expect - 0.5 * mu
        torch.testing.assert_close(w.detach(), expect, rtol=0, atol=1e-12)


def test_linear_probe_head_is_bn_without_affine_then_linear():
    """Guards against the probe's BatchNorm getting trainable affine parameters (MAE's has none)."""
    torch.manual_seed(0)
    model = LinearProbeModel(BaseModel(VIT, topk=None), num_classes=5)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"]
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bn) == 1 and bn[0].weight is None and bn[0].bias is None and not bn[0].affine
    assert bn[0].eps == 1e-6
    # the forward normalises the features per dimension over the batch, no scale or shift
    x = torch.randn(6, 32, dtype=torch.float64)
    expect = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(bn[0].double().train()(x), expect, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------ fine-tuning
def test_finetune_objective_label_smoothing_without_mixing():
    """Guards against label smoothing 0.1 being dropped when mixup and cutmix are off."""
    r = recipe("finetune", mixup=0.0, cutmix=0.0, drop_path=0.0)
    _, objective, _ = build_training("finetune", 7, r, MEAN, STD)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * 3.0
    labels = torch.tensor([0, 3, 6, 2, 3])
    loss = objective(nn.Identity(), (logits, labels), None)["loss"]
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp[torch.arange(5), labels]
    expect = (0.9 * nll + 0.1 * (-logp.mean(dim=-1))).mean()
    assert abs(float(loss) - float(expect)) <= 1e-6, (float(loss), float(expect))
    assert abs(float(expect) - float(nll.mean())) > 1e-2  # smoothing makes a difference here


def test_recipes_pin_every_field():
    """Guards against any number of the linear-probe or fine-tune recipe changing unnoticed."""
    assert RECIPES["linprobe"].to_dict() == {
        "epochs": 90, "batch_size": 16384, "accum": 1, "blr": 0.1, "lr": None, "min_lr": 0.0,
        "warmup_epochs": 10, "weight_decay": 0.0, "pool": "cls", "crop_scale": 0.08, "layer_decay": 1.0,
        "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0, "randaug_n": 0, "randaug_m": 0.0,
        "randaug_mstd": 0.0, "reprob": 0.0}
    assert RECIPES["finetune"].to_dict() == {
        "epochs": 100, "batch_size": 1024, "accum": 1, "blr": 5e-4, "lr": None, "min_lr": 1e-6,
        "warmup_epochs": 5, "weight_decay": 0.05, "pool": "mean", "crop_scale": 0.08, "layer_decay": 0.65,
        "drop_path": 0.1, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "randaug_n": 2, "randaug_m": 9.0,
        "randaug_mstd": 0.5, "reprob": 0.25}
    assert recipe("linprobe") == RECIPES["linprobe"] and recipe("finetune") == RECIPES["finetune"]


def test_finetune_head_init_std_2e_5():
    """Guards against the fine-tune head starting other than MAE's N(0, 2e-5), or a non-zero bias."""
    torch.manual_seed(0)
    model = FinetuneModel(BaseModel(VIT, topk=None), num_classes=1000, drop_path=0.0)
    w = model.head.weight.detach().double()
    assert w.numel() == 32000
    # timm's trunc_normal_(std=2e-5) cuts at +-2 (absolute): a plain N(0, 2e-5); cut at 2 std the
    # std would be 1.76e-5 and nothing would lie past 4e-5
    assert 1.9e-5 < float(w.std()) < 2.1e-5, float(w.std())
    assert 6e-5 < float(w.abs().max()) <= 1.2e-4  # 3 to 6 std of N(0, 2e-5)
    assert abs(float(w.mean())) < 1e-6
    assert torch.count_nonzero(model.head.bias) == 0


def test_set_lr_applies_each_groups_lr_scale():
    """Guards against set_lr dropping the per-group lr_scale (no layer-wise lr decay)."""
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.25}, {"params": [b], "lr_scale": 1.0},
                           {"params": [c]}], lr=0.5)
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 1e-3, 1e-3], rel=1e-12, abs=0)


def test_finetune_optimizer_decays_lr_by_layer():
    """Guards against the fine-tune optimizer's lrs not following MAE's 0.65 ** (depth + 1 - layer)."""
    torch.manual_seed(0)
    vit3 = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    model = FinetuneModel(BaseModel(vit3, topk=None), num_classes=4, drop_path=0.0)
    opt, _ = layer_decay_optimizer()(model, 1e-3)
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {  # depth 3: embeddings layer 0, block i layer i + 1, head / fc_norm layer 4
        "encoder.patch_embed.proj.weight": 1e-3 * 0.65 ** 4, "encoder.cls_token": 1e-3 * 0.65 ** 4,
        "encoder.pos_embed": 1e-3 * 0.65 ** 4,
        "encoder.blocks.0.attn.qkv.weight": 1e-3 * 0.65 ** 3, "encoder.blocks.1.norm1.weight": 1e-3 * 0.65 ** 2,
        "encoder.blocks.2.mlp.fc2.weight": 1e-3 * 0.65, "head.weight": 1e-3, "head.bias": 1e-3,
        "fc_norm.weight": 1e-3}
    for name, lr in expect.items():
        assert lr_of[id(named[name])] == pytest.approx(lr, rel=1e-9, abs=0), name


class _StopFit(Exception):
    pass


@pytest.mark.parametrize("protocol", ["linprobe", "finetune"])
def test_run_protocol_passes_the_recipe_to_fit(monkeypatch, protocol):
    """Guards against run_protocol handing fit another lr floor, warmup, weight decay or base lr."""
    import tec_fast.training as training
    seen = {}

    def fake_fit(model, objective, dataset, cfg, **kw):
        seen["cfg"] = cfg
        raise _StopFit

    monkeypatch.setattr(training, "fit", fake_fit)
    torch.manual_seed(0)
    data = [(torch.randn(3, 32, 32), i % 3) for i in range(8)]
    r = recipe(protocol, batch_size=4, epochs=3, blr=7e-4, min_lr=3e-6, warmup_epochs=1.5, weight_decay=0.07)
    with pytest.raises(_StopFit):
        run_protocol(protocol, BaseModel(VIT, topk=None), data, data, 3, r, MEAN, STD,
                     {"device": "cpu", "output_dir": None, "seed": 0})
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.batch_size, cfg.accum, cfg.blr, cfg.lr, cfg.min_lr, cfg.warmup_epochs,
            cfg.weight_decay) == (3, 4, 1, 7e-4, None, 3e-6, 1.5, 0.07)
    # and the paper's values when nothing is overridden but the batch
    r = recipe(protocol, batch_size=4)
    with pytest.raises(_StopFit):
        run_protocol(protocol, BaseModel(VIT, topk=None), data, data, 3, r, MEAN, STD,
                     {"device": "cpu", "output_dir": None, "seed": 0})
    cfg = seen["cfg"]
    want = {"linprobe": (90, 0.1, 0.0, 10, 0.0), "finetune": (100, 5e-4, 1e-6, 5, 0.05)}[protocol]
    assert (cfg.epochs, cfg.blr, cfg.min_lr, cfg.warmup_epochs, cfg.weight_decay) == want


# ------------------------------------------------------------------------------ augmentation
def _smooth_image(size=64):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * xx) * np.cos(np.pi * yy),
                    0.5 + 0.3 * np.cos(2 * np.pi * yy + 0.5),
                    0.5 + 0.3 * np.sin(np.pi * (xx + yy))], axis=-1)
    return (img * 255).round().astype(np.uint8)


def _geometric_op(monkeypatch, op, level, sign):
    monkeypatch.setattr(augment, "_sign", lambda: sign)
    a = _smooth_image()
    ra = RandAugment(fill=(128 / 255,) * 3)
    img = torch.from_numpy(a).permute(2, 0, 1).float() / 255.0
    return (getattr(ra, op)(img, level) * 255).permute(1, 2, 0).numpy()


def _pair_error(monkeypatch, op, level, pil_of_signed):
    """Mean abs difference (grey levels) of the op at sign +1 / -1 against PIL's transform of the
    signed magnitude, over the central disc; the better of the two sign pairings (timm's sign is
    random)."""
    a = _smooth_image()
    n = a.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    disc = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 <= (0.3 * n) ** 2
    outs = {s: _geometric_op(monkeypatch, op, level, s) for s in (1.0, -1.0)}
    refs = {s: np.asarray(pil_of_signed(a, s)).astype(np.float64) for s in (1.0, -1.0)}
    err = lambda o, p: float(np.abs(o - p)[disc].mean())  # noqa: E731
    return min(err(outs[1.0], refs[1.0]) + err(outs[-1.0], refs[-1.0]),
               err(outs[1.0], refs[-1.0]) + err(outs[-1.0], refs[1.0])) / 2


def test_randaugment_rotate_is_30_degrees_at_full_level(monkeypatch):
    """Guards against RandAugment's rotation not reaching timm's 30 degrees x level."""
    Image = pytest.importorskip("PIL.Image")
    for level in (1.0, 0.6):
        e = _pair_error(monkeypatch, "rotate", level, lambda a, s: Image.fromarray(a).rotate(
            30.0 * level * s, resample=Image.BILINEAR, fillcolor=(128, 128, 128)))
        assert e < 1.0, (level, e)


def test_randaugment_shear_is_0_3_at_full_level(monkeypatch):
    """Guards against RandAugment's shear not being timm's: factor 0.3 x level, about the top-left
    corner (PIL AFFINE (1, k, 0, 0, 1, 0), which maps output pixels to input ones)."""
    Image = pytest.importorskip("PIL.Image")
    n = 64
    for op in ("shear_x", "shear_y"):
        def pil(a, s, op=op):
            k = 0.3 * s
            data = (1, k, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, k, 1, 0)
            return Image.fromarray(a).transform((n, n), Image.AFFINE, data, resample=Image.BILINEAR,
                                                fillcolor=(128, 128, 128))
        e = _pair_error(monkeypatch, op, 1.0, pil)
        assert e < 1.0, (op, e)


def test_randaugment_translate_is_0_45_of_the_size_at_full_level(monkeypatch):
    """Guards against RandAugment's translation not being timm's 0.45 x size x level."""
    Image = pytest.importorskip("PIL.Image")
    n = 64
    for op in ("translate_x", "translate_y"):
        def pil(a, s, op=op):
            t = 0.45 * 0.5 * n * s
            data = (1, 0, t, 0, 1, 0) if op == "translate_x" else (1, 0, 0, 0, 1, t)
            return Image.fromarray(a).transform((n, n), Image.AFFINE, data, resample=Image.BILINEAR,
                                                fillcolor=(128, 128, 128))
        e = _pair_error(monkeypatch, op, 0.5, pil)
        assert e < 1.0, (op, e)


def test_randaugment_level_is_magnitude_over_10(monkeypatch):
    """Guards against RandAugment mapping magnitude m to a level other than m / 10."""
    for m, level in ((9.0, 0.9), (5.0, 0.5), (10.0, 1.0)):
        ra = RandAugment(num_ops=2, magnitude=m, magnitude_std=0.0, prob=1.0)
        levels = []
        for op in RandAugment.OPS:
            monkeypatch.setattr(ra, op, lambda img, lv: (levels.append(lv), img)[1], raising=False)
        torch.manual_seed(0)
        for _ in range(20):
            ra(torch.rand(3, 8, 8))
        assert len(levels) == 40
        assert all(abs(lv - level) < 1e-12 for lv in levels), (m, set(levels))


def test_mixup_cutmix_switches_half_the_time():
    """Guards against the mixup / cutmix switch probability being ignored (always cutmix or mixup)."""
    mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1)
    images = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    labels = torch.tensor([0, 1])
    cut = 0
    for seed in range(1000):
        out, _ = mix(images, labels, np.random.default_rng(seed))
        pure = bool(((out == 0) | (out == 1)).all())  # cutmix pastes pixels; mixup blends them all
        cut += pure
    assert 0.45 <= cut / 1000 <= 0.55, cut


def test_randaugment_contrast_matches_pil(monkeypatch):
    """Guards against contrast blending toward the plain mean instead of PIL's grey-level mean."""
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    rng = np.random.default_rng(0)
    a = np.zeros((16, 16, 3), dtype=np.uint8)  # strongly blue: luma mean far below the plain mean
    a[..., 2] = rng.integers(150, 256, (16, 16))
    a[..., 0] = rng.integers(0, 40, (16, 16))
    a[..., 1] = rng.integers(0, 40, (16, 16))
    img = torch.from_numpy(a).permute(2, 0, 1).float() / 255.0
    for sign in (1.0, -1.0):
        monkeypatch.setattr(augment, "_sign", lambda: sign)
        for level in (0.6, 1.0):
            expect = np.asarray(ImageEnhance.Contrast(Image.fromarray(a)).enhance(1.0 + 0.9 * level * sign))
            got = (RandAugment.contrast(img, level) * 255).round().permute(1, 2, 0).numpy()
            diff = np.abs(got.astype(int) - expect.astype(int)).max()
            assert diff <= 2, (sign, level, diff)


def test_train_transform_flips_horizontally():
    """Guards against the protocols' training view flipping vertically instead of horizontally."""
    x = torch.randn(3, 16, 16)
    t = TrainTransform(MEAN, STD, crop_scale=(1.0, 1.0))
    kinds = set()
    for seed in range(50):
        torch.manual_seed(seed)
        out = t(x)
        if torch.allclose(out, x, rtol=0, atol=1e-4):
            kinds.add("same")
        elif torch.allclose(out, x.flip(-1), rtol=0, atol=1e-4):
            kinds.add("mirrored")
        else:
            pytest.fail(f"seed {seed}: neither the image nor its left-right mirror")
    assert kinds == {"same", "mirrored"}
