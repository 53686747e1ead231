"""``python -m tec_fast.export CKPT OUT``: the encoder of a TEC checkpoint as a timm ViT state
dict (``patch_embed.proj``, ``cls_token`` with the input adapter's MLP folded in, ``pos_embed``,
``blocks.{i}``, ``norm``). The file loads into timm's ``vit_*`` (``num_classes=0``) and is a
valid base model for the next round of TEC (``--base tec:OUT``). An ``OUT`` ending in
``.safetensors`` is written as safetensors.

Accepts the engine's checkpoints (``checkpoint-*.pth``, which record their model config) and the
official TEC pretraining checkpoints (architecture from ``--model`` / ``--img-size``, decoder
sizes read from the weights). An MAE checkpoint of ``--objective mae`` exports its encoder in the
MAE release layout instead (what ``--base mae_vit_*:OUT`` reads). Weights holding NaN or inf
are refused.
"""
from __future__ import annotations

import argparse
import os
import sys

from tec_fast.checkpoint.infer import infer_tec_config
from tec_fast.cli.errors import nonfinite_keys, run_command
from tec_fast.cli.flags import POSITIVE, Parser, existing_file, output_file
from tec_fast.presets import MODEL_PRESETS, vit_preset

# a key every TEC training checkpoint has and an encoder-only file does not
TEC_DECODER_KEY = "forward_fea_decoder.decoder_embed.weight"


def _training_state(ck: dict, path: str) -> dict:
    """The model state of a TEC training checkpoint (``module.`` prefixes removed). ValueError
    for an encoder-only file (nothing to export) and for non-finite weights."""
    state = ck.get("model", ck)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = nonfinite_keys(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"refusing to export a broken encoder")
    if "model_config" not in ck and TEC_DECODER_KEY not in state:
        example = next((k for k in state if k.startswith("blocks.")), next(iter(state), "none"))
        raise ValueError(f"{path} is not a TEC training checkpoint (no {TEC_DECODER_KEY}; it holds "
                         f"{len(state)} tensors, e.g. {example!r}): it looks like an encoder already, "
                         f"usable as it is with --base KIND:{path} or python -m tec_fast.eval")
    return state


FORMATS = ("timm", "timm-avg", "hf")


def export(ckpt_path: str, out_path: str, model: str = "vit_base_patch16", img_size: int = 224,
           trust: bool = False, fmt: str = "timm") -> dict:
    """Write the encoder of ``ckpt_path`` to ``out_path`` in ``fmt`` (``FORMATS``); returns what
    was done."""
    from tec_fast.checkpoint import export_hf_vit, export_timm, read_checkpoint, save_atomic, save_export
    from tec_fast.config import TECConfig, ViTConfig
    from tec_fast.models.tec import TECModel

    ck = read_checkpoint(ckpt_path, trust=trust)
    state = _training_state(ck, ckpt_path)
    if ck.get("kind") == "mae":
        if "model_config" not in ck:
            raise ValueError(f"{ckpt_path}: an MAE checkpoint without the model_config the engine writes")
        from tec_fast.models.mae import MAEModel
        cfg = dict(ck["model_config"])
        mae = MAEModel(ViTConfig(**cfg.pop("vit")), **cfg)
        mae.load_state_dict(state)
        save_atomic({"model": mae.encoder_state_dict()}, out_path)
        return {"layout": "MAE release ({'model': encoder})", "tensors": len(mae.encoder_state_dict())}
    if "model_config" in ck:
        tec_cfg = TECConfig.from_dict(ck["model_config"])
    else:
        tec_cfg = infer_tec_config(state, vit_preset(model, img_size))
    tec = TECModel(tec_cfg)
    tec.load_checkpoint(ck)
    if fmt == "hf":
        sd = export_hf_vit(tec, out_path, vit=tec_cfg.encoder)
        layout = "Hugging Face ViTModel folder (config.json + model.safetensors)"
    else:
        sd = export_timm(tec, global_pool="avg" if fmt == "timm-avg" else "token")
        save_export(sd, out_path)
        layout = ("timm ViT, global_pool='avg' (fc_norm)" if fmt == "timm-avg" else "timm ViT") + \
            " (MLP(cls) folded into cls_token)"
    return {"layout": layout, "tensors": len(sd), "encoder": tec_cfg.encoder.to_dict()}


def build_parser() -> Parser:
    p = Parser(prog="python -m tec_fast.export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", type=existing_file,
                   help="engine checkpoint or official TEC checkpoint-N.pth")
    p.add_argument("out", metavar="OUT",
                   help="where to write the encoder: a file (.pth, or .safetensors), or a folder for --format hf")
    p.add_argument("--format", choices=FORMATS, default="timm",
                   help="timm: timm ViT state dict (vit_*(num_classes=0), strict); timm-avg: the same for "
                        "global_pool='avg' models (final norm named fc_norm, MAE's fine-tuning layout); "
                        "hf: a transformers ViTModel folder (from_pretrained). Default %(default)s")
    p.add_argument("--model", choices=list(MODEL_PRESETS), default="vit_base_patch16", metavar="ARCH",
                   help="encoder architecture, for checkpoints that do not record it (default: "
                        f"%(default)s; one of {', '.join(MODEL_PRESETS)})")
    p.add_argument("--img-size", type=POSITIVE, default=224)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that pickles Python objects other than "
                        "argparse.Namespace (it can run code from the file: only for files you trust)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.format == "hf":
        if os.path.isfile(args.out) or (os.path.isdir(args.out) and os.listdir(args.out)):
            p.refuse("OUT", f"{args.out!r} must be a new or empty folder for --format hf")
    else:
        try:
            args.out = output_file(args.out)
        except argparse.ArgumentTypeError as exc:
            p.refuse("OUT", str(exc))
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        p.refuse("OUT", "is the checkpoint being read; write the encoder to another file")
    patch = MODEL_PRESETS[args.model][0]
    if args.img_size % patch:
        p.refuse("--img-size", f"{args.img_size} is not a multiple of {args.model}'s patch size {patch}")
    return args


def main(argv=None) -> int:
    """The command: exit status 0, or 2 with one ``error:`` line."""
    return run_command(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    info = export(args.checkpoint, args.out, args.model, args.img_size, trust=args.trust_checkpoint,
                  fmt=args.format)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
