"""Meshes (one slice and a simulated 2-slice job), parameter sharding rules, global batches and
multi-process start-up (Slurm included) on 8 virtual CPU devices."""

import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pdm_jax import distributed, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "shape, expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)), ((-1, 8), (1, 8)), ((4, 2), (4, 2))],
)
def test_make_mesh_fills_minus_one_with_the_remaining_devices(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == (sharding.DATA_AXIS, sharding.FSDP_AXIS) == ("data", "fsdp")
    assert mesh.devices.size == jax.device_count() == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_defaults_to_pure_data_parallelism():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}


@pytest.mark.parametrize(
    "shape, num_devices, expected",
    [((-1, 1), None, (8, 1)), ((2, -1), 16, (2, 8)), ((-1, 4), 4, (1, 4)), ((3, 1), 3, (3, 1)),
     (("2", "-1"), 6, (2, 3))],
)
def test_resolve_mesh_shape_fills_minus_one_for_any_device_count(shape, num_devices, expected):
    assert sharding.resolve_mesh_shape(shape, num_devices) == expected


MESH_SHAPE_ERRORS = [
    ((3, 1), None, r"^mesh.shape=\(3, 1\) needs 3 devices but 8 are available\.$"),
    ((2, 2), 8, r"^mesh.shape=\(2, 2\) needs 4 devices but 8 are available\.$"),
    ((3, -1), None, r"^mesh.shape=\(3, -1\): the 8 devices are not divisible by the fixed "
                    r"axes' product 3\.$"),
    ((-1, 4), 6, r"^mesh.shape=\(-1, 4\): the 6 devices are not divisible .* product 4\.$"),
    ((-1, -1), None, r"^mesh.shape=\(-1, -1\) must hold positive sizes and at most one -1\.$"),
    ((0, 8), None, r"^mesh.shape=\(0, 8\) must hold positive sizes"),
    ((-2, 4), None, r"^mesh.shape=\(-2, 4\) must hold positive sizes"),
    ((8,), None, r"^mesh.shape=\(8,\) must have 2 entries, the sizes of the \('data', 'fsdp'\) "
                 r"axes\.$"),
    ((2, 2, 2), None, r"^mesh.shape=\(2, 2, 2\) must have 2 entries"),
]


@pytest.mark.parametrize("shape, num_devices, message", MESH_SHAPE_ERRORS)
def test_resolve_mesh_shape_errors_name_the_shape_and_device_count(shape, num_devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape, num_devices)


@pytest.mark.parametrize("shape, num_devices, message",
                         [e for e in MESH_SHAPE_ERRORS if e[1] is None])
def test_make_mesh_rejects_shapes_that_do_not_fit(shape, num_devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_path_str_joins_dict_keys_attributes_and_indices_with_slashes():
    params = {"a": {"b": [jnp.zeros(1), jnp.zeros(2)]}, "c": jnp.zeros(3)}
    opt_state = optax.adam(1e-3).init({"w": jnp.zeros((2, 2))})
    tree = {"params": params, "opt_state": opt_state, "step": jnp.zeros(())}
    paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["opt_state/0/count", "opt_state/0/mu/w", "opt_state/0/nu/w",
                     "params/a/b/0", "params/a/b/1", "params/c", "step"]
    assert sharding.path_str(()) == ""
    assert sharding.path_str((jax.tree_util.DictKey(3), jax.tree_util.SequenceKey(0))) == "3/0"


def test_fsdp_rule_shards_largest_divisible_dim_and_replicates_small_arrays():
    mesh = sharding.make_mesh((2, 4))
    tree = {
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),  # 73,728 elements
                 "bias": jax.ShapeDtypeStruct((128,), jnp.float32)},           # small
        "odd": jax.ShapeDtypeStruct((129, 130), jnp.float32),  # no dim divisible by 4
        "dense": jax.ShapeDtypeStruct((4096, 6), jnp.float32),  # largest dim 4096 divisible
        "tall": jax.ShapeDtypeStruct((258, 256), jnp.float32),  # 258 % 4 != 0 -> 256
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(tree, mesh))
    assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["conv"]["bias"] == P()
    assert specs["odd"] == P()  # neither 129 nor 130 divisible by 4
    assert specs["dense"] == P("fsdp", None)
    assert specs["tall"] == P(None, "fsdp")


