"""``python -m tec_fast.export CKPT OUT``: the encoder of a TEC checkpoint as a timm ViT state
dict (``patch_embed.proj``, ``cls_token`` with the input adapter's MLP folded in, ``pos_embed``,
``blocks.{i}``, ``norm``). The file loads into timm's ``vit_*`` (``num_classes=0``) and is a
valid base model for the next round of TEC (``--base tec:OUT``).

Accepts the engine's checkpoints (``checkpoint-*.pth``, which record their model config) and the
official TEC pretraining checkpoints (architecture from ``--model`` / ``--img-size``, decoder
sizes read from the weights). An MAE checkpoint of ``--objective mae`` exports its encoder in the
MAE release layout instead (what ``--base mae_vit_*:OUT`` reads).
"""
from __future__ import annotations

import argparse
import sys


from tec_fast.checkpoint.infer import infer_tec_config
from tec_fast.presets import MODEL_PRESETS, vit_preset


def export(ckpt_path: str, out_path: str, model: str = "vit_base_patch16", img_size: int = 224) -> dict:
    """Write the encoder of ``ckpt_path`` to ``out_path``; returns what was done."""
    from tec_fast.checkpoint import export_timm, read_checkpoint, save_atomic
    from tec_fast.config import TECConfig, ViTConfig
    from tec_fast.models.tec import TECModel

    ck = read_checkpoint(ckpt_path)
    if ck.get("kind") == "mae":
        from tec_fast.models.mae import MAEModel
        cfg = dict(ck["model_config"])
        mae = MAEModel(ViTConfig(**cfg.pop("vit")), **cfg)
        mae.load_state_dict(ck["model"])
        save_atomic({"model": mae.encoder_state_dict()}, out_path)
        return {"layout": "MAE release ({'model': encoder})", "tensors": len(mae.encoder_state_dict())}
    if "model_config" in ck:
        tec_cfg = TECConfig.from_dict(ck["model_config"])
    else:
        state = ck.get("model", ck)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        tec_cfg = infer_tec_config(state, vit_preset(model, img_size))
    tec = TECModel(tec_cfg)
    tec.load_checkpoint(ck)
    sd = export_timm(tec)
    save_atomic(sd, out_path)
    return {"layout": "timm ViT (MLP(cls) folded into cls_token)", "tensors": len(sd),
            "encoder": tec_cfg.encoder.to_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tec_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="engine checkpoint or official TEC checkpoint-N.pth")
    p.add_argument("out", metavar="OUT", help="where to write the encoder state dict (.pth)")
    p.add_argument("--model", choices=list(MODEL_PRESETS), default="vit_base_patch16", metavar="ARCH",
                   help="encoder architecture, for checkpoints that do not record it (default: "
                        f"%(default)s; one of {', '.join(MODEL_PRESETS)})")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args(argv)
    info = export(args.checkpoint, args.out, args.model, args.img_size)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
