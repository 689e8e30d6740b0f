"""Multi-process start-up: when and how a run joins ``jax.distributed``.

A run is one process per host (TPU VM worker, GPU node). It joins jax.distributed when the
command line gives the coordinator, process count or index, when the environment names a
multi-process launch (JAX_COORDINATOR_ADDRESS, several TPU_WORKER_HOSTNAMES, OpenMPI, an srun
step with several tasks), or on a Cloud TPU VM; a single CPU/GPU process stays as it is.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

# Slurm job-step variables that jax.distributed's own Slurm detection requires (see
# jax/_src/clusters/slurm_cluster.py): present in every task that srun starts.
_SLURM_STEP_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def _is_int_above_one(value: str) -> bool:
    return value.isdigit() and int(value) > 1


def _in_slurm_step() -> bool:
    """Whether this process is a task of a Slurm job step (``srun``), as JAX detects it."""
    return all(name in os.environ for name in _SLURM_STEP_ENV)


# Environment variables that mean "this process is one of several": the first is JAX's own
# coordinator variable, the others are cluster launchers that jax.distributed auto-detects.
_MULTI_PROCESS_ENV: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("JAX_COORDINATOR_ADDRESS", bool),
    ("TPU_WORKER_HOSTNAMES", lambda v: len([h for h in v.split(",") if h.strip()]) > 1),
    ("OMPI_COMM_WORLD_SIZE", _is_int_above_one),
    # `srun python -m pdm_jax.main` with several tasks (a task of an srun step, not the batch
    # script itself, which has no SLURM_STEP_NODELIST).
    ("SLURM_NTASKS", lambda v: _is_int_above_one(v) and _in_slurm_step()),
)


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts jax.distributed when this run spans several processes; a no-op otherwise.

    It starts when arguments are given, when the environment names a coordinator or a
    multi-process launcher (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    for a plain per-node launch, TPU_WORKER_HOSTNAMES with several hosts,
    OMPI_COMM_WORLD_SIZE > 1, an ``srun`` step with SLURM_NTASKS > 1), or on a Cloud TPU VM.
    A single CPU/GPU process stays as is. Under Slurm with one task per node every GPU of the
    node stays in its process (see :func:`_slurm_arguments`). Must run before anything
    touches a JAX backend (device lists, arrays, jit).

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
        kwargs: dict[str, Any] = dict(coordinator_address=coordinator_address,
                                      num_processes=num_processes, process_id=process_id)
        kwargs.update(_slurm_arguments(coordinator_address, num_processes, process_id))
        logging.info(
            "Initialising jax.distributed (explicit arguments: %s, environment: %s): %s.",
            explicit,
            detected or "none",
            kwargs,
        )
        jax.distributed.initialize(**kwargs)
    logging.info(
        "JAX process %d / %d; %d local devices, %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )


def _slurm_arguments(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> dict[str, Any]:
    """jax.distributed.initialize arguments that keep all of a node's GPUs in its one process.

    JAX (0.10) runs its Slurm detection whenever ``local_device_ids`` is None, even with the
    coordinator, process count and process id given, and then restricts each process to the
    GPU numbered SLURM_LOCALID: right for one task per GPU, but with one task per node
    (launch/gpu.sh, ``srun --ntasks-per-node=1``) each process would train on GPU 0 alone.
    For a Slurm step with as many tasks as nodes this returns the three arguments (given
    ones kept; the rest from JAX_COORDINATOR_ADDRESS / the Slurm variables, as JAX's detection
    derives them), ``cluster_detection_method="deactivate"``, and ``local_device_ids`` = every
    GPU the task sees (CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE; left unset, i.e. all
    devices, when neither says). Several tasks on a node, JAX_LOCAL_DEVICE_IDS set, or no
    Slurm step: {} (JAX's own behaviour).
    """
    if not _in_slurm_step() or os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return {}
    tasks = _int_from_env("SLURM_NTASKS", None)
    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES", "")
    if not nodes.isdigit() or tasks != int(nodes):
        logging.info("Slurm step with %s tasks on %s nodes: one GPU per task (JAX's default, "
                     "GPU = SLURM_LOCALID).", tasks, nodes or "?")
        return {}
    args: dict[str, Any] = dict(
        coordinator_address=(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
                             or _slurm_coordinator_address()),
        num_processes=tasks if num_processes is None else num_processes,
        process_id=(_int_from_env("SLURM_PROCID", None) if process_id is None
                    else process_id),
        cluster_detection_method="deactivate",
    )
    gpus = _visible_gpu_count()
    if gpus:
        args["local_device_ids"] = list(range(gpus))
    return args


def _visible_gpu_count() -> int | None:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE; None: unknown."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "NoDevFiles":  # Slurm's value when no GPU is allocated
        return len([d for d in visible.split(",") if d.strip()])
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "")
    return int(on_node) if on_node.isdigit() and int(on_node) > 0 else None


def _slurm_coordinator_address() -> str:
    """'first host of SLURM_STEP_NODELIST:port', as JAX's Slurm detection derives it.

    The port is JAX_COORDINATOR_PORT, else one of 4096 ports picked by SLURM_JOB_ID (so jobs
    that share a node do not collide): 61440 + SLURM_JOB_ID % 4096.
    """
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(
        61440 + _int_from_env("SLURM_JOB_ID", None) % 4096)
    nodes = os.environ["SLURM_STEP_NODELIST"]
    # 'node001', 'node001,host2', 'node[001-015],host2', 'node[001,007-015],host2'
    host = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodes)
    return f"{host.group(1)}{host.group(2) or ''}:{port}"


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
