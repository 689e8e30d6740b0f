"""Device meshes, parameter sharding rules and global batches (start-up: distributed.py).

Conventions (maxtext / big_vision style, see STYLE.md):
  * The mesh has axes named by role: 'data' (pure data parallelism, parameters replicated)
    and 'fsdp' (data parallelism whose parameters and optimiser state are sharded).
    A size of -1 means "all the remaining devices".
  * The batch dimension is split over ('data', 'fsdp') together, so every device sees a
    distinct slice of the global batch whatever the data/fsdp split is.
  * Parameters get a sharding from small named rules ('replicate', 'fsdp') chosen by regex
    over '/'-joined parameter paths, e.g. 'params/down_0/block_1/conv1/kernel'.

Everything here is jit + Mesh + NamedSharding; there is no pmap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

#### Mesh ####


def resolve_mesh_shape(shape: Sequence[int], num_devices: int | None = None) -> tuple[int, ...]:
    """The concrete (data, fsdp) sizes of a mesh shape over ``num_devices`` (default: all).

    Args:
      shape: size of each axis; at most one entry may be -1, meaning "the remaining devices".
      num_devices: devices to cover; default ``jax.device_count()``, and then the devices'
        slices are checked too (several slices: ``data`` must be a multiple of their number,
        see :func:`mesh_device_array`).

    Returns:
      The sizes, whose product is ``num_devices``.

    Raises:
      ValueError: bad entries, or sizes that do not use exactly the available devices.
    """
    shape = tuple(int(s) for s in shape)
    n_devices = jax.device_count() if num_devices is None else num_devices
    if len(shape) != 2:
        raise ValueError(f"mesh.shape={shape} must have 2 entries, the sizes of the "
                         f"({DATA_AXIS!r}, {FSDP_AXIS!r}) axes.")
    if any(s != -1 and s < 1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape} must hold positive sizes and at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh.shape={shape}: the {n_devices} devices are not divisible by "
                             f"the fixed axes' product {known}.")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices but "
                         f"{n_devices} are available.")
    if num_devices is None:
        _check_slices(shape, _num_slices(jax.devices()))
    return shape


# Device kinds whose meshes jax.make_mesh builds with allow_split_physical_axes=True (0.10).
_SPLIT_PHYSICAL_AXES_KINDS = ("TPU v5 lite", "TPU v5e")


def _num_slices(devices: Sequence[Any]) -> int:
    """Distinct ``slice_index`` values of the devices (1 where devices have none: CPU, GPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _check_slices(sizes: Sequence[int], num_slices: int) -> None:
    data, fsdp = sizes
    if num_slices > 1 and data % num_slices:
        raise ValueError(
            f"mesh.shape={tuple(sizes)}: the devices span {num_slices} slices (multislice), "
            f"joined by the slow data-centre network: '{DATA_AXIS}' (={data}) must be a multiple "
            f"of {num_slices} so that data parallelism spans the slices and each '{FSDP_AXIS}' "
            f"group (={fsdp}) stays inside one slice.")


def mesh_device_array(sizes: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """The (data, fsdp) array of devices for a multislice job (devices of several slices).

    Data parallelism spans the slices (DCN), and each slice holds ``data // num_slices`` rows
    of whole ``fsdp`` groups laid out by ``mesh_utils.create_hybrid_device_mesh`` for its ICI
    topology: an FSDP group never crosses a slice (maxtext's hybrid mesh, with a DCN mesh of
    (num_slices, 1)). Row ``i`` of the result lies in slice ``i // (data // num_slices)``
    (slices in ``slice_index`` order).

    Args:
      sizes: the concrete (data, fsdp) sizes (:func:`resolve_mesh_shape`).
      devices: every global device; each has ``slice_index`` (TPU devices of a multislice job).

    Returns:
      A numpy object array of shape ``sizes``.

    Raises:
      ValueError: ``data`` not a multiple of the slice count, or unequal slices.
    """
    from jax.experimental import mesh_utils

    num_slices = _num_slices(devices)
    _check_slices(sizes, num_slices)
    data, fsdp = sizes
    return mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp), (num_slices, 1), devices=devices,
        # As jax.make_mesh does within one slice: v5e meshes may split physical axes.
        allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES_KINDS)


def make_mesh(shape: Sequence[int] = (-1, 1)) -> Mesh:
    """A ('data', 'fsdp') device mesh over all global devices.

    One slice (every CPU/GPU run, a single TPU slice): ``jax.make_mesh``, which orders the
    devices for the ICI topology. Several TPU slices (multislice, devices with distinct
    ``slice_index``): a hybrid mesh, data parallel across slices and the configured
    (data, fsdp) within each (:func:`mesh_device_array`).

    Args:
      shape: sizes of the two axes (see :func:`resolve_mesh_shape`; -1 = the remaining devices).

    Returns:
      A jax.sharding.Mesh with Auto axis types (jit sharding propagation as usual).
    """
    sizes = resolve_mesh_shape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(sizes)
    devices = jax.devices()
    if _num_slices(devices) > 1:
        return Mesh(mesh_device_array(sizes, devices), (DATA_AXIS, FSDP_AXIS),
                    axis_types=axis_types)
    return jax.make_mesh(sizes, (DATA_AXIS, FSDP_AXIS), axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the sharding that keeps a full copy of an array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, name: str) -> int:
    return mesh.shape[name] if name in mesh.axis_names else 1


