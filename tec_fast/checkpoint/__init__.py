"""Checkpoints: safe reading and atomic writing (``io``), the layouts of released models
(``formats``), architecture inference from weights (``infer``, the one place), position-embedding
resampling (``resample``), export (``export``)."""
from tec_fast.checkpoint.export import export_hf_vit, export_timm, save_export
from tec_fast.checkpoint.formats import (BaseWeights, LoadReport, base_nonfinite_keys, fold_cls_mlp,
                                         hf_vit_to_timm, load_base_checkpoint, load_tec_checkpoint,
                                         nonfinite_keys, read_base_weights, read_state_dict)
from tec_fast.checkpoint.infer import count_blocks, infer_base_vit, infer_tec_config, infer_vit, stored_vit
from tec_fast.checkpoint.io import (clean_stale_temp_files, read_checkpoint, read_safetensors, save_atomic,
                                    write_safetensors)
from tec_fast.checkpoint.resample import resample_pos_embed

__all__ = ["export_hf_vit", "export_timm", "save_export", "BaseWeights", "base_nonfinite_keys", "LoadReport",
           "fold_cls_mlp", "hf_vit_to_timm", "load_base_checkpoint", "load_tec_checkpoint", "nonfinite_keys",
           "read_base_weights", "read_state_dict", "count_blocks", "infer_base_vit", "infer_tec_config", "infer_vit",
           "stored_vit", "clean_stale_temp_files", "read_checkpoint", "read_safetensors", "save_atomic",
           "write_safetensors", "resample_pos_embed"]
