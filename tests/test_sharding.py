"""Meshes, parameter sharding rules and global batches on 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pdm_jax import sharding


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
               "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "PDM_JAX_CLOUD_TPU")


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
    sharding.maybe_initialize_distributed()  # would raise RuntimeError had it initialised
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
        sharding.maybe_initialize_distributed(*args)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("name, value", [("JAX_NUM_PROCESSES", "two"), ("JAX_PROCESS_ID", "-1")])
def test_maybe_initialize_distributed_rejects_non_integer_process_variables(
        single_process_env, name, value):
    single_process_env.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^Environment variable {name}='{value}' must be a "
                                         r"non-negative integer\.$"):
        sharding.maybe_initialize_distributed()


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_pdm_jax_cloud_tpu_env_decides_cloud_tpu_detection(single_process_env, value, expected):
    single_process_env.setenv("PDM_JAX_CLOUD_TPU", value)
    assert sharding._running_on_cloud_tpu_vm() is expected


def test_cloud_tpu_detection_without_the_variable_is_false_on_a_cpu_run(single_process_env):
    single_process_env.setenv("JAX_PLATFORMS", "cpu")  # the probe is skipped off TPU
    assert sharding._running_on_cloud_tpu_vm() is False


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_bad_pdm_jax_cloud_tpu_value_raises_value_error(single_process_env, value):
    single_process_env.setenv("PDM_JAX_CLOUD_TPU", value)
    message = rf"^PDM_JAX_CLOUD_TPU='{value}' must be 1 or 0\.$"
    with pytest.raises(ValueError, match=message):
        sharding._running_on_cloud_tpu_vm()
    with pytest.raises(ValueError, match=message):  # before anything is initialised
        sharding.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()
