"""``python -m tec_fast.export CKPT OUT``: the encoder of a TEC checkpoint as a timm ViT state
dict (``patch_embed.proj``, ``cls_token`` with the input adapter's MLP folded in, ``pos_embed``,
``blocks.{i}``, ``norm``). The file loads into timm's ``vit_*`` (``num_classes=0``) and is a
valid base model for the next round of TEC (``--base tec:OUT``). An ``OUT`` ending in
``.safetensors`` is written as safetensors.

The architecture is read from the checkpoint: the model config the engine's checkpoints record,
else the weights themselves (width, depth, patch and image size from the tensor shapes, decoder
sizes likewise; the head count from the matching preset). ``--model`` / ``--img-size`` /
``--num-heads`` are only needed where the checkpoint cannot tell, and are checked against it.
``--format hf`` writes the head count into config.json, so it needs ``--num-heads`` where the
head count would be a guess (no stored config, no matching preset). Accepts the engine's
checkpoints (``checkpoint-*.pth``) and the official TEC pretraining checkpoints. An MAE
training checkpoint (``--objective mae``, or any with MAE's decoder) exports its encoder with
``--format timm`` in the MAE release layout instead (``{'model': encoder}``, what ``--base
mae_vit_*:OUT`` reads; a flat state dict for a ``.safetensors`` OUT); ``timm-avg`` and ``hf``
are written as for TEC. A checkpoint of ``eval --protocol linprobe / finetune`` exports its
(fine-tuned) encoder, as its recorded ``encoder_config`` describes it; a fine-tuning with MAE's
global pool moved the final LayerNorm out of the encoder (``fc_norm``, applied to the mean of the
patch tokens), which only ``--format timm-avg`` holds. Weights holding NaN or inf are refused.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Tuple

from tec_fast.checkpoint import nonfinite_keys
from tec_fast.checkpoint.formats import is_protocol_checkpoint
from tec_fast.checkpoint.infer import infer_tec_config, infer_vit
from tec_fast.cli.errors import one_line, run_command
from tec_fast.cli.flags import POSITIVE, Parser, existing_file, output_file, same_file
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
    if not isinstance(state, dict):
        raise ValueError(f"{path}: its 'model' entry is a {type(state).__name__}, not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    bad = nonfinite_keys(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} weights hold NaN or inf values ({', '.join(bad[:3])}); "
                         f"refusing to export a broken encoder")
    if "model_config" not in ck and TEC_DECODER_KEY not in state and MAE_DECODER_KEY not in state:
        example = next((k for k in state if k.startswith("blocks.")), next(iter(state), "none"))
        raise ValueError(f"{path} is not a TEC training checkpoint (no {TEC_DECODER_KEY}; it holds "
                         f"{len(state)} tensors, e.g. {example!r}): it looks like an encoder already, "
                         f"usable as it is: python -m tec_fast.train --base KIND:{path}, or "
                         f"python -m tec_fast.eval {path}")
    return state


def _preset_for(patch: int, dim: int, depth: int) -> Optional[str]:
    return next((name for name, (p, d, n, _) in MODEL_PRESETS.items() if (p, d, n) == (patch, dim, depth)), None)


def encoder_architecture(state: dict, path: str, model: Optional[str] = None, img_size: Optional[int] = None,
                         num_heads: Optional[int] = None) -> Tuple[object, str, bool]:
    """(ViTConfig, where it came from, whether the head count is a guess) of the encoder whose
    weights are ``state``: read from the tensor shapes (``checkpoint.infer.infer_vit``), the head
    count from ``num_heads`` or ``model``, else the matching preset, else guessed as width / 64
    (the weights do not hold it). ``model`` / ``img_size`` / ``num_heads`` (the ``--model`` /
    ``--img-size`` / ``--num-heads`` flags) must agree with the weights and with each other; a
    ValueError names the flag and the value that would work."""
    from tec_fast.checkpoint.infer import count_blocks
    from tec_fast.config import ViTConfig

    if "patch_embed.proj.weight" not in state or not count_blocks(state):
        example = next(iter(state), "none")
        raise ValueError(f"{path}: no encoder to export (patch_embed.proj.weight and blocks.{{i}}.* are needed; "
                         f"it holds {len(state)} tensors, e.g. {example!r})")
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
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"--num-heads {num_heads} contradicts --model {model}, which has {heads} heads; "
                             f"give one of them")
        fields["num_heads"], note = heads, f"num_heads={heads} from --model {model}"
    elif num_heads is not None:
        if dim % num_heads:
            raise ValueError(f"{path}: --num-heads {num_heads} does not divide the encoder's width {dim}")
        fields["num_heads"], note = num_heads, f"num_heads={num_heads} from --num-heads"
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
    guessed = model is None and num_heads is None and match is None
    return ViTConfig(**fields), source, guessed


def _check_stored_encoder(enc, path: str, model: Optional[str] = None, img_size: Optional[int] = None,
                         num_heads: Optional[int] = None) -> None:
    """ValueError where ``--model`` / ``--img-size`` / ``--num-heads`` contradict the encoder
    config ``enc`` recorded in the checkpoint ``path``, naming both values (the stored config
    is what the weights were trained as, so it wins)."""
    if model is not None:
        p, d, n, heads = MODEL_PRESETS[model]
        if (p, d, n, heads) != (enc.patch_size, enc.embed_dim, enc.depth, enc.num_heads):
            raise ValueError(f"{path} records its encoder as patch {enc.patch_size}, width {enc.embed_dim}, "
                             f"{enc.depth} blocks, {enc.num_heads} heads, which --model {model} (patch {p}, "
                             f"width {d}, {n} blocks, {heads} heads) contradicts; leave --model out")
    if img_size is not None and img_size != enc.img_size:
        raise ValueError(f"{path} records img_size={enc.img_size}, which --img-size {img_size} "
                         f"contradicts; use --img-size {enc.img_size} or leave it out")
    if num_heads is not None and num_heads != enc.num_heads:
        raise ValueError(f"{path} records num_heads={enc.num_heads}, which --num-heads {num_heads} "
                         f"contradicts; leave --num-heads out")


FORMATS = ("timm", "timm-avg", "hf")
_STORED = "the model config stored in the checkpoint"


def export(ckpt_path: str, out_path: str, model: Optional[str] = None, img_size: Optional[int] = None,
           trust: bool = False, fmt: str = "timm", num_heads: Optional[int] = None) -> dict:
    """Write the encoder of ``ckpt_path`` to ``out_path`` in ``fmt`` (``FORMATS``); returns what
    was done. ``model`` / ``img_size`` / ``num_heads``: the architecture where the checkpoint
    cannot tell it (checked against it where it can). ``fmt='hf'`` is refused where the head
    count it would write into config.json is only a guess and ``num_heads`` is not given."""
    from tec_fast.checkpoint import load_tec_checkpoint, read_checkpoint
    from tec_fast.config import TECConfig
    from tec_fast.models.tec import TECModel

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ck = read_checkpoint(ckpt_path, trust=trust)
    if is_protocol_checkpoint(ck):
        return _export_protocol(ck, ckpt_path, out_path, model, img_size, num_heads, fmt)
    state = _training_state(ck, ckpt_path)
    if ck.get("kind") == "mae" or (TEC_DECODER_KEY not in state and MAE_DECODER_KEY in state):
        return _export_mae(ck, state, ckpt_path, out_path, model, img_size, num_heads, fmt)
    guessed = False
    if "model_config" in ck:
        tec_cfg, source = stored_config(ck, ckpt_path, TECConfig.from_dict), _STORED
        _check_stored_encoder(tec_cfg.encoder, ckpt_path, model, img_size, num_heads)
    else:
        vit, source, guessed = encoder_architecture(state, ckpt_path, model, img_size, num_heads)
        tec_cfg = infer_tec_config(state, vit)
    _refuse_guessed_heads(fmt, guessed, tec_cfg.encoder, ckpt_path)
    tec = TECModel(tec_cfg)
    load_tec_checkpoint(tec, ck, source=ckpt_path)
    info = _write(tec, tec_cfg.encoder, out_path, fmt)
    info["layout"] += "" if fmt == "hf" else " (MLP(cls) folded into cls_token)"
    return dict(info, encoder=tec_cfg.encoder.to_dict(), source=source)


def _export_mae(ck: dict, state: dict, path: str, out_path: str, model: Optional[str],
                img_size: Optional[int], num_heads: Optional[int], fmt: str) -> dict:
    """``export`` of an MAE training checkpoint: its encoder (timm names already). ``timm`` is
    the MAE release layout (``{'model': encoder}``; a flat state dict as safetensors)."""
    from tec_fast.checkpoint import save_atomic, save_export
    from tec_fast.config import ViTConfig
    from tec_fast.models.mae import MAEModel

    guessed = False
    if "model_config" in ck:
        def build(record):  # MAEModel.config_dict's form: {'vit': ViTConfig fields, decoder sizes}
            cfg = dict(record)
            vit = ViTConfig.from_dict(cfg.pop("vit"))
            return vit, MAEModel(vit, **cfg)
        (vit, mae), source = stored_config(ck, path, build), _STORED
        _check_stored_encoder(vit, path, model, img_size, num_heads)
        try:
            mae.load_state_dict(state)
        except RuntimeError as exc:  # keys or shapes that do not fit the recorded model
            raise ValueError(f"{path}: the weights do not fit the MAE model its model_config records: "
                             f"{exc}") from None
        encoder = mae.encoder_state_dict()
    else:  # the MAE release layout: the encoder's keys as they are
        vit, source, guessed = encoder_architecture(state, path, model, img_size, num_heads)
        encoder = {k: v for k, v in state.items() if k.startswith(MAE_ENCODER_PREFIXES)}
    _refuse_guessed_heads(fmt, guessed, vit, path)
    if fmt != "timm":
        info = _write(encoder, vit, out_path, fmt)
    elif os.fspath(out_path).endswith(".safetensors"):
        save_export(encoder, out_path)
        info = {"layout": "MAE release encoder, safetensors (timm names)", "tensors": len(encoder)}
    else:
        save_atomic({"model": encoder}, out_path)
        info = {"layout": "MAE release ({'model': encoder})", "tensors": len(encoder)}
    return dict(info, encoder=vit.to_dict(), source=source)


def _export_protocol(ck: dict, path: str, out_path: str, model: Optional[str], img_size: Optional[int],
                     num_heads: Optional[int], fmt: str) -> dict:
    """``export`` of an ``eval --protocol`` checkpoint: its encoder (``encoder.*``, and a fine-tuned
    global pool's ``fc_norm``), built as the recorded ``encoder_config`` and loaded as a base model
    is (shapes, missing keys and non-finite weights refused); the classifier is left out."""
    from tec_fast.checkpoint import load_base_checkpoint, read_base_weights, read_state_dict
    from tec_fast.config import ViTConfig
    from tec_fast.models.base import BaseModel

    vit = stored_config(ck, path, ViTConfig.from_dict, key="encoder_config")
    _check_stored_encoder(vit, path, model, img_size, num_heads)
    if fmt != "timm-avg" and "fc_norm.weight" in read_state_dict(ck):
        raise ValueError(f"{path}: this --protocol {ck['protocol']} run's final LayerNorm (fc_norm) normalises the "
                         f"mean of the patch tokens (MAE's global pool), which --format {fmt} has no place for (its "
                         f"final norm acts on each token): use --format timm-avg (timm's vit_*(global_pool='avg'))")
    base = BaseModel(vit, topk=None)
    with warnings.catch_warnings():  # its list of the keys left out: said below, as the output's layout
        warnings.filterwarnings("ignore", message="BaseModel.load_checkpoint")
        report = load_base_checkpoint(base, read_base_weights(ck, source=path))
    left = sorted({k.split(".")[0] + ".*" for k in report.ignored + report.unexpected})
    info = _write(base, vit, out_path, fmt)
    info["layout"] += f" (the encoder of an eval --protocol {ck['protocol']} run; left out: {', '.join(left)})"
    return dict(info, encoder=vit.to_dict(), source="the encoder_config stored in the checkpoint")


def stored_config(ck: dict, path: str, build, key: str = "model_config"):
    """``build(ck[key])``: the model config the engine's checkpoints record. A record damaged by
    hand (not a mapping, a field missing or unknown, a value out of range) is a ValueError naming
    the file and ``key``, not the dataclass's TypeError."""
    record = ck[key]
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its {key} is a {type(record).__name__}, not a mapping of "
                         f"config fields (damaged checkpoint?)")
    try:
        return build(record)
    except (ValueError, TypeError, KeyError) as exc:
        why = f"field {exc} is missing" if isinstance(exc, KeyError) else one_line(exc)
        raise ValueError(f"{path}: its {key} does not describe a model: {why} (damaged "
                         f"checkpoint?)") from None


