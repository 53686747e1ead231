"""``python -m tec_fast.export CKPT OUT``: the encoder of a TEC checkpoint as a timm ViT state
dict (``patch_embed.proj``, ``cls_token`` with the input adapter's MLP folded in, ``pos_embed``,
``blocks.{i}``, ``norm``). The file loads into timm's ``vit_*`` (``num_classes=0``) and is a
valid base model for the next round of TEC (``--base tec:OUT``). An ``OUT`` ending in
``.safetensors`` is written as safetensors.

The architecture is read from the checkpoint: the model config the engine's checkpoints record,
else the weights themselves (width, depth, patch and image size from the tensor shapes, decoder
sizes likewise; the head count from the matching preset). ``--model`` / ``--img-size`` are only
needed where the weights cannot tell, and are checked against them. Accepts the engine's
checkpoints (``checkpoint-*.pth``) and the official TEC pretraining checkpoints. An MAE
training checkpoint (``--objective mae``, or any with MAE's decoder) exports its encoder in the
MAE release layout instead (what ``--base mae_vit_*:OUT`` reads). Weights holding NaN or inf are
refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

from tec_fast.checkpoint.infer import infer_tec_config, infer_vit
from tec_fast.cli.errors import nonfinite_keys, run_command
from tec_fast.cli.flags import POSITIVE, Parser, existing_file, output_file
from tec_fast.presets import MODEL_PRESETS

# a key every TEC training checkpoint has and an encoder-only file does not
TEC_DECODER_KEY = "forward_fea_decoder.decoder_embed.weight"
# the keys of MAE's pixel decoder (an MAE training checkpoint, the engine's or the MAE release's)
MAE_DECODER_KEY = "decoder_pred.weight"
MAE_ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def _training_state(ck: dict, path: str) -> dict:
    """The model state of a TEC or MAE training checkpoint (``module.`` prefixes removed).
    ValueError for an encoder-only file (nothing to export) and for non-finite weights."""
    state = ck.get("model", ck)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = nonfinite_keys(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"refusing to export a broken encoder")
    if "model_config" not in ck and TEC_DECODER_KEY not in state and MAE_DECODER_KEY not in state:
        example = next((k for k in state if k.startswith("blocks.")), next(iter(state), "none"))
        raise ValueError(f"{path} is not a TEC training checkpoint (no {TEC_DECODER_KEY}; it holds "
                         f"{len(state)} tensors, e.g. {example!r}): it looks like an encoder already, "
                         f"usable as it is with --base KIND:{path} or python -m tec_fast.eval")
    return state


def _preset_for(patch: int, dim: int, depth: int) -> Optional[str]:
    return next((name for name, (p, d, n, _) in MODEL_PRESETS.items() if (p, d, n) == (patch, dim, depth)), None)


def encoder_architecture(state: dict, path: str, model: Optional[str] = None,
                         img_size: Optional[int] = None) -> Tuple[object, str]:
    """(ViTConfig, where it came from) of the encoder whose weights are ``state``: read from the
    tensor shapes (``checkpoint.infer.infer_vit``), the head count from ``model`` or the matching
    preset. ``model`` / ``img_size`` (the ``--model`` / ``--img-size`` flags) must agree with the
    weights; a ValueError names the flag and the value that would work."""
    from tec_fast.config import ViTConfig

    fields, note = infer_vit(state)
    patch, dim, depth = fields["patch_size"], fields["embed_dim"], fields["depth"]
    match = _preset_for(patch, dim, depth)
    if model is not None:
        p, d, n, heads = MODEL_PRESETS[model]
        if (p, d, n) != (patch, dim, depth):
            fix = f"use --model {match}" if match else "leave --model out"
            raise ValueError(f"{path}: the encoder weights are patch {patch}, width {dim}, {depth} blocks but "
                             f"--model {model} is patch {p}, width {d}, {n} blocks; {fix} (the architecture "
                             f"is read from the weights)")
        fields["num_heads"], note = heads, f"num_heads={heads} from --model {model}"
    stored = fields.get("img_size")
    if img_size is not None and stored is not None and img_size != stored:
        raise ValueError(f"{path}: the position embedding holds a {stored // patch}x{stored // patch} grid of "
                         f"{patch}-pixel patches (image size {stored}) but --img-size is {img_size}; use "
                         f"--img-size {stored} or leave it out")
    if stored is None:
        if img_size is None:
            raise ValueError(f"{path}: the checkpoint has no pos_embed to read the image size from; "
                             f"pass --img-size (a multiple of the patch size {patch})")
        if img_size % patch:
            raise ValueError(f"{path}: --img-size {img_size} is not a multiple of the weights' patch size {patch}")
        fields["img_size"] = img_size
    source = "read from the weights" + (f"; {note}" if note else "")
    return ViTConfig(**fields), source


FORMATS = ("timm", "timm-avg", "hf")


def export(ckpt_path: str, out_path: str, model: Optional[str] = None, img_size: Optional[int] = None,
           trust: bool = False, fmt: str = "timm") -> dict:
    """Write the encoder of ``ckpt_path`` to ``out_path`` in ``fmt`` (``FORMATS``); returns what
    was done. ``model`` / ``img_size``: the architecture where the checkpoint cannot tell it
    (checked against the weights where it can)."""
    from tec_fast.checkpoint import export_hf_vit, export_timm, read_checkpoint, save_atomic, save_export
    from tec_fast.config import TECConfig
    from tec_fast.models.tec import TECModel

    ck = read_checkpoint(ckpt_path, trust=trust)
    state = _training_state(ck, ckpt_path)
    if ck.get("kind") == "mae" or (TEC_DECODER_KEY not in state and MAE_DECODER_KEY in state):
        if "model_config" in ck:
            from tec_fast.config import ViTConfig
            from tec_fast.models.mae import MAEModel
            cfg = dict(ck["model_config"])
            mae = MAEModel(ViTConfig(**cfg.pop("vit")), **cfg)
            mae.load_state_dict(state)
            encoder = mae.encoder_state_dict()
        else:  # the MAE release layout: the encoder's keys as they are
            encoder_architecture(state, ckpt_path, model, img_size)  # refuses contradicting flags
            encoder = {k: v for k, v in state.items() if k.startswith(MAE_ENCODER_PREFIXES)}
        save_atomic({"model": encoder}, out_path)
        return {"layout": "MAE release ({'model': encoder})", "tensors": len(encoder)}
    if "model_config" in ck:
        tec_cfg, source = TECConfig.from_dict(ck["model_config"]), "the model config stored in the checkpoint"
        enc = tec_cfg.encoder
        if model is not None and MODEL_PRESETS[model][:3] != (enc.patch_size, enc.embed_dim, enc.depth):
            raise ValueError(f"{ckpt_path} records its encoder (patch {enc.patch_size}, width {enc.embed_dim}, "
                             f"{enc.depth} blocks), which --model {model} contradicts; leave --model out")
        if img_size is not None and img_size != enc.img_size:
            raise ValueError(f"{ckpt_path} records img_size={enc.img_size}, which --img-size {img_size} "
                             f"contradicts; use --img-size {enc.img_size} or leave it out")
    else:
        vit, source = encoder_architecture(state, ckpt_path, model, img_size)
        tec_cfg = infer_tec_config(state, vit)
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
    return {"layout": layout, "tensors": len(sd), "encoder": tec_cfg.encoder.to_dict(), "source": source}


def build_parser() -> Parser:
    p = Parser(prog="python -m tec_fast.export", description=__doc__.split("\n\n")[0],
               epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", type=existing_file,
                   help="engine checkpoint or official TEC checkpoint-N.pth")
    p.add_argument("out", metavar="OUT",
                   help="where to write the encoder: a file (.pth, or .safetensors), or a folder for --format hf")
    p.add_argument("--format", choices=FORMATS, default="timm",
                   help="timm: timm ViT state dict (vit_*(num_classes=0), strict); timm-avg: the same for "
                        "global_pool='avg' models (final norm named fc_norm, MAE's fine-tuning layout); "
                        "hf: a transformers ViTModel folder (from_pretrained). Default %(default)s")
    p.add_argument("--model", choices=list(MODEL_PRESETS), default=None, metavar="ARCH",
                   help="encoder architecture; default: read from the checkpoint (stored config, else the "
                        "weights' shapes, heads from the matching preset). Given, it must match the weights "
                        f"and sets the head count. One of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--img-size", type=POSITIVE, default=None,
                   help="input resolution; default: the grid of the checkpoint's position embedding "
                        "(needed only for a checkpoint without one)")
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
    if args.model is not None and args.img_size is not None and args.img_size % MODEL_PRESETS[args.model][0]:
        p.refuse("--img-size", f"{args.img_size} is not a multiple of {args.model}'s patch size "
                               f"{MODEL_PRESETS[args.model][0]}")
    return args


def main(argv=None) -> int:
    """The command: exit status 0, or 2 with one ``error:`` line."""
    return run_command(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    info = export(args.checkpoint, args.out, args.model, args.img_size, trust=args.trust_checkpoint,
                  fmt=args.format)
    enc = info.get("encoder")
    arch = (f"; encoder patch {enc['patch_size']}, width {enc['embed_dim']}, {enc['depth']} blocks, "
            f"{enc['num_heads']} heads, image {enc['img_size']} ({info['source']})") if enc else ""
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['layout']}{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
