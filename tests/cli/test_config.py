"""``--config FILE.yaml`` of ``python -m tec_fast.train``: every flag can come from the file, the
command line overrides it, the resolved config reads back to the same flags, and a bad key or value
is one ``error:`` line naming the key. FitConfig is filled from the flags by name."""
from __future__ import annotations

import dataclasses

import pytest

yaml = pytest.importorskip("yaml")

from tec_fast.cli import train as T  # noqa: E402
from tec_fast.cli.config import config_values, resolved_config  # noqa: E402
from tec_fast.training import FitConfig  # noqa: E402


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    import torch

    from tec_fast import BaseModel
    from tec_fast.presets import vit_preset
    # the flag checks read the base's architecture from its weights
    torch.save({"model": BaseModel(vit_preset("vit_demo_patch4", 32)).state_dict()}, tmp_path / "base.pth")
    return str(tmp_path / "data")


def _write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        T.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_values_come_from_the_file_and_the_command_line_wins(tmp_path, data):
    cfg = _write(tmp_path, f"data: {data}\nbatch-size: 8\nblr: 1e-3\nmask_ratio: '0.6:0.9'\n"
                           f"base: mae_vit_base:{tmp_path / 'base.pth'}\nno-pin-memory: true\n")
    args = T.parse_args(["--config", cfg, "--batch-size", "16"])
    assert args.batch_size == 16          # the command line over the file
    assert args.blr == 1e-3               # YAML 1.1 reads '1e-3' as a string: the flag's type parses it
    assert args.mask_ratio == (0.6, 0.9)  # the flag's own type function
    assert args.no_pin_memory is True and args.data == data


def test_resolved_config_reads_back_to_the_same_flags(tmp_path, data):
    argv = ["--data", data, "--base", f"mae_vit_base:{tmp_path / 'base.pth'}", "--model", "vit_demo_patch4",
            "--img-size", "32", "--mask-ratio", "0.5:0.8", "--topk", "3", "--masking", "block", "--max-steps", "7", "--clip-grad", "1.5",
            "--no-pin-memory", "--seed", "11", "--output", str(tmp_path / "out")]
    args = T.parse_args(argv)
    text = T.run_config(args)
    again = T.parse_args(["--config", _write(tmp_path, text, "config.yaml")])
    written = set(yaml.safe_load(text))
    assert written and {k: getattr(again, k) for k in written} == {k: getattr(args, k) for k in written}
    assert "resume" not in written and "demo_tiny" not in written and "config" not in written
    # and the file written from the reread flags is the same file
    assert T.run_config(again) == text


def test_demo_config_holds_only_the_demos_flags(tmp_path):
    args = T.parse_args(["--demo-tiny", "--seed", "3"])
    keys = set(yaml.safe_load(T.run_config(args)))
    assert {"demo_tiny", "seed", "output"} <= keys and "batch_size" not in keys
    again = T.parse_args(["--config", _write(tmp_path, T.run_config(args))])
    assert again.demo_tiny and again.seed == 3 and again.data is None