def _refuse_guessed_heads(fmt: str, guessed: bool, vit, path: str) -> None:
    if fmt == "hf" and guessed:
        raise ValueError(f"{path}: the head count is not stored in the checkpoint and no preset has patch "
                         f"{vit.patch_size}, width {vit.embed_dim}, {vit.depth} blocks; --format hf would write "
                         f"the guess num_heads={vit.num_heads} into config.json: pass --num-heads")


def _write(model, vit, out_path: str, fmt: str) -> dict:
    """``model`` (a model or a state dict in timm names) written as ``fmt``: a Hugging Face
    folder, else a timm state dict (``.safetensors`` or torch.save)."""
    from tec_fast.checkpoint import export_hf_vit, export_timm, save_export

    if fmt == "hf":
        sd = export_hf_vit(model, out_path, vit=vit)
        return {"layout": "Hugging Face ViTModel folder (config.json + model.safetensors)", "tensors": len(sd)}
    sd = export_timm(model, global_pool="avg" if fmt == "timm-avg" else "token")
    written = save_export(sd, out_path)
    layout = "timm ViT, global_pool='avg' (fc_norm)" if fmt == "timm-avg" else "timm ViT"
    return {"layout": layout + (", safetensors" if written == "safetensors" else ""), "tensors": len(sd)}


