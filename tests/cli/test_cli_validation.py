"""Every flag of ``python -m tec_fast.train`` is checked when the command line is parsed: a bad
value (out of range, non-finite, contradicting another flag, ignored by the chosen mode) ends in
one ``error: argument FLAG: ...`` line and exit status 2, never in a default or a traceback.
User errors found later (a full disk, a file of the wrong kind) are one ``error:`` line too."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_class_folders

from tec_fast.cli.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = ["--model", "vit_demo_patch4", "--img-size", "32", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_class_folders(root / "data" / "train", ("a", "b"), 3, (32, 40), np.random.default_rng(0))
    from tec_fast import BaseModel
    from tec_fast.presets import vit_preset
    torch.save({"model": BaseModel(vit_preset("vit_demo_patch4", 32)).state_dict()}, root / "base.pth")
    nan = BaseModel(vit_preset("vit_demo_patch4", 32)).state_dict()
    nan["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save({"model": nan}, root / "nan_base.pth")
    (root / "a_file").write_text("x")
    return root


def _tec(files):
    return ["--data", str(files / "data"), "--base", f"mae_vit_base:{files / 'base.pth'}",
            "--base-model", "vit_demo_patch4", *ARCH]


def _tec_from_weights(files):
    """No --base-model, no --model: the base's architecture (patch 4, 6 blocks, 64 patches at
    32 px) is read from its weights, and so must the checks read it."""
    return ["--data", str(files / "data"), "--base", f"mae_vit_base:{files / 'base.pth'}", *ARCH[2:]]


def _mae(files):
    return ["--data", str(files / "data"), "--objective", "mae", *ARCH]


# (mode, extra flags, the flag the error names)
REFUSED = [
    # each value on its own
    ("tec", ["--topk", "0"], "--topk"), ("tec", ["--tau", "0"], "--tau"), ("tec", ["--tau", "inf"], "--tau"),
    ("tec", ["--last-layers", "0"], "--last-layers"), ("tec", ["--max-patches", "0"], "--max-patches"),
    ("tec", ["--tokens-per-batch", "0"], "--tokens-per-batch"),
    ("tec", ["--clip-grad", "-1"], "--clip-grad"), ("tec", ["--clip-grad", "0"], "--clip-grad"),
    ("tec", ["--lr", "nan"], "--lr"), ("tec", ["--lr", "inf"], "--lr"), ("tec", ["--lr", "0"], "--lr"),
    ("tec", ["--blr", "nan"], "--blr"), ("tec", ["--blr", "-1e-4"], "--blr"),
    ("tec", ["--mask-ratio", "0"], "--mask-ratio"), ("tec", ["--mask-ratio", "1"], "--mask-ratio"),
    ("tec", ["--mask-ratio", "0:0.5"], "--mask-ratio"),
    ("tec", ["--epochs", "0"], "--epochs"), ("tec", ["--max-steps", "0"], "--max-steps"),
    ("tec", ["--batch-size", "0"], "--batch-size"), ("tec", ["--accum", "0"], "--accum"),
    ("tec", ["--num-workers", "-1"], "--num-workers"), ("tec", ["--img-size", "0"], "--img-size"),
    ("tec", ["--decoder-dim", "0"], "--decoder-dim"), ("tec", ["--decoder-depth", "0"], "--decoder-depth"),
    ("tec", ["--decoder-heads", "0"], "--decoder-heads"), ("tec", ["--min-lr", "-1"], "--min-lr"),
    ("tec", ["--warmup-epochs", "nan"], "--warmup-epochs"), ("tec", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("tec", ["--save-every", "0"], "--save-every"), ("tec", ["--save-every-steps", "0"], "--save-every-steps"),
    ("tec", ["--keep-last", "0"], "--keep-last"), ("tec", ["--keep-every", "-1"], "--keep-every"),
    ("tec", ["--time-limit", "0"], "--time-limit"), ("tec", ["--log-every", "0"], "--log-every"),
    ("tec", ["--seed", "-1"], "--seed"), ("tec", ["--device", "tpu"], "--device"),
    ("tec", ["--epochs", "two"], "--epochs"),
    ("demo", ["--demo-steps", "0"], "--demo-steps"), ("demo", ["--demo-steps", "4,3"], "--demo-steps"),
    ("demo", ["--demo-make-base", "--demo-steps", "5"], "--demo-steps"),
    ("demo", ["--demo-from-scratch", "--demo-base", "."], "--demo-base"),
    # files and folders
    ("tec", ["--data", "{files}/missing"], "--data"), ("tec", ["--output", "{files}/a_file"], "--output"),
    ("tec", ["--output", ""], "--output"),
    ("tec", ["--resume", "{files}/missing.pth"], "--resume"),
    ("tec", ["--base", "mae_vit_base:{files}/missing.pth"], "--base"),
    ("tec", ["--base", "no_such_kind:{files}/base.pth"], "--base"),
    # flags against each other
    ("demo", ["--epochs", "5"], "--epochs"), ("demo", ["--lr", "1e-3"], "--lr"),
    ("demo", ["--demo-tiny", "--demo-long"], "--demo-long"),
    ("tec", ["--demo-tiny"], "--demo-tiny"),
    ("mae", ["--base", "mae_vit_base:{files}/base.pth"], "--base"), ("mae", ["--topk", "5"], "--topk"),
    ("mae", ["--mask-ratio", "0.5:0.9"], "--mask-ratio"), ("mae", ["--masking", "block"], "--masking"),
    ("mae", ["--native-resolution"], "--native-resolution"),
    ("tec", ["--no-relation", "--tau", "2"], "--tau"), ("tec", ["--max-patches", "16"], "--max-patches"),
    ("tec", ["--lr", "1e-3", "--blr", "1e-3"], "--lr"), ("tec", ["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
    ("tec", ["--decoder-dim", "30", "--decoder-heads", "4"], "--decoder-heads"),
    ("tec", ["--last-layers", "7"], "--last-layers"), ("tec", ["--topk", "65"], "--topk"),
    ("tec", ["--img-size", "30"], "--img-size"),
    ("tec", ["--max-steps", "3", "--save-every-steps", "5"], "--save-every-steps"),
    ("tec", ["--native-resolution", "--compile"], "--compile"),
    ("tec", ["--cuda-graph", "--no-cuda-graph"], "--no-cuda-graph"), ("tec", ["--cuda-graph", "--precision", "fp16"], "--precision"),
    ("tec", ["--cuda-graph", "--compile"], "--compile"), ("tec", ["--cuda-graph", "--optimizer", "apex"], "--optimizer"),
    ("demo", ["--cuda-graph"], "--cuda-graph"), ("tec", ["--cuda-graph", "--mask-ratio", "0.6:0.9"], "--mask-ratio"),
    ("tec", ["--cuda-graph", "--masking", "block"], "--masking"),
    ("tec", ["--native-resolution", "--max-patches", "3"], "--max-patches"),
    ("tec", ["--native-resolution", "--tokens-per-batch", "10"], "--tokens-per-batch"),
    # the base's architecture read from its weights
    ("weights", ["--last-layers", "7"], "--last-layers"), ("weights", ["--topk", "65"], "--topk"),
    ("weights", ["--img-size", "30"], "--img-size"),
    ("weights", ["--base-model", "vit_base_patch16"], "--base-model"),  # 12 heads, width 128
    ("weights", ["--base", "mae_vit_base:{files}/a_file"], "--base"),  # not a checkpoint
    ("weights", ["--base-model", "vit_large_patch16"], "--base-model"),  # 16 heads divide 128, the rest does not fit
    ("weights", ["--img-size", "4"], "--img-size"),  # 1 patch: fewer than the recipe's top-k 15
    ("weights", ["--base", "mae_vit_base:{files}/nan_base.pth"], "--base"),
    ("weights", ["--model", "vit_tiny_patch16"], "--model"),  # patch 16 against the base's 4: another grid
    ("tec", ["--resume", "--overwrite"], "--overwrite"),  # resuming keeps what --overwrite would delete
    ("tec", ["--data", "{files}/shard-{{0..1999999}}.tar"], "--data"),  # refused before it is expanded
]


@pytest.mark.parametrize("mode, extra, flag", REFUSED, ids=[" ".join(e) for _, e, _ in REFUSED])
def test_bad_flag_is_one_error_line(files, capsys, mode, extra, flag):
    base = {"tec": _tec(files), "weights": _tec_from_weights(files), "mae": _mae(files), "demo": []}[mode]
    argv = base + [a.format(files=files) for a in extra]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}:"), err


# (mode, extra flags, what the one error line says): the refusals that name more than the flag
EXPLAINED = [
    ("weights", ["--base-model", "vit_large_patch16"],
     "argument --base-model: vit_large_patch16 has patch_size=16, embed_dim=1024, depth=24 but the weights of "
     "{files}/base.pth hold patch_size=4, embed_dim=128, depth=6; use --base-model vit_demo_patch4"),
    ("weights", ["--base-model", "vit_small_patch16"],  # its 6 heads do not divide 128 either: not the point
     "argument --base-model: vit_small_patch16 has patch_size=16, embed_dim=384, depth=12 but the weights of "
     "{files}/base.pth hold patch_size=4, embed_dim=128, depth=6; use --base-model vit_demo_patch4"),
    ("weights", ["--img-size", "4"], "argument --img-size: 4 gives the base only 1 patches (1x1 of 4 px), fewer "
                                     "than the top-k 15 of its recipe's relation targets"),
    ("weights", ["--base", "mae_vit_base:{files}/nan_base.pth"],
     "argument --base: {files}/nan_base.pth: 1 weights hold NaN or inf values (blocks.0.attn.qkv.weight)"),
    ("tec", ["--data", "{files}/shard-{{0..1999999}}.tar"],
     "argument --data: shard pattern '{files}/shard-{{0..1999999}}.tar' expands to 2000000 names, more than "
     "the 1000000 allowed"),
]


@pytest.mark.parametrize("mode, extra, needle", EXPLAINED, ids=[" ".join(e) for _, e, _ in EXPLAINED])
def test_refusal_says_why(files, capsys, mode, extra, needle):
    base = {"tec": _tec(files), "weights": _tec_from_weights(files)}[mode]
    with pytest.raises(SystemExit):
        main(base + [a.format(files=files) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.format(files=files) in err[0], err


def test_kernel_mode_refusal_is_one_error_line(capsys):
    """TEC_FAST_KERNELS=triton where a kernel cannot run (no GPU, no TRITON_INTERPRET): the dispatch's
    RuntimeError is about the user's setting, so one line and exit 2; any other RuntimeError is a bug."""
    from tec_fast.cli.errors import run_command

    def refused(argv):
        raise RuntimeError("TEC_FAST_KERNELS=triton but patch_embed cannot run its Triton kernels on this "
                           "input (cpu torch.float32 (4, 3, 32, 32)):\ntensor on cpu and TRITON_INTERPRET is not set")
    assert run_command(refused) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: TEC_FAST_KERNELS=triton but patch_embed cannot run its Triton kernels on this input "
                   "(cpu torch.float32 (4, 3, 32, 32)): tensor on cpu and TRITON_INTERPRET is not set"]

    def bug(argv):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_command(bug)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_kernels_on_cpu_are_one_error_line(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tec_fast.train", *_tec(files), "--batch-size", "2", "--num-workers",
                           "0", "--max-steps", "1", "--no-progress", "--output", str(tmp_path)], cwd=ROOT,
                          env={**env, "TEC_FAST_KERNELS": "triton"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TEC_FAST_KERNELS=triton but ")
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(files, capsys):
    with pytest.raises(SystemExit):
        main([*_tec(files), "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_graph_without_cuda(files, capsys):
    with pytest.raises(SystemExit):
        main([*_tec(files), "--cuda-graph"])
    assert "error: argument --cuda-graph: --cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_cuda_graph_flag_reaches_fit_config(files, monkeypatch):
    """--cuda-graph (require, --accum too) passes the checks where CUDA is there and becomes
    FitConfig.cuda_graph 'on'; no flag is 'auto', --no-cuda-graph 'off'."""
    from tec_fast.cli.train import fit_config, parse_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args([*_tec(files), "--cuda-graph", "--precision", "bf16", "--accum", "2"])
    assert fit_config(args, "out", "bf16").cuda_graph == "on"
    assert fit_config(parse_args(_tec(files)), "out", "fp32").cuda_graph == "auto"
    assert fit_config(parse_args([*_tec(files), "--no-cuda-graph"]), "out", "fp32").cuda_graph == "off"


def test_good_flags_pass_the_checks(files):
    from tec_fast.cli.train import parse_args
    args = parse_args([*_tec(files), "--topk", "64", "--last-layers", "6", "--clip-grad", "1.0",
                       "--mask-ratio", "0.5:0.9", "--native-resolution", "--mask-ratio", "0.6"])
    assert (args.topk, args.last_layers, args.clip_grad, args.mask_ratio) == (64, 6, 1.0, 0.6)
    assert parse_args(["--demo-steps", "4", "--seed", "2"]).demo_steps == 4
    # read from the weights: patch 4 at 36 px, the base's 6 blocks and 81 patches, a native plan on patch 4
    args = parse_args([*_tec_from_weights(files), "--img-size", "36", "--topk", "81", "--last-layers", "6"])
    assert (args.img_size, args.topk, args.last_layers) == (36, 81, 6)
    from tec_fast.training.builders import native_plan
    assert native_plan(parse_args([*_tec_from_weights(files), "--native-resolution", "--topk", "3"]))["patch"] == 4


def _no_traceback(proc):
    lines = proc.stderr.strip().splitlines()
    return "Traceback" not in proc.stderr and lines and lines[-1].startswith("error:")


def test_full_disk_is_one_error_line(files, tmp_path):
    """A write that fails (here: the file-size limit, as a full disk does) names the file."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tec_fast.train", *_mae(files), "--batch-size", "2",
                           "--num-workers", "0", "--max-steps", "1", "--warmup-epochs", "0", "--no-progress",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and _no_traceback(proc), proc.stderr[-2000:]
    assert "could not write" in proc.stderr and str(out) in proc.stderr
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_export_of_an_encoder_only_file_is_one_error_line(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tec_fast.export", str(files / "base.pth"), str(tmp_path / "o.pth")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and _no_traceback(proc), proc.stderr[-2000:]
    assert "not a TEC training checkpoint" in proc.stderr and not (tmp_path / "o.pth").exists()


def test_export_refuses_nonfinite_weights(files, tmp_path, capsys):
    from tec_fast import TECConfig, TECModel
    from tec_fast.cli.export import main as export_main
    from tec_fast.presets import vit_preset
    tec = TECModel(TECConfig(encoder=vit_preset("vit_demo_patch4", 32), decoder_dim=32, decoder_depth=1,
                             decoder_heads=2))
    state = tec.state_dict()
    state["blocks.1.mlp.fc1.weight"][3, 3] = float("inf")
    torch.save({"model": state, "model_config": tec.config.to_dict()}, tmp_path / "ck.pth")
    assert export_main([str(tmp_path / "ck.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocks.1.mlp.fc1.weight" in err[0] and "NaN or inf" in err[0]
    assert not (tmp_path / "o.pth").exists()
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "ck.pth"), str(tmp_path / "ck.pth")])  # would overwrite its input
    os.symlink(tmp_path / "ck.pth", tmp_path / "link.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the same file through a link
        export_main([str(tmp_path / "link.pth"), str(tmp_path / "ck.pth")])
    assert "argument OUT: is the checkpoint being read" in capsys.readouterr().err
    torch.save({"model": 5}, tmp_path / "odd.pth")
    assert export_main([str(tmp_path / "odd.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its 'model' entry is a int, not a state dict" in err[0], err


def test_eval_json_may_not_be_the_checkpoint(files, tmp_path, capsys):
    from tec_fast.cli.eval import main as eval_main
    base = files / "base.pth"
    with pytest.raises(SystemExit) as info:
        eval_main([str(base), "--json", str(base)])
    assert info.value.code == 2 and "argument --json: is the checkpoint being read" in capsys.readouterr().err
    assert torch.load(base, weights_only=True)["model"]  # untouched


def test_info_refuses_a_bad_kernel_setting_in_one_line(monkeypatch, capsys):
    from tec_fast.cli.info import main as info_main
    from tec_fast.ops import dispatch
    monkeypatch.setenv("TEC_FAST_KERNELS", "bogus")
    dispatch.reload_environment()
    try:
        assert info_main([]) == 2
    finally:
        monkeypatch.delenv("TEC_FAST_KERNELS")
        dispatch.reload_environment()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: TEC_FAST_KERNELS must be one of ('auto', 'triton', 'reference'), got 'bogus'"], err


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(files, tmp_path, capsys):
    """Without --resume, a folder holding checkpoints is refused (mixed in, the old ones would be
    pruned against the new ones and resumed from); --overwrite deletes them, the metrics logs and
    the wandb run id. The logs alone (a run stopped before its first save) are refused too: the
    new run's records would be appended to them. --resume with --overwrite is refused."""
    out = tmp_path / "run"
    argv = [*_tec(files), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress",
            "--output", str(out)]
    assert main(argv) == 0
    first = sorted(p.name for p in out.glob("checkpoint-*.pth"))
    assert first
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output {out} holds an earlier run's checkpoints"), err
    assert "--resume" in err[0] and "--overwrite" in err[0]
    (out / "checkpoint-0007.pth").write_bytes(b"an old epoch")
    (out / "wandb-run-id").write_text("old-run\n")  # as --wandb leaves it
    assert main([*argv, "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert ("--overwrite: deleted 5 files of the earlier run in " f"{out}: checkpoint-0007.pth, checkpoint-last.pth, "
            "metrics.jsonl, metrics.csv, wandb-run-id") in said, said
    assert not (out / "checkpoint-0007.pth").exists()
    assert not (out / "wandb-run-id").exists()  # the new run does not log into the old wandb run
    starts = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1  # the earlier run's log went with its checkpoints
    assert main([*argv, "--resume"]) == 0  # continuing is always allowed
    with pytest.raises(SystemExit):  # not both: --overwrite would be ignored
        main([*argv, "--resume", "--overwrite"])
    assert "argument --overwrite: deletes an earlier run's" in capsys.readouterr().err

    for f in out.glob("checkpoint-*.pth"):  # a run stopped before its first save left only its logs
        f.unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an earlier run's logs (it stopped before its first checkpoint) (metrics.jsonl" in err, err
    assert main([*argv, "--overwrite"]) == 0
    starts = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1


@pytest.mark.parametrize("part", ["optimizer", "RNG"])
def test_resume_with_a_state_that_does_not_fit_names_the_file(files, tmp_path, capsys, part):
    out = tmp_path / "run"
    argv = [*_tec(files), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress",
            "--output", str(out)]
    assert main(argv) == 0
    ck = torch.load(out / "checkpoint-last.pth", weights_only=False)
    if part == "optimizer":
        ck["optimizer"]["param_groups"] = ck["optimizer"]["param_groups"][:1]
    else:
        ck["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    bad = tmp_path / "bad.pth"
    torch.save(ck, bad)
    capsys.readouterr()
    assert main([*argv, "--resume", str(bad), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume {bad}: its {part} state does not fit this run"), err


@pytest.mark.parametrize("mode", ["tec", "demo"])
def test_an_output_folder_that_cannot_be_made_names_the_flag(files, capsys, mode):
    bad = files / "a_file" / "run"  # below a file: no folder can be made there
    argv = ([*_tec(files), "--max-steps", "1"] if mode == "tec" else ["--demo-tiny"]) + ["--output", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {bad}: cannot create the folder (Not a directory)"], err


def test_a_ctrl_c_the_command_does_not_handle_is_one_line(capsys):
    """Training handles the first Ctrl-C (save, then stop); a second one during that save, or one
    outside the loop, reaches the command: one line saying what it means for the files, exit
    130, no traceback."""
    from tec_fast.cli.errors import run_command

    def interrupted(argv):
        raise KeyboardInterrupt
    assert run_command(interrupted, [], on_interrupt="checkpoint-last.pth is the newest complete one") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted (Ctrl-C): stopped at once; checkpoint-last.pth is the newest complete one"], err


def test_a_command_prints_a_warning_as_one_line():
    """Not Python's developer format (file, line number, and the source line that warned): the
    command's format holds while it runs and is handed back after."""
    import warnings

    from tec_fast.cli.errors import run_command
    seen = []

    def warns(argv):
        seen.append(warnings.formatwarning("resuming with a different schedule", RuntimeWarning, "loop.py", 7))
        return 0
    before = warnings.formatwarning
    assert run_command(warns, []) == 0
    assert seen == ["warning: resuming with a different schedule\n"] and warnings.formatwarning is before
