"""`python -m tec_fast.info` and the FLOP count of the step benchmark."""
import json
import subprocess
import sys

from benchmarks.flops import tec_step_flops
from tec_fast import TECConfig, ViTConfig


def test_vit_b_step_flops_match_the_design_count():
    vit = ViTConfig()
    parts = tec_step_flops(vit, TECConfig(encoder=vit), mask_ratio=0.75, topk=15)
    expected = {"base_forward": 35.1, "encoder": 26.2, "adapter": 5.9, "decoders": 17.5, "total": 84.7}
    for key, gflop in expected.items():
        assert abs(parts[key] / 1e9 - gflop) < 0.06 * gflop + 0.06, (key, parts[key] / 1e9)


def test_info_reports_backends_and_reasons():
    out = subprocess.run([sys.executable, "-m", "tec_fast.info", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["torch"]
    assert set(info["ops"]) >= {"masked_gather", "scatter_masked", "patch_norm_mse", "relation_targets",
                                "relation_loss", "encoder_adapter"}
    for op in info["ops"].values():
        # on a CPU-only machine every op says why it is not on the Triton path
        assert op["backend"] in ("triton", "reference")
        assert op["backend"] == "triton" or op["skipped_because"]
    assert "packed" in info["attention"] and "extension" in info
    table = subprocess.run([sys.executable, "-m", "tec_fast.info"], capture_output=True, text=True, check=True)
    assert "relation_loss" in table.stdout
