"""Device meshes, parameter sharding rules, global batches and multi-process start-up.

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

import glob
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Environment variables that mean "this process is one of several": the first is JAX's own
# coordinator variable, the others are cluster launchers that jax.distributed auto-detects.
_MULTI_PROCESS_ENV: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("JAX_COORDINATOR_ADDRESS", bool),
    ("TPU_WORKER_HOSTNAMES", lambda v: len([h for h in v.split(",") if h.strip()]) > 1),
    ("OMPI_COMM_WORLD_SIZE", lambda v: v.isdigit() and int(v) > 1),
)


#### Multi-process start-up ####


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed when this run spans several processes; a no-op otherwise.

    It starts when arguments are given, when the environment names a coordinator or a
    multi-process launcher (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    for a plain per-node launch, TPU_WORKER_HOSTNAMES with several hosts,
    OMPI_COMM_WORLD_SIZE > 1), or on a Cloud TPU VM. A single CPU/GPU process stays as is.
    Must run before anything touches a JAX backend (device lists, arrays, jit).

    Args:
      coordinator_address: 'host:port' of process 0. When any argument is given,
        jax.distributed.initialize is called with them (None ones auto-detected).
      num_processes: total number of processes; None reads JAX_NUM_PROCESSES if set.
      process_id: index of this process; None reads JAX_PROCESS_ID if set.

    Returns:
      None. Logs process index/count and the local and global devices.

    Raises:
      ValueError: if JAX_NUM_PROCESSES / JAX_PROCESS_ID is not a non-negative integer.
    """
    # A plain per-node launch sets all three variables; JAX itself reads only the address.
    num_processes = _int_from_env("JAX_NUM_PROCESSES", num_processes)
    process_id = _int_from_env("JAX_PROCESS_ID", process_id)
    explicit = any(a is not None for a in (coordinator_address, num_processes, process_id))
    detected = [name for name, is_multi in _MULTI_PROCESS_ENV if is_multi(os.environ.get(name, ""))]
    if _running_on_cloud_tpu_vm():
        # TPU VM pods publish their workers through the metadata server, not the environment;
        # jax.distributed.initialize() finds them (one process on a single-host TPU VM).
        detected.append("cloud TPU VM")
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised; not initialising again.")
    elif explicit or detected:
        logging.info(
            "Initialising jax.distributed (explicit arguments: %s, environment: %s).",
            explicit,
            detected or "none",
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    logging.info(
        "JAX process %d / %d; %d local devices, %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )


def _int_from_env(name: str, value: int | None) -> int | None:
    """`value` if given, else the integer in environment variable `name`, else None."""
    raw = os.environ.get(name, "")
    if value is not None or not raw:
        return value
    if not raw.isdigit():
        raise ValueError(f"Environment variable {name}={raw!r} must be a non-negative integer.")
    return int(raw)


def _running_on_cloud_tpu_vm() -> bool:
    """Whether this process runs on a Cloud TPU VM (whose pods need jax.distributed).

    ``PDM_JAX_CLOUD_TPU=1`` or ``0`` decides (launch/tpu.sh sets 1). Otherwise JAX's own TPU
    probe decides wherever TPU device files exist; if that private probe is missing (a JAX
    upgrade), this fails loudly instead of silently running a pod as independent hosts.
    """
    explicit = os.environ.get("PDM_JAX_CLOUD_TPU", "")
    if explicit:
        if explicit not in ("0", "1"):
            raise ValueError(f"PDM_JAX_CLOUD_TPU={explicit!r} must be 1 or 0.")
        return explicit == "1"
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms:
        return False
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return False
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "TPU device files exist, but this JAX has no TPU probe (jax._src.hardware_utils) to "
            "tell whether this is a Cloud TPU VM; set PDM_JAX_CLOUD_TPU=1 (Cloud TPU VM: start "
            "jax.distributed, as launch/tpu.sh does) or PDM_JAX_CLOUD_TPU=0.") from e


#### Mesh ####


def resolve_mesh_shape(shape: Sequence[int], num_devices: int | None = None) -> tuple[int, ...]:
    """The concrete (data, fsdp) sizes of a mesh shape over ``num_devices`` (default: all).

    Args:
      shape: size of each axis; at most one entry may be -1, meaning "the remaining devices".
      num_devices: devices to cover; default ``jax.device_count()``.

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
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1)) -> Mesh:
    """A ('data', 'fsdp') device mesh over all global devices.

    Args:
      shape: sizes of the two axes (see :func:`resolve_mesh_shape`; -1 = the remaining devices).

    Returns:
      A jax.sharding.Mesh with Auto axis types (jit sharding propagation as usual).
    """
    sizes = resolve_mesh_shape(shape)
    return jax.make_mesh(sizes, (DATA_AXIS, FSDP_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


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
