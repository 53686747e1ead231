"""Checkpoint layouts of docs/tec.md §5 (state dicts built here), error messages, round trips."""
import argparse
import errno
import os
import pathlib
import warnings

import pytest
import torch

from tec_fast import BaseModel, TECConfig, TECModel, ViTConfig
from tec_fast.checkpoint import clean_stale_temp_files, export_timm, read_checkpoint, save_atomic
from tec_fast.checkpoint import io as ckpt_io

VIT = ViTConfig(16, 4, 32, 2, 2)


def _base_sd(seed=0):
    torch.manual_seed(seed)
    b = BaseModel(VIT, topk=3)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return b, {k: v.clone() for k, v in b.state_dict().items()}


def _same_targets(a, b, x):
    ta, tb = a(x), b(x)
    torch.testing.assert_close(ta.features, tb.features)
    torch.testing.assert_close(ta.relation, tb.relation)
    assert torch.equal(ta.topk_idx, tb.topk_idx)


def test_mae_release_layout():
    ref, sd = _base_sd()
    # MAE's release: {'model': ...}; a full MAE checkpoint would also carry decoder_* keys
    ck = {"model": dict(sd, **{"decoder_embed.weight": torch.zeros(4, 32), "mask_token": torch.zeros(1, 1, 4)})}
    b = BaseModel(VIT, topk=3)
    with pytest.warns(UserWarning, match="ignored: decoder_embed.weight"):
        report = b.load_checkpoint(ck)
    assert "mask_token" in report.ignored and not report.unexpected
    _same_targets(ref, b, torch.randn(2, 3, 16, 16))


def test_ibot_training_checkpoint_uses_teacher_and_strips_prefixes():
    ref, sd = _base_sd(1)
    _, other = _base_sd(2)
    teacher = {"module.backbone." + k: v for k, v in sd.items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(3, 3)
    student = {"module.backbone." + k: v for k, v in other.items()}
    b = BaseModel(VIT, topk=3)
    with pytest.warns(UserWarning, match="head.mlp.0.weight"):
        report = b.load_checkpoint({"teacher": teacher, "student": student, "epoch": 3})
    assert report.ignored == ["head.mlp.0.weight"]
    assert any("teacher" in n for n in report.notes)
    _same_targets(ref, b, torch.randn(2, 3, 16, 16))


def test_prefix_stripped_by_name_not_length():
    ref, sd = _base_sd(3)
    # "backbone." inside a key's name must survive: only leading prefixes are stripped
    b = BaseModel(VIT, topk=3)
    b.load_checkpoint({"state_dict": {"backbone." + k: v for k, v in sd.items()}})
    _same_targets(ref, b, torch.randn(1, 3, 16, 16))
    b2 = BaseModel(VIT, topk=3)
    b2.load_checkpoint(sd)  # DINO backbone release: a plain state dict
    _same_targets(ref, b2, torch.randn(1, 3, 16, 16))


def _tec_model(seed=0, input_adapter=True):
    torch.manual_seed(seed)
    cfg = TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, input_adapter=input_adapter,
                    relation=True, tau=1.5, pred_dim=24, pred_heads=3, num_adapters=2)
    m = TECModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_tec_raw_and_released_as_next_base():
    m = _tec_model()
    x = torch.randn(2, 3, 16, 16)
    # raw TEC checkpoint: the loader folds cls_token_mlp itself
    raw = BaseModel(VIT, topk=3)
    with pytest.warns(UserWarning, match="encoder_adaptor"):
        report = raw.load_checkpoint({"model": m.state_dict(), "epoch": 1})
    assert any("cls_token_mlp" in n for n in report.notes)
    # released TEC weights: encoder only, MLP(cls) baked in, no norm.*
    released = {k: v for k, v in export_timm(m).items() if not k.startswith("norm.")}
    assert "cls_token_mlp.fc1.weight" not in released
    rel = BaseModel(VIT, topk=3)
    rel.load_checkpoint(released)
    _same_targets(raw, rel, x)
    # and the folded CLS equals what the TEC encoder feeds its first block
    torch.testing.assert_close(rel.cls_token, m.cls_embedding())


def test_shape_contradiction_names_key_and_shapes():
    _, sd = _base_sd()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(64, 32\).*\(128, 32\)"):
        BaseModel(VIT, topk=3).load_checkpoint(sd)


