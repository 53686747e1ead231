"""``python -m tec_fast.info --gpu``: any case or a device name, normalised to the class the
measured tables are filed under; an unknown class refused with the known ones."""
from __future__ import annotations

import pytest

from tec_fast.cli.info import collect, gpu_class_flag, main


def test_gpu_class_any_case_or_device_name():
    assert gpu_class_flag("h200") == "H200" and gpu_class_flag(" H100 ") == "H100"
    assert gpu_class_flag("NVIDIA H100 80GB HBM3") == "H100" and gpu_class_flag("l40s") == "L40S"
    assert collect(gpu_class_flag("h200"))["gpu_class"] == "H200"


@pytest.mark.parametrize("value, says", [("tpu-v5", "unknown GPU class 'tpu-v5' (known: A10, A100"),
                                         (" ", "empty GPU class")])
def test_unknown_gpu_class_lists_the_known_ones(capsys, value, says):
    with pytest.raises(SystemExit) as info:
        main(["--gpu", value])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith(f"error: argument --gpu: {says}"), err
    assert value == " " or "H200" in err