@pytest.mark.parametrize("text,needle", [
    ("bach-size: 3\n", "unknown key 'bach-size': not a flag of python -m tec_fast.train; did you mean 'batch-size'"),
    ("batch-size: 0\n", "key 'batch-size' (--batch-size): must be >= 1, got 0"),
    ("batch_size: 2.5\n", "key 'batch_size' (--batch-size): expected an integer, got '2.5'"),
    ("blr: .nan\n", "key 'blr' (--blr): must be a finite number"),
    ("precision: fp8\n", "key 'precision' (--precision): invalid choice: 'fp8'"),
    ("compile: yes please\n", "key 'compile' (--compile): expected true or false"),
    ("epochs: null\n", "key 'epochs' (--epochs): null is only allowed for a flag without a default"),
    ("batch-size: [1, 2]\n", "key 'batch-size' (--batch-size): expected one value"),
    ("mask-ratio: '0.9:0.2'\n", "key 'mask-ratio' (--mask-ratio): mask ratios must be in (0, 1)"),
    ("config: other.yaml\n", "key 'config': --config belongs on the command line, not in a config file"),
    ("batch-size: 2\nbatch_size: 3\n", "key 'batch_size': --batch-size is given twice"),
    ("epochs: 2\nbatch-size: 2\nbatch-size: 3\n", "key 'batch-size' is given twice (line 3)"),
    ("- a\n- b\n", "expected a mapping of flag names to values, got a list"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_keys_and_values_are_one_error_line_naming_the_key(tmp_path, capsys, text, needle):
    path = _write(tmp_path, text)
    err = _error(capsys, ["--config", path])
    assert f"--config {path}" in err and needle in err, err


def test_a_file_that_is_not_utf8_is_one_error_line_naming_it(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 2\n# caf\u00e9\n".encode("latin-1"))
    err = _error(capsys, ["--config", str(path)])
    assert f"--config {path}: not UTF-8 text (byte 0xe9 at offset 15)" in err, err


def test_config_values_are_refused_like_the_flag_after_parsing(tmp_path, capsys, data):
    # a file value that contradicts another flag is refused by the same cross-flag checks
    err = _error(capsys, ["--config", _write(tmp_path, "demo-tiny: true\n"), "--data", data])
    assert "--demo-tiny" in err and "cannot be combined with --data" in err


def test_print_config_prints_yaml_and_exits(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    assert T.main(["--data", data, "--objective", "mae", "--batch-size", "5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["batch_size"] == 5
    assert not (tmp_path / "runs").exists()


def test_every_fit_config_field_comes_from_a_flag_of_its_name_or_is_derived(data):
    p = T.build_parser()
    dests = {a.dest for a in p._actions}
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    orphans = fields - dests - set(T.DERIVED_FIT_FIELDS)
    assert not orphans, f"FitConfig fields with no flag of that name: {orphans}"
    # and each of them carries the flag's value through (not the dataclass default)
    argv = ["--data", data, "--objective", "mae", "--epochs", "3", "--max-steps", "9", "--time-limit", "60",
            "--batch-size", "5", "--accum", "2", "--lr", "0.01", "--min-lr", "0.001", "--warmup-epochs", "1.5",
            "--weight-decay", "0.1", "--clip-grad", "2", "--num-workers", "1", "--seed", "4", "--log-every", "3",
            "--save-every-steps", "4", "--keep-last", "3", "--keep-every", "5", "--resume", "--tensorboard",
            "--wandb", "proj", "--compile"]
    wandb_missing = __import__("importlib").util.find_spec("wandb") is None
    if wandb_missing:
        argv = argv[:argv.index("--wandb")] + argv[argv.index("--wandb") + 2:]
    args = T.parse_args(argv)
    cfg = T.fit_config(args, "out", "fp32")
    for name in (fields & dests) - set(T.DERIVED_FIT_FIELDS):  # as FitConfig holds the flag's value (its __post_init__ may normalise it)
        assert getattr(cfg, name) == getattr(FitConfig(**{name: getattr(args, name)}), name), name
    assert cfg.name == "mae" and cfg.output_dir == "out" and cfg.compile and cfg.tensorboard


def test_config_values_unit(tmp_path):
    p = T.build_parser()
    assert config_values(p, {"--keep-last": 4, "no-progress": True}, "f") == {"keep_last": 4, "no_progress": True}
    with pytest.raises(ValueError, match="key 'print_config': --print-config belongs on the command line"):
        config_values(p, {"print_config": True}, "f")
    assert config_values(p, {"resume": True}, "f") == {"resume": "auto"}  # true: the bare flag
    args = p.parse_args(["--seed", "9"])
    assert "seed: 9" in resolved_config(p, args, keep={"seed"}).splitlines()


def test_the_header_and_the_schedule_flags_say_what_they_do(tmp_path, data):
    """config.yaml's header names what a rerun in the same --output needs; --help explains the
    schedule flags, the warmup's cut to 10% included."""
    args = T.parse_args(["--data", data, "--base", f"mae_vit_base:{tmp_path / 'base.pth'}", "--model",
                         "vit_demo_patch4", "--img-size", "32"])
    header = T.run_config(args).splitlines()[0]
    assert "--config config.yaml --resume continues this run" in header and "--overwrite" in header
    text = " ".join(T.build_parser().format_help().split())
    for expect in ("--epochs EPOCHS passes over the data", "--min-lr MIN_LR lr at the end of the half cosine",
                   "cut to its first 10% (with a warning)", "--weight-decay WEIGHT_DECAY AdamW's decoupled"):
        assert expect in text, expect
