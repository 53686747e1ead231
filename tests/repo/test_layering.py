"""The package's layering, checked on the source: a module may import only from its own
subpackage or from a lower layer, never upwards, and nothing inside the package imports the
top-level facades (``tec_fast/__init__``, ``tec_fast.train`` & co.: they exist for users)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "tec_fast"

LAYERS = [
    {"kernels"},                               # Triton kernels (top-level kernels/)
    {"config", "presets", "ops", "packing"},   # configs, the public ops and their dispatch, C++ packing
    {"checkpoint"},                            # reading / writing / inferring from weights
    {"models"},                                # ViT layers, base, TEC and MAE models, masking, layouts
    {"data"},                                  # datasets and augmentation
    {"training", "evaluation"},                # fit loop and objectives; k-NN / linear probe
    {"demo"},                                  # the embedded demo (trains and evaluates)
    {"cli"},                                   # argparse and printing
]
FACADES = {"__init__", "train", "eval", "export", "info", "masking", "native", "make_shards", "nn"}


def _layer(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"tec_fast.{part} is in no layer of tests/repo/test_layering.py: add it")


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("").parts
        yield path, rel
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield path, ("kernels", path.stem)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tec_fast":
                for alias in node.names:
                    yield f"tec_fast.{alias.name}", node.lineno
            elif node.module.startswith("tec_fast."):
                yield node.module, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute tec_fast.* imports")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tec_fast."):
                    yield alias.name, node.lineno


def test_no_upward_imports():
    problems = []
    for path, rel in _modules():
        if len(rel) == 1 and rel[0] in FACADES:
            continue  # the facades may import anything
        src = rel[0]
        for target, line in _imports(path):
            part = target.split(".")[1]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if part in FACADES or part in {"BaseModel", "TECModel", "ViTConfig", "TECConfig", "BaseTargets"}:
                problems.append(f"{where}: a user-facing facade; import the module that defines it")
            elif part != src and _layer(part) > _layer(src):
                problems.append(f"{where}: layer {_layer(part)} above layer {_layer(src)}")
    assert not problems, "\n".join(problems)


def test_every_subpackage_has_a_layer():
    for path in PKG.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            _layer(path.name)
        elif path.suffix == ".py" and path.stem not in FACADES:
            _layer(path.stem)