def test_rules_pick_by_regex_first_match_and_work_on_optax_states():
    mesh = sharding.make_mesh((1, 8))
    params = {"emb": jnp.zeros((1024, 32)), "out": {"kernel": jnp.zeros((256, 512))}}
    opt_state = optax.adam(1e-3).init(params)
    tree = {"params": params, "opt_state": opt_state}
    rules = ((r"emb$", "replicate"), (".*", "fsdp"))
    shardings = sharding.param_shardings(tree, mesh, rules=rules)
    assert shardings["params"]["emb"].spec == P()
    assert shardings["params"]["out"]["kernel"].spec == P(None, "fsdp")
    # opt_state paths look like 'opt_state/0/mu/emb': the same rules apply to moments.
    assert shardings["opt_state"][0].mu["emb"].spec == P()
    assert shardings["opt_state"][0].nu["out"]["kernel"].spec == P(None, "fsdp")
    assert shardings["opt_state"][0].count.spec == P()
    placed = jax.device_put(tree, shardings)
    kernel = placed["params"]["out"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (256, 64)


def test_fsdp_axis_of_size_one_replicates_everything():
    mesh = sharding.make_mesh((-1, 1))
    tree = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    assert sharding.param_shardings(tree, mesh)["w"].spec == P()


def test_param_shardings_reject_unknown_rule_and_unmatched_path():
    mesh = sharding.make_mesh((-1, 1))
    tree = {"w": jnp.zeros((4,))}
    with pytest.raises(ValueError, match="Unknown sharding rule 'tp'"):
        sharding.param_shardings(tree, mesh, rules=((".*", "tp"),))
    with pytest.raises(ValueError, match="No sharding rule matches parameter 'w'"):
        sharding.param_shardings(tree, mesh, rules=(("bias", "replicate"),))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_global_batch_is_sharded_over_data_and_fsdp(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    images = np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3)
    labels = np.arange(16, dtype=np.int32)
    batch = sharding.global_batch({"image": images, "label": labels}, mesh)
    assert batch["image"].shape == (16, 2, 2, 3)
    assert batch["image"].sharding == sharding.batch_sharding(mesh)
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    # Every device holds a distinct 2-example slice, in order.
    shards = sorted(batch["label"].addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(2,)] * 8
    np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), labels)
    np.testing.assert_array_equal(np.asarray(batch["image"]), images)


def test_global_batch_rejects_batches_that_do_not_split():
    mesh = sharding.make_mesh((8, 1))
    with pytest.raises(ValueError, match=r"'label' with local shape \(6,\).*not divisible by 8"):
        sharding.global_batch({"label": np.zeros((6,), np.int32)}, mesh)


def test_replicated_sharding_keeps_full_copies():
    mesh = sharding.make_mesh((2, 4))
    x = jax.device_put(jnp.arange(8.0), sharding.replicated(mesh))
    assert all(s.data.shape == (8,) for s in x.addressable_shards)


_LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "PDM_JAX_CLOUD_TPU",
               "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES",
               "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_GPUS_ON_NODE")


@pytest.fixture
def single_process_env(monkeypatch):
    """No launcher variables; the XLA backend is up (as after any test that made a mesh)."""
    for name in _LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert jax.device_count() == 8  # initialises the backend: a real initialize() now raises
    return monkeypatch


@pytest.mark.parametrize("env", [
    {},
    {"PDM_JAX_CLOUD_TPU": "0"},
    {"TPU_WORKER_HOSTNAMES": "host-0"},  # a single-host TPU VM
    {"TPU_WORKER_HOSTNAMES": "host-0, "},
    {"OMPI_COMM_WORLD_SIZE": "1"},
])
def test_maybe_initialize_distributed_is_a_noop_on_one_process(single_process_env, env):
    for name, value in env.items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed()  # would raise RuntimeError had it initialised
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and jax.device_count() == 8


