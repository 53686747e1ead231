"""Checkpoints: safe reading and atomic writing (``io``), the layouts of released models
(``formats``), architecture inference from weights (``infer``), export (``export``)."""
from tec_fast.checkpoint.export import export_timm
from tec_fast.checkpoint.formats import (LoadReport, fold_cls_mlp, load_base_checkpoint,
                                         load_tec_checkpoint, read_state_dict)
from tec_fast.checkpoint.infer import count_blocks, infer_tec_config, infer_vit, stored_vit
from tec_fast.checkpoint.io import read_checkpoint, save_atomic

__all__ = ["export_timm", "LoadReport", "fold_cls_mlp", "load_base_checkpoint", "load_tec_checkpoint",
           "read_state_dict", "count_blocks", "infer_tec_config", "infer_vit", "stored_vit",
           "read_checkpoint", "save_atomic"]
