"""Standalone inference API: ``Pipeline.load(export_dir).sample(num)`` -> uint8 NHWC images.

Touches no training-only dependency (no orbax, no TensorFlow): an export is safetensors +
JSON (export_format.py) and sampling is the same jitted, sharded sampler as ``--mode=sample``
(sampling.py), so with the same seed, settings and batch size both give identical images.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from pdm_jax import export_format, sharding
from pdm_jax.diffusion import samplers, schedules
from pdm_jax.diffusion.experts import Expert, experts_from_config
from pdm_jax.models.unet import UNet
from pdm_jax.sampling import check_labels, make_sample_fn, sample_images
from pdm_jax.training.state import model_graphdef


class Pipeline:
    """A loaded export: its config, experts and parameters placed on a device mesh.

    Attributes:
      config: the run config the export was made from (ml_collections.ConfigDict).
      experts: the ensemble (experts.Expert), in config order.
      meta: the export's model.json (step, config hash, dtype, source, ...).
      mesh: the device mesh the parameters are replicated over and batches are split over.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Sequence[dict],
                 meta: dict[str, Any], mesh_shape: Sequence[int] = (-1, 1)):
        self.config = config
        self.experts: list[Expert] = experts_from_config(config)
        self.meta = meta
        self.mesh = sharding.make_mesh(tuple(mesh_shape))
        # The training rules: replicated over 'data', large arrays split over 'fsdp' if any.
        self._params = [jax.device_put(p, sharding.param_shardings(p, self.mesh))
                        for p in params]
        self._sample_fns: dict[tuple, Any] = {}
        self._forward_fns: dict[int, Any] = {}

    @classmethod
    def load(cls, export_dir: str, *, raw: bool = False,
             mesh_shape: Sequence[int] = (-1, 1)) -> Pipeline:
        """Loads and validates an export (see export_format.read_export).

        Args:
          export_dir: directory written by ``--mode=export`` or ``pdm_jax.cli.import_torch``.
          raw: use the raw (non-EMA) parameters, if the export has them.
          mesh_shape: (data, fsdp) mesh over all devices; -1 = the remaining devices.

        Returns:
          The pipeline, parameters already on the devices (float32).

        Raises:
          FileNotFoundError / ValueError: not an export, tensors not matching its config, or a
            corrupted/truncated file, naming the file and the first bad key.
        """
        meta, config, params = export_format.read_export(export_dir, "raw" if raw else "ema")
        return cls(config, params, meta, mesh_shape)

    @property
    def num_classes(self) -> int:
        return self.experts[0].model.num_classes

    @property
    def image_size(self) -> int:
        return self.experts[0].model.image_size

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model(self, index: int = 0) -> UNet:
        """Expert ``index``'s U-Net with its loaded parameters (``model(x, t, y) -> (mean, v)``)."""
        if not 0 <= index < len(self.experts):
            raise ValueError(f"Expert {index} does not exist ({len(self.experts)} experts).")
        graphdef = model_graphdef(self.experts[index].model)
        return nnx.merge(graphdef, self._params[index])

    def forward(self, x: Any, t: Any, labels: Any = None, expert: int = 0) -> tuple[Any, Any]:
        """One jitted U-Net evaluation of expert ``expert``: ``(x_t, t, y) -> (mean, v)``.

        Args:
          x: (B, H, W, C) noisy images.
          t: (B,) int original-chain timesteps.
          labels: (B,) int classes (``num_classes`` = null label); None if unconditional.
          expert: which expert's U-Net.

        Returns:
          The model output (mean head, variance value or None), as jax arrays.
        """
        if not 0 <= expert < len(self.experts):
            raise ValueError(f"Expert {expert} does not exist ({len(self.experts)} experts).")
        if expert not in self._forward_fns:
            graphdef = model_graphdef(self.experts[expert].model)
            fn = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))
            self._forward_fns[expert] = functools.partial(fn, self._params[expert])
        return self._forward_fns[expert](x, t, labels)

    def sample(self, num: int, labels: Any = None, steps: str = "250", sampler: str = "ddpm",
               eta: float = 0.0, guidance_scale: float = 1.5, seed: int = 0,
               batch_size: int | None = None, return_labels: bool = False) -> Any:
        """Draws ``num`` images; batch ``start`` uses ``fold_in(PRNGKey(seed), start)``.

        Args:
          num: number of images.
          labels: None (balanced: image i gets class i mod num_classes), one int for all, or
            ``num`` ints; must be None for an unconditional model.
          steps: respacing of the chain, e.g. "250", "50", "ddim25".
          sampler: 'ddpm' or 'ddim'.
          eta: DDIM eta (0 = deterministic).
          guidance_scale: classifier-free guidance w (1 = unguided; ignored if unconditional).
          seed: base seed.
          batch_size: images per jitted call, a multiple of the device count. Default: the
            export's sample.batch_size capped at ``num``, rounded up to the device count.
          return_labels: also return the labels used.

        Returns:
          uint8 (num, H, W, C) numpy images; with return_labels, (images, int32 labels).

        Raises:
          ValueError: any bad argument, before anything is compiled.
        """
        if int(num) != num or num <= 0:
            raise ValueError(f"num must be a positive int, got {num!r}.")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; expected one of {samplers.SAMPLERS}.")
        schedules.respace_timesteps(str(steps), self.config.diffusion.num_timesteps)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        devices = self.mesh.size
        if batch_size is None:
            wanted = min(int(self.config.sample.batch_size), int(num))
            batch_size = devices * math.ceil(wanted / devices)
        if batch_size <= 0 or batch_size % devices:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{devices} devices.")
        if labels is not None:
            labels = check_labels(labels, int(num), self.num_classes)
        key = (str(steps), sampler, float(eta), float(guidance_scale), int(batch_size))
        if key not in self._sample_fns:
            self._sample_fns[key] = make_sample_fn(
                self.config, self.mesh, steps=str(steps), sampler=sampler, eta=float(eta),
                guidance_scale=float(guidance_scale), batch_size=int(batch_size))
        images, used = sample_images(self._sample_fns[key], self._params, num=int(num),
                                     batch_size=int(batch_size), seed=int(seed),
                                     num_classes=self.num_classes, labels=labels)
        return (images, used) if return_labels else images