# Each of these must reach jax.distributed.initialize, which refuses with a RuntimeError because
# the backend is already running in this process: proof that initialisation was attempted.
@pytest.mark.parametrize("env, args", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, ()),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, ()),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, ()),
    ({"PDM_JAX_CLOUD_TPU": "1"}, ()),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, ()),
    ({}, ("127.0.0.1:1", 4, 3)),
])
def test_maybe_initialize_distributed_starts_jax_distributed_when_launched_as_several(
        single_process_env, env, args):
    for name, value in env.items():
        single_process_env.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"initialize\(\) must be called before"):
        distributed.maybe_initialize_distributed(*args)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("name, value", [("JAX_NUM_PROCESSES", "two"), ("JAX_PROCESS_ID", "-1")])
def test_maybe_initialize_distributed_rejects_non_integer_process_variables(
        single_process_env, name, value):
    single_process_env.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^Environment variable {name}='{value}' must be a "
                                         r"non-negative integer\.$"):
        distributed.maybe_initialize_distributed()


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_pdm_jax_cloud_tpu_env_decides_cloud_tpu_detection(single_process_env, value, expected):
    single_process_env.setenv("PDM_JAX_CLOUD_TPU", value)
    assert distributed._running_on_cloud_tpu_vm() is expected


def test_cloud_tpu_detection_without_the_variable_is_false_on_a_cpu_run(single_process_env):
    single_process_env.setenv("JAX_PLATFORMS", "cpu")  # the probe is skipped off TPU
    assert distributed._running_on_cloud_tpu_vm() is False


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_bad_pdm_jax_cloud_tpu_value_raises_value_error(single_process_env, value):
    single_process_env.setenv("PDM_JAX_CLOUD_TPU", value)
    message = rf"^PDM_JAX_CLOUD_TPU='{value}' must be 1 or 0\.$"
    with pytest.raises(ValueError, match=message):
        distributed._running_on_cloud_tpu_vm()
    with pytest.raises(ValueError, match=message):  # before anything is initialised
        distributed.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()


#### Slurm: one process per node keeps every GPU of its node ####


def slurm_step(num_nodes: int, tasks_per_node: int, proc_id: int, **extra: str) -> dict:
    """The variables srun gives task ``proc_id`` of a step (nodes gpu01..., job 123456)."""
    return dict(dict(SLURM_JOB_ID="123456", SLURM_STEP_NODELIST=f"gpu[01-{num_nodes:02d}]",
                     SLURM_NTASKS=str(num_nodes * tasks_per_node), SLURM_PROCID=str(proc_id),
                     SLURM_LOCALID=str(proc_id % tasks_per_node),
                     SLURM_STEP_NUM_NODES=str(num_nodes), SLURM_NNODES=str(num_nodes)), **extra)


@pytest.fixture
def recorded_initialize(single_process_env):
    """jax.distributed.initialize replaced by a recorder of its keyword arguments."""
    calls = []
    single_process_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


SLURM_PORT = 61440 + 123456 % 4096  # JAX's own per-job port under Slurm


@pytest.mark.parametrize("gpu_env", [{"SLURM_GPUS_ON_NODE": "8"},
                                     {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}])
def test_plain_srun_with_one_task_per_node_keeps_all_8_gpus(single_process_env,
                                                             recorded_initialize, gpu_env):
    """`srun --ntasks-per-node=1 python -m pdm_jax.main` on 4 nodes of 8 GPUs, task 2."""
    for name, value in slurm_step(4, 1, 2, **gpu_env).items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed()
    (kwargs,) = recorded_initialize  # recognised as one of several processes
    assert kwargs == dict(coordinator_address=f"gpu01:{SLURM_PORT}", num_processes=4,
                          process_id=2, cluster_detection_method="deactivate",
                          local_device_ids=[0, 1, 2, 3, 4, 5, 6, 7])


