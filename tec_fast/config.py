"""Configuration dataclasses: the encoder (`ViTConfig`) and the TEC model around it (`TECConfig`).

Both validate themselves in ``__post_init__`` and raise ``ValueError`` naming the field.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Optional


def is_real(value) -> bool:
    """A real number (int, float, NumPy scalar, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value, name: str) -> None:
    """``value`` is an int > 0 (not a bool, str or float), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_finite(value, name: str, what: str = "a finite number") -> None:
    """``value`` is a finite real number (not a bool, str or None), else a ValueError naming ``name``."""
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_mlp_ratio(ratio, dim: int, name: str, dim_name: str) -> None:
    """An MLP width ratio: a finite number > 0 whose hidden width int(dim * ratio) is at least 1."""
    check_finite(ratio, name, "a finite number > 0")
    if not ratio > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {ratio!r}")
    if int(dim * ratio) < 1:
        raise ValueError(f"{name} ({ratio!r}) gives an MLP hidden width int({dim_name} * mlp_ratio) = "
                         f"int({dim} * {ratio!r}) = 0; it must be at least 1")


def _positive_int(obj, name: str) -> None:
    check_positive_int(getattr(obj, name), f"{type(obj).__name__}.{name}")


def _fields_from_dict(cls, d, where: str) -> dict:
    """``d`` checked to be a dict holding only ``cls``'s fields (a ValueError naming ``where`` and
    the unknown field otherwise); a shallow copy."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict of {cls.__name__} fields, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} ({cls.__name__}'s fields: {', '.join(known)})")
    return dict(d)


MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass
class ViTConfig:
    """A pre-norm ViT: stride-p conv patch embedding, one CLS token, ``depth`` blocks.

    The fields after ``in_chans`` describe the variants of released base models; their defaults
    are the plain MAE/iBOT/DINO ViT (the new model is always that plain ViT):
    ``class_token`` (False: class-token-free ViTs pooled by averaging), ``reg_tokens`` (DINOv2
    registers, a distilled DeiT's dist token; between the CLS token and the patches),
    ``no_embed_class`` (DeiT-III, DINOv2-reg: the position embedding covers the patches only),
    ``layer_scale`` (``ls1.gamma`` / ``ls2.gamma``: DINOv2, DeiT-III), ``pre_norm`` (CLIP: a
    LayerNorm ``norm_pre`` before the blocks), ``patch_bias`` (CLIP: False), ``qkv_bias``,
    ``ln_eps`` (timm/MAE 1e-6, CLIP 1e-5, HF 1e-12) and ``mlp_act`` (one of MLP_ACTIVATIONS).
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    in_chans: int = 3
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    layer_scale: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    mlp_act: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            _positive_int(self, name)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size ({self.img_size}) must be a multiple of "
                f"ViTConfig.patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                f"ViTConfig.num_heads ({self.num_heads})")
        check_mlp_ratio(self.mlp_ratio, self.embed_dim, "ViTConfig.mlp_ratio", "embed_dim")
        for name in ("class_token", "no_embed_class", "layer_scale", "pre_norm", "patch_bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"ViTConfig.reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if not (is_real(self.ln_eps) and 0 < self.ln_eps < 1):
            raise ValueError(f"ViTConfig.ln_eps must be a float in (0, 1), got {self.ln_eps!r}")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"ViTConfig.mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the CLS token, then the register tokens."""
        return int(self.class_token) + self.reg_tokens

    @property
    def pos_embed_len(self) -> int:
        """Rows of the position embedding: the patches, plus the prefix tokens unless no_embed_class."""
        return self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)

    def plain(self) -> "ViTConfig":
        """The plain ViT of docs/tec.md §1 with this one's size (what TECModel and MAEModel build)."""
        return ViTConfig(**{k: getattr(self, k) for k in _PLAIN_FIELDS})

    @property
    def is_plain(self) -> bool:
        return self == self.plain()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "ViTConfig.from_dict") -> "ViTConfig":
        """The config ``to_dict`` gave; an unknown field or a value that is not a dict is a
        ValueError naming it (fields left out take their defaults)."""
        return cls(**_fields_from_dict(cls, d, where))


_PLAIN_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans")


