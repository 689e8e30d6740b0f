"""The PDM U-Net (SPEC section 3): an ADM-style U-Net wrapped in patchify/unpatchify.

Sub-module names mirror the official checkpoints (``input_blocks[i]``, ``middle_block``,
``output_blocks[i]``) so that the PyTorch importer is a table of renames, not a search.
All resolutions below are PATCHED resolutions (image_size / patch_size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdm_jax.models import layers
from pdm_jax.models.patching import check_patch_size, patchify, unpatchify

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of one PDM U-Net. Every field is a config value users may sweep.

    The defaults are those of ``config_lib.base_config()``'s model section, which is built
    from them.

    Attributes:
      image_size: square input resolution in pixels.
      patch_size: P of the space-to-depth step; 1 is a plain ADM U-Net.
      in_channels: image channels C.
      model_channels: c, the base width.
      channel_mult: width multiplier per level (C_l = int(c * mult[l])); floats allowed (1.5).
      num_res_blocks: res blocks per level, an int or one int per level.
      attention_resolutions: PATCHED resolutions that get self-attention.
      num_head_channels: channels per attention head.
      num_classes: class count for conditioning; 0 for unconditional. Label ``num_classes`` is
        the null label of classifier-free guidance.
      learn_sigma: adds the variance head (hybrid loss).
      dropout: dropout rate inside ResBlocks (0 in every released recipe).
      num_groups: GroupNorm groups.
      norm_eps: epsilon of the affine GroupNorms (1e-5 in the PyTorch port, 1e-3 in the TF port).
      out_norm_eps: epsilon of the non-affine ResBlock out-norm (1e-3 in both ports).
      dtype: compute dtype, 'float32' or 'bfloat16' (params, norms, softmax, outputs stay fp32).
      remat: rematerialise each block in the backward pass (saves activation memory).
      variance_grad_to_time_mlp: the reference lets the VLB gradient reach the time MLP
        through the variance head's time projection; False stops it there.
    """

    image_size: int = 64
    patch_size: int = 4
    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_head_channels: int = 64
    num_classes: int = 0
    learn_sigma: bool = True
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-5
    out_norm_eps: float = 1e-3
    dtype: str = "float32"
    remat: bool = False
    variance_grad_to_time_mlp: bool = True

    @classmethod
    def from_dict(cls, values: Any) -> "UNetConfig":
        """Builds a config from a dict or ConfigDict, rejecting unknown keys by name."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown U-Net config keys {unknown}; known keys: {sorted(known)}.")
        for key in ("channel_mult", "attention_resolutions"):
            if key in values:
                values[key] = tuple(values[key])
        if isinstance(values.get("num_res_blocks"), (list, tuple)):
            values["num_res_blocks"] = tuple(values["num_res_blocks"])
        return cls(**values)

    @property
    def patched_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def widths(self) -> list[int]:
        return [int(self.model_channels * m) for m in self.channel_mult]

    @property
    def res_blocks_per_level(self) -> list[int]:
        if isinstance(self.num_res_blocks, int):
            return [self.num_res_blocks] * len(self.channel_mult)
        return list(self.num_res_blocks)

    @property
    def level_resolutions(self) -> list[int]:
        return [self.patched_size // 2**level for level in range(len(self.channel_mult))]

    @property
    def time_embed_dim(self) -> int:
        return self.widths[-1]

    def validate(self) -> None:
        """Raises ValueError naming the first bad value; called before any parameter exists."""
        check_patch_size(self.image_size, self.patch_size)
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}.")
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError("channel_mult must have at least one level.")
        if self.patched_size % 2 ** (levels - 1):
            raise ValueError(
                f"Patched resolution {self.patched_size} (image_size={self.image_size} / "
                f"patch_size={self.patch_size}) cannot be halved {levels - 1} times for "
                f"channel_mult={self.channel_mult}.")
        if len(self.res_blocks_per_level) != levels:
            raise ValueError(
                f"num_res_blocks={self.num_res_blocks} has {len(self.res_blocks_per_level)} "
                f"entries; channel_mult has {levels} levels.")
        if self.model_channels % 2:
            raise ValueError(f"model_channels={self.model_channels} must be even.")
        for mult, width in zip(self.channel_mult, self.widths):
            if width % self.num_groups:
                raise ValueError(
                    f"Width {width} (model_channels={self.model_channels} x mult {mult}) is not "
                    f"divisible by num_groups={self.num_groups}.")
        unused = sorted(set(self.attention_resolutions) - set(self.level_resolutions))
        if unused:
            raise ValueError(
                f"attention_resolutions {unused} never occur: the patched resolutions of this "
                f"U-Net are {self.level_resolutions}.")
        for res, width in zip(self.level_resolutions, self.widths):
            if res in self.attention_resolutions and width % self.num_head_channels:
                raise ValueError(
                    f"Width {width} at resolution {res} is not divisible by "
                    f"num_head_channels={self.num_head_channels}.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


class Stage(nnx.Module):
    """One entry of input_blocks/output_blocks: ResBlock [+ Attention] [+ Up/Downsample]."""

    def __init__(self, res=None, attn=None, down=None, up=None):
        self.res, self.attn, self.down, self.up = res, attn, down, up

    def __call__(self, h, emb, class_emb, dropout_rng):
        if self.down is not None:
            return self.down(h)
        h = self.res(h, emb, class_emb, dropout_rng)
        if self.attn is not None:
            h = self.attn(h)
        if self.up is not None:
            h = self.up(h)
        return h


def _call_stage(stage, h, emb, class_emb, dropout_rng):
    return stage(h, emb, class_emb, dropout_rng)


_call_stage_remat = nnx.remat(_call_stage)


class UNet(nnx.Module):
    """The PDM U-Net. ``model(x, t, y) -> (x0_or_eps_or_v, v_or_None)``, both unpatched, fp32."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        cfg = config
        dtype = _DTYPES[cfg.dtype]
        widths, c0 = cfg.widths, cfg.widths[0]
        patched_in = cfg.in_channels * cfg.patch_size**2
        ted = cfg.time_embed_dim
        norm = dict(num_groups=cfg.num_groups, norm_eps=cfg.norm_eps)
        block = dict(emb_dim=ted, class_dim=c0 if cfg.num_classes else None,
                     out_norm_eps=cfg.out_norm_eps, dropout=cfg.dropout, dtype=dtype, rngs=rngs,
                     **norm)

        def attention(ch):
            return layers.Attention(ch, head_channels=cfg.num_head_channels, dtype=dtype,
                                    rngs=rngs, **norm)

        self.time_mlp_in = layers.dense(cfg.model_channels, 4 * cfg.model_channels, rngs=rngs,
                                        dtype=jnp.float32)
        self.time_mlp_out = layers.dense(4 * cfg.model_channels, ted, rngs=rngs,
                                         dtype=jnp.float32)
        self.label_emb = (nnx.Embed(cfg.num_classes + 1, c0, rngs=rngs)
                          if cfg.num_classes else None)
        # The first conv and both output convs run in float32 whatever the compute dtype, as in
        # both official ports (SPEC 7): the x0 head's output is weighted up to ~100x at low t.
        self.input_conv = layers.conv3x3(patched_in, c0, rngs=rngs, dtype=jnp.float32)

        input_blocks, skip_widths, ch = [], [c0], c0
        for level, (width, res) in enumerate(zip(widths, cfg.level_resolutions)):
            for _ in range(cfg.res_blocks_per_level[level]):
                input_blocks.append(Stage(
                    res=layers.ResBlock(ch, width, **block),
                    attn=attention(width) if res in cfg.attention_resolutions else None))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                input_blocks.append(Stage(down=layers.Downsample(
                    ch, widths[level + 1], dtype=dtype, rngs=rngs)))
                ch = widths[level + 1]
                skip_widths.append(ch)
        self.input_blocks = nnx.List(input_blocks)

        self.middle_block = nnx.List([
            Stage(res=layers.ResBlock(ch, ch, **block), attn=attention(ch)),
            Stage(res=layers.ResBlock(ch, ch, **block))])

        output_blocks = []
        for level in reversed(range(len(widths))):
            width, res = widths[level], cfg.level_resolutions[level]
            for i in range(cfg.res_blocks_per_level[level] + 1):
                last = level > 0 and i == cfg.res_blocks_per_level[level]
                output_blocks.append(Stage(
                    res=layers.ResBlock(ch + skip_widths.pop(), width, **block),
                    attn=attention(width) if res in cfg.attention_resolutions else None,
                    up=layers.Upsample(width, widths[level - 1], dtype=dtype, rngs=rngs)
                    if last else None))
                ch = widths[level - 1] if last else width
        assert not skip_widths, "every encoder skip must be consumed by the decoder"
        self.output_blocks = nnx.List(output_blocks)

        self.out_norm = layers.GroupNorm(ch, num_groups=cfg.num_groups, eps=cfg.norm_eps)
        self.out_conv = layers.conv3x3(ch, patched_in, rngs=rngs, dtype=jnp.float32,
                                       zero_init=True)
        if cfg.learn_sigma:
            self.var_time_proj = layers.dense(ted, 2 * c0, rngs=rngs, dtype=dtype)
            self.var_conv_1 = layers.conv3x3(2 * c0, c0, rngs=rngs, dtype=dtype)
            self.var_conv_2 = layers.conv3x3(c0, patched_in, rngs=rngs, dtype=jnp.float32)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Runs the network.

        Args:
          x: (B, H, W, C) noisy images in pixel space.
          t: (B,) integer timesteps of the ORIGINAL chain.
          y: (B,) int labels in [0, num_classes] (num_classes = null label); required iff the
            model is class-conditional.
          dropout_rng: PRNG key enabling dropout (training only).

        Returns:
          (mean_out, v): the mean-head output (B, H, W, C) in the model's parameterisation, and
          the variance value v in [0, 1] of the same shape (None without learn_sigma); fp32.
        """
        cfg = self.config
        dtype = _DTYPES[cfg.dtype]
        size, p = cfg.image_size, cfg.patch_size
        if x.shape[1:] != (size, size, cfg.in_channels):
            raise ValueError(f"Expected input of shape (B, {size}, {size}, {cfg.in_channels}), "
                             f"got {x.shape}.")
        if (y is None) != (not cfg.num_classes):
            raise ValueError(f"Labels must be given iff num_classes > 0 (num_classes="
                             f"{cfg.num_classes}, y is {'None' if y is None else 'given'}).")

        emb = layers.sinusoidal_embedding(t, cfg.model_channels)
        emb = jax.nn.silu(self.time_mlp_in(emb))
        emb = jax.nn.silu(self.time_mlp_out(emb))
        class_emb = self.label_emb(y).astype(jnp.float32) if self.label_emb is not None else None

        h = self.input_conv(patchify(x, p).astype(jnp.float32)).astype(dtype)
        h = h + layers.position_embedding_2d(cfg.patched_size, h.shape[-1]).astype(h.dtype)
        first_features = h
        run = _call_stage_remat if cfg.remat else _call_stage
        rngs = (iter(jax.random.split(dropout_rng, 2 * len(self.input_blocks) + 10))
                if dropout_rng is not None else None)

        def next_rng():
            return next(rngs) if rngs is not None else None

        skips = [h]
        for stage in self.input_blocks:
            h = run(stage, h, emb, class_emb, next_rng())
            skips.append(h)
        for stage in self.middle_block:
            h = run(stage, h, emb, class_emb, next_rng())
        for stage in self.output_blocks:
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = run(stage, h, emb, class_emb, next_rng())
        assert not skips, "every encoder skip must be consumed by the decoder"

        out = self.out_conv(jax.nn.silu(self.out_norm(h)))
        mean_out = unpatchify(out.astype(jnp.float32), p)
        if not cfg.learn_sigma:
            return mean_out, None

        # The variance head reads the network's features but must not train them (SPEC 3.7).
        var_in = jax.lax.stop_gradient(jnp.concatenate([first_features, h], axis=-1))
        time_in = emb if cfg.variance_grad_to_time_mlp else jax.lax.stop_gradient(emb)
        var_in = var_in + self.var_time_proj(jax.nn.silu(time_in))[:, None, None, :].astype(
            var_in.dtype)
        v = self.var_conv_2(jax.nn.silu(self.var_conv_1(var_in)))
        v = jax.nn.sigmoid(v.astype(jnp.float32))
        return mean_out, unpatchify(v, p)


def abstract_model(config: UNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (ShapeDtypeStruct) parameters, without allocating weights.

    Args:
      config: the architecture.

    Returns:
      (graphdef, abstract_state).
    """
    config.validate()
    model = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def count_params(config: UNetConfig) -> int:
    """Number of parameters, computed by abstract evaluation (no weights are allocated)."""
    _, state = abstract_model(config)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(state)))