def test_gpu_sh_node_arguments_under_srun_keep_all_gpus_and_the_given_values(
        single_process_env, recorded_initialize):
    """launch/gpu.sh slurm: srun one task per node, each passing the three flags itself."""
    for name, value in slurm_step(4, 1, 3, SLURM_GPUS_ON_NODE="8").items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed("gpu01:23456", 4, 3)
    (kwargs,) = recorded_initialize
    assert kwargs == dict(coordinator_address="gpu01:23456", num_processes=4, process_id=3,
                          cluster_detection_method="deactivate",
                          local_device_ids=list(range(8)))


def test_jax_alone_would_keep_gpu_0_and_keeps_given_local_device_ids(
        single_process_env):
    """JAX 0.10's own Slurm detection: with the three arguments but no local_device_ids it
    still restricts the process to GPU SLURM_LOCALID (= 0 with one task per node); given
    local_device_ids, it keeps them (and with detection deactivated it is not consulted)."""
    clusters = pytest.importorskip("jax._src.clusters")
    for name, value in slurm_step(4, 1, 3, SLURM_GPUS_ON_NODE="8").items():
        single_process_env.setenv(name, value)
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    assert detect("gpu01:1", 4, 3, None, None, 300)[3] == [0]
    assert detect("gpu01:1", 4, 3, list(range(8)), None, 300)[3] == list(range(8))


def test_one_task_per_node_without_a_gpu_count_deactivates_detection(single_process_env,
                                                                     recorded_initialize):
    """No CUDA_VISIBLE_DEVICES / SLURM_GPUS_ON_NODE: local_device_ids stays unset, which with
    detection deactivated means every device of the node."""
    for name, value in slurm_step(2, 1, 1, SLURM_STEP_NODELIST="a07,b03").items():
        single_process_env.setenv(name, value)
    single_process_env.setenv("JAX_COORDINATOR_PORT", "4444")
    distributed.maybe_initialize_distributed()
    (kwargs,) = recorded_initialize
    assert kwargs == dict(coordinator_address="a07:4444", num_processes=2, process_id=1,
                          cluster_detection_method="deactivate")


def test_one_task_per_gpu_keeps_jaxs_own_slurm_behaviour(single_process_env,
                                                        recorded_initialize):
    """`srun --ntasks-per-node=8`: JAX's default (the GPU numbered SLURM_LOCALID) is right."""
    for name, value in slurm_step(4, 8, 13, SLURM_GPUS_ON_NODE="8").items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert recorded_initialize == [dict(coordinator_address=None, num_processes=None,
                                        process_id=None)]


def test_jax_local_device_ids_in_the_environment_win(single_process_env, recorded_initialize):
    for name, value in slurm_step(4, 1, 0, SLURM_GPUS_ON_NODE="8",
                                  JAX_LOCAL_DEVICE_IDS="0,1").items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert recorded_initialize == [dict(coordinator_address=None, num_processes=None,
                                        process_id=None)]  # JAX reads the variable itself


@pytest.mark.parametrize("env, multi", [
    (slurm_step(4, 1, 0), True),
    (slurm_step(1, 2, 1), True),
    (slurm_step(1, 1, 0), False),  # a single-task step is one process
    # The batch script itself (no step variables) is one process whatever --ntasks says.
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False),
])
def test_slurm_steps_with_several_tasks_are_recognised_as_multi_process(
        single_process_env, recorded_initialize, env, multi):
    for name, value in env.items():
        single_process_env.setenv(name, value)
    distributed.maybe_initialize_distributed()
    assert bool(recorded_initialize) is multi


#### Multislice: data parallel across slices, FSDP within one ####


class FakeDevice:
    """What create_hybrid_device_mesh reads from a device: id, slice_index, platform, kind."""

    platform = device_kind = "cpu"

    def __init__(self, id: int, slice_index: int, process_index: int):
        self.id, self.slice_index, self.process_index = id, slice_index, process_index

    def __repr__(self):
        return f"D{self.id}@s{self.slice_index}"