def test_depth_contradiction_and_missing_keys():
    _, sd = _base_sd()
    with pytest.raises(ValueError, match="3 encoder blocks"):
        BaseModel(VIT, topk=3).load_checkpoint(dict(sd, **{"blocks.2.norm1.weight": torch.ones(32)}))
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match="lacks base-model keys.*blocks.1.attn.qkv.weight"):
        BaseModel(VIT, topk=3).load_checkpoint(sd)


def test_unknown_keys_are_reported():
    _, sd = _base_sd()
    with pytest.warns(UserWarning, match="unexpected: something_else"):
        r = BaseModel(VIT, topk=3).load_checkpoint(dict(sd, something_else=torch.zeros(2)))
    assert r.unexpected == ["something_else"]


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_checkpoint(str(p))
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        read_checkpoint(str(tmp_path / "list.pth"))
    with pytest.raises(ValueError, match="no state dict"):
        BaseModel(VIT).load_checkpoint({"epoch": 3})


def test_official_tec_pretraining_checkpoint_with_namespace(tmp_path):
    m = _tec_model(4)
    path = tmp_path / "checkpoint-299.pth"
    torch.save({"model": m.state_dict(), "optimizer": {}, "epoch": 299, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4)}, path)
    m2 = TECModel(m.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # safe loading (Namespace allowed): nothing to warn about
        m2.load_checkpoint(str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert read_checkpoint(str(path))["args"].blr == 1.5e-4


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_other_pickled_objects_need_trust(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": pathlib.PurePosixPath("/data")}, path)
    with pytest.raises(ValueError, match=r"PurePosixPath.*trust=True.*--trust-checkpoint"):
        read_checkpoint(str(path))
    assert read_checkpoint(str(path), trust=True)["args"] == pathlib.PurePosixPath("/data")
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": _Evil()}, evil)
    with pytest.raises(ValueError, match="posix.system|os.system|trust=True"):
        read_checkpoint(str(evil))


@pytest.mark.parametrize("payload", [bytes(range(256)) * 8, b"\x80\x02garbage", b"", os.urandom(4096)])
def test_random_bytes_are_not_a_checkpoint(tmp_path, payload):
    p = tmp_path / "junk.pth"
    p.write_bytes(payload)
    for trust in (False, True):
        with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
            read_checkpoint(str(p), trust=trust)


@pytest.mark.parametrize("keep", [0.5, -10, None])
def test_truncated_checkpoint_says_so_with_its_size(tmp_path, keep):
    """A torch.save file cut short (a copy or a save that died) or a broken zip: one plain
    message with the size and torch's first sentence, not its advice clipped mid-sentence."""
    torch.save({"model": {"w": torch.randn(2000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    cut = b"PK\x03\x04broken zip" if keep is None else data[:int(len(data) * keep)] if keep > 0 else data[:keep]
    p = tmp_path / "cut.pth"
    p.write_bytes(cut)
    for trust in (False, True):
        with pytest.raises(ValueError) as e:
            read_checkpoint(str(p), trust=trust)
        msg = str(e.value)
        assert msg.startswith(f"{str(p)!r}: truncated or corrupt PyTorch checkpoint ({len(cut)} bytes; ")
        assert msg.endswith(")") and "high likelihood" not in msg and "\n" not in msg


def test_tec_model_load_errors():
    m = _tec_model()
    sd = m.state_dict()
    other = TECModel(TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=2, decoder_heads=2,
                               pred_dim=24, pred_heads=3, num_adapters=2, tau=1.5))
    with pytest.raises(ValueError, match="decoder blocks"):
        other.load_checkpoint(sd)
    bad = dict(sd)
    bad["forward_att_decoder.decoder_qk.weight"] = torch.zeros(10, 16)
    with pytest.raises(ValueError, match="forward_att_decoder.decoder_qk.weight"):
        TECModel(m.config).load_checkpoint(bad)
    no_rel = TECModel(TECConfig(encoder=VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, relation=False,
                                tau=None, pred_dim=24, pred_heads=3, num_adapters=2))
    with pytest.warns(UserWarning, match="unexpected: forward_att_decoder"):
        no_rel.load_checkpoint(sd)


def test_save_load_export_round_trip(tmp_path):
    m = _tec_model(5)
    path = tmp_path / "ck.pth"
    save_atomic({"model": m.state_dict(), "config": m.config.to_dict()}, path)
    ck = read_checkpoint(str(path))  # loads with weights_only=True: no warning
    m2 = TECModel(TECConfig.from_dict(ck["config"]))
    m2.load_checkpoint(ck)
    x = torch.randn(2, 3, 16, 16)
    base = BaseModel(ViTConfig(16, 4, 24, 2, 3), topk=3)
    t = base(x)
    noise = torch.rand(2, 16)
    torch.testing.assert_close(m(x, t, noise=noise)["loss"], m2(x, t, noise=noise)["loss"])
    exported = export_timm(m2)
    assert set(exported) == {k for k in BaseModel(VIT).state_dict()}
    b = BaseModel(VIT, topk=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.load_checkpoint(exported)


def test_save_atomic_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomic({"step": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(str(path)) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pth"]


def test_save_atomic_syncs_the_whole_file_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The temporary file is complete and fsync'ed before the rename makes it the checkpoint (a
    power cut after a rename of unsynced data can leave an empty file under the good name); an
    fsync that fails leaves the old checkpoint as it was and no temporary file."""
    path = tmp_path / "last.pth"
    save_atomic({"step": 1}, path)
    events, fsync, replace = [], ckpt_io.os.fsync, ckpt_io.os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.path.getsize(src)))
        return replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "fsync", logged_fsync)
    monkeypatch.setattr(ckpt_io.os, "replace", logged_replace)
    save_atomic({"step": 2, "w": torch.arange(1000)}, path)
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1] == os.path.getsize(path) > 8000  # synced whole, then renamed

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ckpt_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_atomic({"step": 3}, path)
    monkeypatch.undo()
    assert read_checkpoint(str(path))["step"] == 2
    assert os.listdir(tmp_path) == ["last.pth"]


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_save_atomic_full_disk_names_the_path(tmp_path, monkeypatch, room):
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"step": 1}, path)
    real = ckpt_io._open_temp

    def full(folder):
        tmp, f = real(folder)
        return tmp, _FullDisk(f, room)

    monkeypatch.setattr(ckpt_io, "_open_temp", full)
    with pytest.raises(OSError, match=r"no space left.*checkpoint-last\.pth") as info:
        save_atomic({"w": torch.randn(4000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert "unexpected pos" not in str(info.value)
    monkeypatch.undo()
    assert read_checkpoint(str(path)) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_clean_stale_temp_files(tmp_path):
    # what a killed save leaves: save_atomic's own temp name
    import tempfile
    fd, stale = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=tmp_path)
    os.write(fd, b"partial")
    os.close(fd)
    keep = [".tmp-notmine.pth", ".tmp-abcdefgh.pth.bak", "x.tmp-abcdefgh.pth", ".tmp-ABCDEFGH.pth",
            "checkpoint-last.pth", ".tmp-abcdefg.pth"]
    for name in keep:
        (tmp_path / name).write_bytes(b"1")
    keep += [".link-12ab.pth", ".link-.pth", ".tmp-abcdefghconfig.yml"]
    for name in keep[-3:]:
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / ".tmp-linkxxxx.pth").symlink_to(tmp_path / "checkpoint-last.pth")
    (tmp_path / ".tmp-dir_xxxx.pth").mkdir()
    # the other names a killed save leaves: config.yaml's temp file, CheckpointManager's hard link
    others = [tmp_path / ".tmp-k3_9abcdconfig.yaml", tmp_path / ".link-4321.pth"]
    for path in others:
        path.write_bytes(b"partial")
    said = []
    removed = clean_stale_temp_files(tmp_path, said.append)
    assert sorted(removed) == sorted([stale] + [str(p) for p in others])
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".tmp-linkxxxx.pth", ".tmp-dir_xxxx.pth"])
    assert len(said) == 1
    assert said[0].startswith(f"removed 3 temporary file(s) left by an interrupted save in {tmp_path}: ")
    assert os.path.basename(stale) in said[0] and ".link-4321.pth" in said[0]
    assert clean_stale_temp_files(tmp_path, said.append) == [] and len(said) == 1  # nothing removed: nothing said
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_export_refuses_non_finite_weights():
    m = _tec_model(6)
    with torch.no_grad():
        m.blocks[1].mlp.fc2.weight[3, 2] = float("nan")
        m.blocks[1].attn.proj.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"'blocks\.1\.attn\.proj\.bias' \(32,\) has 1 non-finite"):
        export_timm(m)


def test_fc_norm_is_the_final_norm_when_norm_is_absent():
    """timm's global_pool='avg' layout (``export_timm(global_pool='avg')``) names the final norm
    fc_norm: it is loaded as the norm, so its features are those of the token-pool export."""
    ref, sd = _base_sd(7)
    avg = export_timm(ref, global_pool="avg")
    assert "fc_norm.weight" in avg and "norm.weight" not in avg
    b = BaseModel(VIT, topk=3)
    report = b.load_checkpoint(avg)
    assert "fc_norm.weight" not in report.ignored and any("fc_norm.* " in n for n in report.notes)
    x = torch.randn(2, 3, 16, 16)
    for pool in ("mean", "cls"):
        torch.testing.assert_close(b.encode(x, pool), ref.encode(x, pool), atol=1e-6, rtol=1e-6)
    # both present (a timm model with both): norm is the final norm, fc_norm is a head's and ignored
    both = dict(sd, **{"fc_norm.weight": torch.zeros(32), "fc_norm.bias": torch.zeros(32)})
    with pytest.warns(UserWarning, match="ignored: fc_norm.weight"):
        BaseModel(VIT, topk=3).load_checkpoint(both)


def test_no_final_norm_is_noted():
    _, sd = _base_sd(8)
    assert not any("no final norm" in n for n in BaseModel(VIT, topk=3).load_checkpoint(sd).notes)
    report = BaseModel(VIT, topk=3).load_checkpoint({k: v for k, v in sd.items() if not k.startswith("norm.")})
    assert any("no final norm" in n for n in report.notes) and "no final norm" in report.summary()


def test_tec_load_errors_name_the_source():
    m = _tec_model()
    sd = m.state_dict()
    del sd["blocks.0.norm1.bias"]
    from tec_fast.checkpoint import load_tec_checkpoint
    with pytest.raises(ValueError, match=r"checkpoint run/ck\.pth lacks TEC-model keys: \['blocks\.0\.norm1\.bias'\]"):
        load_tec_checkpoint(TECModel(m.config), {"model": sd}, source="run/ck.pth")
    with pytest.raises(ValueError, match=r"checkpoint run/ck\.pth: key 'blocks\.0\.norm1\.weight' has shape"):
        load_tec_checkpoint(TECModel(m.config), dict(sd, **{"blocks.0.norm1.weight": torch.ones(3)}),
                            source="run/ck.pth")


def test_folded_cls_token_is_the_exact_gelu_mlp():
    """fold_cls_mlp (export, and a raw TEC checkpoint loaded as a base) computes fc2(GELU(fc1(cls)))
    with the exact (erf) GELU of the input adapter. A CLS token of size ~3 spreads fc1's outputs
    over [-4, 4], where the tanh approximation differs by up to 5e-4 (at inputs near 0 both agree
    to 1e-7, so a small token would not tell them apart)."""
    import torch.nn.functional as F

    from tec_fast.checkpoint.formats import fold_cls_mlp
    m = _tec_model(seed=4)
    C = VIT.embed_dim
    with torch.no_grad():
        m.cls_token.copy_(3 * torch.randn(1, 1, C))
        m.cls_token_mlp.fc1.weight.copy_(torch.eye(m.cls_token_mlp.fc1.weight.shape[0], C))
        m.cls_token_mlp.fc1.bias.zero_()
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    cls64 = sd["cls_token"].double()
    h = cls64 @ sd["cls_token_mlp.fc1.weight"].double().t() + sd["cls_token_mlp.fc1.bias"].double()
    assert h.abs().max() > 3
    want = F.gelu(h) @ sd["cls_token_mlp.fc2.weight"].double().t() + sd["cls_token_mlp.fc2.bias"].double()
    tanh = F.gelu(h, approximate="tanh") @ sd["cls_token_mlp.fc2.weight"].double().t() \
        + sd["cls_token_mlp.fc2.bias"].double()
    assert (tanh - want).abs().max() > 2e-5  # the data tells the two GELUs apart
    folded = fold_cls_mlp(sd)["cls_token"]
    torch.testing.assert_close(folded.double(), want, atol=2e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(m.cls_embedding().double(), want, atol=2e-6, rtol=0)