@dataclass
class TECConfig:
    """The new model: encoder + input adapter + encoder adapter + two decoders sharing blocks.

    ``pred_dim`` / ``pred_heads`` are the *base* model's width and head count (the targets'
    shape); they default to the encoder's. ``num_adapters`` defaults to ``depth // 3`` (ViT-B: 4),
    or, where that does not divide the depth, to the largest number below it that does (depth 10: 2).
    """

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    input_adapter: bool = True
    relation: bool = True
    tau: Optional[float] = 1.8
    pred_dim: Optional[int] = None
    pred_heads: Optional[int] = None
    num_adapters: Optional[int] = None
    feature_weight: float = 1.0
    relation_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = ViTConfig.from_dict(self.encoder, "TECConfig.encoder")
        if not isinstance(self.encoder, ViTConfig):
            raise ValueError(f"TECConfig.encoder must be a ViTConfig, got {type(self.encoder).__name__}")
        if not self.encoder.is_plain:
            odd = {k: v for k, v in self.encoder.to_dict().items() if v != getattr(self.encoder.plain(), k)}
            raise ValueError(f"TECConfig.encoder must be a plain ViT (the new model has no base-model "
                             f"variants), got {odd}; use ViTConfig.plain()")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            _positive_int(self, name)
        for name, dim in (("encoder.embed_dim", self.encoder.embed_dim), ("decoder_dim", self.decoder_dim)):
            if dim % 4:  # the 2-D sin-cos position table splits each width in four
                raise ValueError(f"TECConfig.{name} ({dim}) must be divisible by 4 (the new model's "
                                 f"2-D sin-cos position embedding)")
        for name in ("input_adapter", "relation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TECConfig.{name} must be a bool, got {getattr(self, name)!r}")
        # the decoder blocks use the encoder's mlp_ratio on the decoder's width
        check_mlp_ratio(self.encoder.mlp_ratio, self.decoder_dim, "TECConfig.encoder.mlp_ratio", "decoder_dim")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"TECConfig.decoder_dim ({self.decoder_dim}) must be divisible by "
                f"TECConfig.decoder_heads ({self.decoder_heads})")
        if self.pred_dim is None:
            self.pred_dim = self.encoder.embed_dim
        if self.pred_heads is None:
            self.pred_heads = self.encoder.num_heads
        _positive_int(self, "pred_dim")
        _positive_int(self, "pred_heads")
        if self.pred_dim % self.pred_heads:
            raise ValueError(
                f"TECConfig.pred_dim ({self.pred_dim}) must be divisible by "
                f"TECConfig.pred_heads ({self.pred_heads})")
        if self.num_adapters is None:  # depth // 3, or the largest divisor of the depth below it
            depth = self.encoder.depth
            self.num_adapters = next(g for g in range(max(1, depth // 3), 0, -1) if depth % g == 0)
        _positive_int(self, "num_adapters")
        if self.encoder.depth % self.num_adapters:
            raise ValueError(
                f"TECConfig.num_adapters ({self.num_adapters}) must divide the encoder depth "
                f"(ViTConfig.depth = {self.encoder.depth}) into equal groups of blocks")
        if self.tau is not None or self.relation:  # None: only without the relation loss
            what = "a finite number > 0" + (" when relation=True" if self.relation else " or None")
            check_finite(self.tau, "TECConfig.tau", what)
            if not self.tau > 0:
                raise ValueError(f"TECConfig.tau must be {what}, got {self.tau!r}")
        for name in ("feature_weight", "relation_weight"):
            value = getattr(self, name)
            check_finite(value, f"TECConfig.{name}", "a finite number >= 0")
            if not value >= 0:
                raise ValueError(f"TECConfig.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TECConfig":
        """The config ``to_dict`` gave. ``encoder`` is required (a dict of ViTConfig fields, or a
        ViTConfig); an unknown field, a missing encoder or a value that is not a dict is a
        ValueError naming it."""
        d = _fields_from_dict(cls, d, "TECConfig.from_dict")
        if "encoder" not in d:
            raise ValueError("TECConfig.from_dict: the field 'encoder' (a dict of ViTConfig fields) is missing")
        if not isinstance(d["encoder"], ViTConfig):
            d["encoder"] = ViTConfig.from_dict(d["encoder"], "TECConfig.encoder")
        return cls(**d)