@pytest.mark.parametrize("sizes", [(4, 4), (8, 2), (16, 1), (12, 1)])
def test_hybrid_device_array_never_puts_an_fsdp_group_across_slices(sizes):
    if math.prod(sizes) == 12:  # 3 slices of 4
        devices = [FakeDevice(i, i // 4, i // 2) for i in range(12)]
    else:  # 4 slices of 4 chips, 2 hosts each
        devices = [FakeDevice(i, i // 4, i // 2) for i in range(16)]
    array = sharding.mesh_device_array(sizes, devices)
    assert array.shape == sizes
    assert sorted(d.id for d in array.flat) == list(range(len(devices)))
    num_slices = len({d.slice_index for d in devices})
    rows_per_slice = sizes[0] // num_slices
    for row_index, row in enumerate(array):
        assert {d.slice_index for d in row} == {row_index // rows_per_slice}


@pytest.fixture
def two_slices(monkeypatch):
    """The 8 CPU devices as 2 slices of 4 (ids 0-3 and 4-7), as a 2-slice TPU job has them."""
    device_type = type(jax.devices()[0])
    monkeypatch.setattr(device_type, "slice_index", property(lambda d: d.id // 4),
                        raising=False)
    assert [d.slice_index for d in jax.devices()] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("shape, expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)),
                                             ((-1, 2), (4, 2)), ((4, 2), (4, 2))])
def test_make_mesh_on_two_slices_keeps_fsdp_inside_a_slice(two_slices, shape, expected):
    mesh = sharding.make_mesh(shape)
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    for fsdp_group in mesh.devices:  # one row per data index
        assert len({d.slice_index for d in fsdp_group}) == 1
    # The data axis spans both slices (the DCN carries data parallelism only).
    assert {d.slice_index for d in mesh.devices[:, 0]} == {0, 1}
    # The mesh works: a sharded batch and an FSDP-sharded parameter in one jitted step.
    batch = sharding.global_batch({"x": np.arange(16, dtype=np.float32)}, mesh)["x"]
    w = jax.device_put(jnp.ones((8, 1024)), sharding.param_shardings(
        {"w": jax.ShapeDtypeStruct((8, 1024), jnp.float32)}, mesh)["w"])
    total = jax.jit(lambda b, w: b.sum() * w.sum())(batch, w)
    assert float(total) == 120.0 * 8 * 1024


@pytest.mark.parametrize("shape", [(1, 8), (-1, 8)])
def test_fsdp_across_slices_is_refused_before_anything_is_built(two_slices, shape):
    message = (r"^mesh.shape=\(1, 8\): the devices span 2 slices \(multislice\), .*'data' "
               r"\(=1\) must be a multiple of 2 .* each 'fsdp' group \(=8\) stays inside one")
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape)  # what config_validation.validate calls
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_single_slice_devices_still_use_jax_make_mesh(monkeypatch):
    calls = []
    make_mesh = jax.make_mesh
    monkeypatch.setattr(jax, "make_mesh", lambda *a, **k: calls.append(a) or make_mesh(*a, **k))
    sharding.make_mesh((2, 4))
    assert calls == [((2, 4), ("data", "fsdp"))]


_SRUN_TASK = """
import jax
from pdm_jax import distributed
distributed.maybe_initialize_distributed()
print("RESULT", jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count(), flush=True)
"""


@pytest.mark.slow
def test_plain_srun_of_two_tasks_starts_one_distributed_run(tmp_path):
    """Two real processes with the variables `srun --nodes=2 --ntasks-per-node=1` gives them
    (nodes "127.0.0.1", 4 CPU devices each, 8 "GPUs" per node): both join one jax.distributed
    run through the arguments this module passes (detection off, local_device_ids)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_COORDINATOR_PORT=str(port), SLURM_GPUS_ON_NODE="8",
                **slurm_step(2, 1, 0, SLURM_STEP_NODELIST="127.0.0.1,127.0.0.2"))
    procs = [subprocess.Popen([sys.executable, "-c", _SRUN_TASK], cwd=tmp_path,
                              env=dict(base, SLURM_PROCID=str(i),
                                       PYTHONPATH=str(REPO)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = sorted(line.split()[1:] for out, _ in outputs
                     for line in out.splitlines() if line.startswith("RESULT"))
    assert results == [["0", "2", "4", "8"], ["1", "2", "4", "8"]], [e[-2000:] for _, e in outputs]
