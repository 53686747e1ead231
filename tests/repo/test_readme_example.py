"""The masked-image model of docs/kernels.md runs, on the reference path and (through the Triton
interpreter) on the kernels, and its CUDA-graph step on a GPU. The section is read from the doc."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADING = "## A masked-image model on the ops"
DOC = os.path.join(ROOT, "docs", "kernels.md")


def _example_code(index: int = 0) -> str:
    path = DOC
    with open(path) as f:
        text = f.read()
    assert HEADING in text, f"{path} has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]  # up to the next section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in the section of {path}"
    return blocks[index]


def _kernel_mode(mode, monkeypatch, request) -> None:
    if mode == "triton":
        request.getfixturevalue("triton_path")
    else:
        monkeypatch.setenv("TEC_FAST_KERNELS", "reference")


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_readme_example_runs(mode, monkeypatch, request, capsys):
    _kernel_mode(mode, monkeypatch, request)
    exec(compile(_example_code(), "docs/kernels.md example", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\S+)", out)]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses), out


@pytest.mark.gpu
def test_readme_cuda_graph_example_runs(capsys):
    """The second block: TinyMIM's step recorded with capture_step and replayed on CUDA."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    scope = {"__name__": "readme_example"}
    exec(compile(_example_code(0), "docs/kernels.md example", "exec"), scope)
    exec(compile(_example_code(1), "docs/kernels.md CUDA-graph example", "exec"), scope)
    losses = [float(v) for v in re.findall(r"graph step \d: loss (\S+)", capsys.readouterr().out)]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_vit_block_example_runs(mode, monkeypatch, request, capsys):
    """The section on ``vit_block``: a stack of blocks through the op gives what the modules give."""
    _kernel_mode(mode, monkeypatch, request)
    with open(DOC) as f:
        section = f.read().split("## A whole ViT block as one op", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", re.split(r"\n## ", section, maxsplit=1)[0], flags=re.S)
    exec(compile(code, "docs/kernels.md vit_block example", "exec"), {"__name__": "vit_block_example"})
    (diff,) = re.findall(r"max \|difference\| to the modules: (\S+)", capsys.readouterr().out)
    assert float(diff) < 1e-4, diff
