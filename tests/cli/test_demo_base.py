"""The demo base shipped in the package: it loads, it was made by the command's current recipe on
the current demo data, and it is small. Also the plot writer."""
from __future__ import annotations

import json

import pytest

from tec_fast.demo import shipped_base
from tec_fast.demo.plot import write_plot
from tec_fast.demo.recipe import BASE_RECIPE


def test_shipped_base_loads_and_matches_the_recipe():
    mae, meta = shipped_base.load_base()
    assert meta["recipe"] == BASE_RECIPE.to_dict(), "remake the base: python -m tec_fast.train --demo-make-base"
    assert meta["steps_done"] == BASE_RECIPE.steps
    assert meta["data_fingerprint"] == shipped_base.data_fingerprint(BASE_RECIPE.data_seed)
    assert 0.0 < meta["eval"]["knn"] <= 1.0 and 0.0 < meta["eval"]["linear"] <= 1.0
    size = (shipped_base.ASSETS / shipped_base.WEIGHTS).stat().st_size
    assert size <= 5 * 2 ** 20, size
    assert sum(p.numel() for p in mae.parameters()) > 10 ** 6


def test_load_base_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="--demo-make-base"):
        shipped_base.load_base(str(tmp_path))
    (tmp_path / shipped_base.META).write_text(json.dumps({"recipe": BASE_RECIPE.to_dict()}))
    with pytest.raises(ValueError, match="demo_base.pth"):
        shipped_base.load_base(str(tmp_path))


def test_a_damaged_demo_base_is_one_error_line(tmp_path, capsys):
    """A truncated weights file, a record without its recipe or of bad JSON: one error line that
    names the file (the train command's exit status 2), not a traceback."""
    import shutil

    from tec_fast.cli.train import main
    for name in (shipped_base.WEIGHTS, shipped_base.META):
        shutil.copy(shipped_base.ASSETS / name, tmp_path / name)
    weights = (tmp_path / shipped_base.WEIGHTS).read_bytes()
    cases = [(shipped_base.WEIGHTS, weights[:len(weights) // 2], "not a readable demo base checkpoint"),
             (shipped_base.META, b'{"eval": {}}', "not a demo base record (KeyError"),
             (shipped_base.META, b"{not json", "not a demo base record (JSONDecodeError")]
    meta = (tmp_path / shipped_base.META).read_bytes()
    for name, data, message in cases:
        (tmp_path / shipped_base.WEIGHTS).write_bytes(weights)
        (tmp_path / shipped_base.META).write_bytes(meta)
        (tmp_path / name).write_bytes(data)
        assert main(["--demo-tiny", "--demo-base", str(tmp_path), "--output", str(tmp_path / "out"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(tmp_path / name) in err[0] and message in err[0], err
    # a record without its evaluation still loads (the demo prints nan for the base's scores)
    (tmp_path / shipped_base.META).write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "eval"}))
    (tmp_path / shipped_base.WEIGHTS).write_bytes(weights)
    assert shipped_base.load_base(str(tmp_path))[1]["eval"] == {}


def test_a_refused_demo_leaves_the_running_ones_config(tmp_path, capsys):
    from tec_fast.cli.train import main
    from tec_fast.training.run_lock import hold_output_lock
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    with hold_output_lock(out):
        assert main(["--demo-tiny", "--seed", "7", "--output", str(out), "--no-progress"]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "seed: 0\n"


def test_plot_writer(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {"base": {"knn": 0.5, "linear": 0.6}, "tec": {"knn": 0.7, "linear": 0.8}}
    path = write_plot(str(tmp_path / "r.png"), rows, {"tec": [1.0, 0.5, 0.25]}, "t")
    assert path and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_train_base_writes_what_load_base_reads(tmp_path):
    from dataclasses import replace

    recipe = replace(BASE_RECIPE, steps=3, batch_size=16, warmup_steps=1)
    evaluated = []
    mae, meta = shipped_base.train_base(recipe, str(tmp_path), False,
                                        lambda enc: evaluated.append(enc) or {"knn": 0.5, "linear": 0.25})
    assert meta["steps_done"] == 3 and meta["recipe"] == recipe.to_dict() and meta["eval"]["linear"] == 0.25
    again, meta2 = shipped_base.load_base(str(tmp_path))
    assert meta2 == json.loads(json.dumps(meta)) and len(evaluated) == 1
    for (k, a), b in zip(mae.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), k  # what was evaluated is what is stored (fp16 round trip)