def build_parser() -> Parser:
    text = __doc__.replace("``", "")  # the docstring's markup is not for a terminal
    p = Parser(prog="python -m tec_fast.export", description=text.split("\n\n")[0],
               epilog=text.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", type=existing_file,
                   help="engine checkpoint (train, or eval --protocol) or official TEC checkpoint-N.pth")
    p.add_argument("out", metavar="OUT",
                   help="where to write the encoder: a file (.pth, or .safetensors), or a folder for --format hf")
    p.add_argument("--format", choices=FORMATS, default="timm",
                   help="timm: timm ViT state dict (vit_*(num_classes=0), strict; of an MAE training "
                        "checkpoint: MAE's release layout {'model': encoder}, for --base mae_vit_*:OUT or "
                        "load_state_dict(torch.load(OUT)['model'])); timm-avg: the same for "
                        "global_pool='avg' models (final norm named fc_norm, MAE's fine-tuning layout); "
                        "hf: a transformers ViTModel folder (from_pretrained). Default %(default)s")
    p.add_argument("--model", choices=list(MODEL_PRESETS), default=None, metavar="ARCH",
                   help="encoder architecture; default: read from the checkpoint (stored config, else the "
                        "weights' shapes, heads from the matching preset). Given, it must match the weights "
                        f"and sets the head count. One of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--img-size", type=POSITIVE, default=None,
                   help="input resolution; default: the grid of the checkpoint's position embedding "
                        "(needed only for a checkpoint without one)")
    p.add_argument("--num-heads", type=POSITIVE, default=None,
                   help="attention heads (the weights do not hold them); default: the stored config, "
                        "--model, the matching preset, else width/64 (a guess --format hf refuses)")
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
    if same_file(args.out, args.checkpoint):
        p.refuse("OUT", "is the checkpoint being read; write the encoder to another file")
    if args.model is not None and args.img_size is not None and args.img_size % MODEL_PRESETS[args.model][0]:
        p.refuse("--img-size", f"{args.img_size} is not a multiple of {args.model}'s patch size "
                               f"{MODEL_PRESETS[args.model][0]}")
    if args.model is not None and args.num_heads is not None and args.num_heads != MODEL_PRESETS[args.model][3]:
        p.refuse("--num-heads", f"{args.num_heads} contradicts --model {args.model}, which has "
                                f"{MODEL_PRESETS[args.model][3]} heads; give one of them")
    return args


def main(argv=None) -> int:
    """The command: exit status 0, or 2 with one ``error:`` line."""
    return run_command(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    info = export(args.checkpoint, args.out, args.model, args.img_size, trust=args.trust_checkpoint,
                  fmt=args.format, num_heads=args.num_heads)
    enc = info.get("encoder")
    arch = (f"; encoder patch {enc['patch_size']}, width {enc['embed_dim']}, {enc['depth']} blocks, "
            f"{enc['num_heads']} heads, image {enc['img_size']} ({info['source']})") if enc else ""
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['layout']}{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