#### Parameter sharding rules ####


def path_str(path: Sequence[Any]) -> str:
    """A JAX key path as 'a/b/0/c' (dict keys, attribute names, sequence indices)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def replicate(shape: tuple[int, ...], mesh: Mesh, min_fsdp_size: int) -> P:
    """Rule 'replicate': a full copy on every device."""
    del shape, mesh, min_fsdp_size
    return P()


def fsdp(shape: tuple[int, ...], mesh: Mesh, min_fsdp_size: int) -> P:
    """Rule 'fsdp': shard the largest dimension divisible by the 'fsdp' axis size over 'fsdp'.

    Arrays with fewer than `min_fsdp_size` elements (biases, norms, scalars) are replicated:
    sharding them saves no memory worth the extra collectives. Arrays without a divisible
    dimension are replicated too.
    """
    n = _axis_size(mesh, FSDP_AXIS)
    if n == 1 or math.prod(shape) < min_fsdp_size:
        return P()
    # Largest dimension first; on ties prefer the later one (output channels of a kernel),
    # as big_vision does.
    for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
        if shape[dim] % n == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    logging.info("fsdp: no dimension of shape %s divisible by %d; replicating.", shape, n)
    return P()


SHARDING_RULES: dict[str, Callable[[tuple[int, ...], Mesh, int], P]] = {
    "replicate": replicate,
    "fsdp": fsdp,
}


def param_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str]] = ((".*", "fsdp"),),
    min_fsdp_size: int = 2**14,
) -> Any:
    """Chooses a NamedSharding for every leaf of a tree of arrays by regex over its path.

    Args:
      abstract_tree: any pytree (nested dicts, optax states) of jax.Array, numpy arrays or
        jax.ShapeDtypeStruct.
      mesh: the device mesh.
      rules: (regex, rule name) pairs; the first regex that re.search-es the leaf's
        '/'-joined path picks the rule ('replicate' or 'fsdp').
      min_fsdp_size: arrays with fewer elements are replicated by the 'fsdp' rule.

    Returns:
      A tree of NamedSharding with the structure of `abstract_tree`.

    Raises:
      ValueError: on an unknown rule name or a leaf that no rule matches.
    """
    for pattern, rule in rules:
        if rule not in SHARDING_RULES:
            raise ValueError(f"Unknown sharding rule {rule!r} for pattern {pattern!r}; "
                             f"known rules: {sorted(SHARDING_RULES)}.")
    compiled = [(re.compile(pattern), SHARDING_RULES[rule]) for pattern, rule in rules]

    def one(path, leaf) -> NamedSharding:
        name = path_str(path)
        for regex, rule_fn in compiled:
            if regex.search(name):
                return NamedSharding(mesh, rule_fn(tuple(np.shape(leaf)), mesh, min_fsdp_size))
        raise ValueError(f"No sharding rule matches parameter {name!r}; rules: {list(rules)}.")

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


#### Batches ####


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (B, ...) arrays: B split over ('data', 'fsdp') together, the rest whole."""
    axes = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh,
                 full: bool = False) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global, batch-sharded jax.Arrays.

    Args:
      local_batch: (nested) dict of numpy arrays, each (B_local, ...) with the same B_local;
        every process passes its own distinct examples.
      mesh: the device mesh.
      full: every process passes the WHOLE global batch (the same arrays everywhere) and
        keeps the rows its devices hold, wherever the mesh puts them; the global array then
        equals the given one for any process count (see data.global_order).

    Returns:
      The same structure of jax.Arrays with global batch B_local * process_count (B_local
      when `full`), sharded with batch_sharding(mesh).

    Raises:
      ValueError: if an array has no batch dimension or the global batch does not split
        evenly over the batch-sharding devices.
    """
    sharding = batch_sharding(mesh)
    n_shards = math.prod(_axis_size(mesh, a) for a in (DATA_AXIS, FSDP_AXIS))

    def one(path, x) -> jax.Array:
        x = np.asarray(x)
        name = path_str(path)
        if x.ndim == 0:
            raise ValueError(f"Batch entry {name!r} is a scalar; expected (B, ...).")
        global_b = x.shape[0] * (1 if full else jax.process_count())
        if global_b % n_shards:
            raise ValueError(f"Batch entry {name!r} with local shape {x.shape} gives a global "
                             f"batch of {global_b}, not divisible by {n_shards} = the ('data' x "
                             f"'fsdp') devices of mesh {dict(mesh.shape)}.")
        if full:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, dict(local_batch))
