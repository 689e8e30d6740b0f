"""Meshes, parameter sharding rules and global batches on 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pdm_jax import sharding


@pytest.mark.parametrize(
    "shape, expected",
    [((-1, 1), (8, 1)), ((2, -1), (2, 4)), ((-1, 8), (1, 8)), ((4, 2), (4, 2)), ((-1,), (8,))],
)
def test_make_mesh_fills_minus_one_with_the_remaining_devices(shape, expected):
    names = ("data", "fsdp")[: len(shape)]
    mesh = sharding.make_mesh(shape, names)
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == names
    assert mesh.devices.size == jax.device_count() == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 1), r"\(3, 1\) needs 3 devices but 8 are available"),
        ((3, -1), r"8 devices are not divisible .* 3"),
        ((-1, -1), "at most one -1"),
        ((0, 8), "positive sizes"),
        ((8,), "has 1 axes but axis_names"),
    ],
)
def test_make_mesh_rejects_shapes_that_do_not_fit(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


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


def test_maybe_initialize_distributed_is_a_noop_on_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    sharding.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1


def test_maybe_initialize_distributed_starts_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    sharding.maybe_initialize_distributed()  # jax.distributed reads the address itself
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    sharding.maybe_initialize_distributed("10.0.0.2:99", 4, 3)
    assert calls == [
        dict(coordinator_address=None, num_processes=None, process_id=None),
        dict(coordinator_address="10.0.0.2:99", num_processes=4, process_id=3),
    ]
