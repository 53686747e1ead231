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
