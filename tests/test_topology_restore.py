"""A checkpoint written on one mesh restores onto another (device count, data/fsdp split).

Training builds the restore target from the CURRENT mesh (the abstract state of
training.state.setup_expert), so a run resumes wherever it is started. Here a train state of the
smoke U-Net (params, Adam state, EMA, step, rng; random values so that every leaf is
distinguishable) is saved from mesh data=8 and restored onto data=2 x fsdp=4 (same 8 devices)
and onto data=1 x fsdp=4 (4 of them): every leaf must come back bit-identical and laid out as
the new mesh's FSDP rules say.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import demo_config
from pdm_jax import checkpointing, sharding
from pdm_jax.diffusion.experts import experts_from_config
from pdm_jax.training.state import setup_expert

STEP = 7
SEED = 0


def smoke_expert():
    return experts_from_config(demo_config("smoke,experts=1"))[0]


def mesh_over(n_devices: int, data: int, fsdp: int) -> Mesh:
    devices = np.array(jax.devices()[:n_devices]).reshape(data, fsdp)
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(devices, (sharding.DATA_AXIS, sharding.FSDP_AXIS), axis_types=axis_types)


def random_state(abstract, seed: int = 0):
    """Random host values shaped like `abstract`, placed with its shardings (no compile)."""
    rng = np.random.default_rng(seed)

    def one(a):
        if np.issubdtype(a.dtype, np.integer):
            value = rng.integers(0, 1000, a.shape).astype(a.dtype)
        else:
            value = rng.standard_normal(a.shape).astype(a.dtype)
        return jax.device_put(value, a.sharding)

    return jax.tree.map(one, abstract)


def host(tree) -> dict[str, np.ndarray]:
    return {sharding.path_str(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A data=8 checkpoint of a random smoke-U-Net train state."""
    expert = smoke_expert()
    setup = setup_expert(expert, mesh_over(8, 8, 1), SEED)
    state = random_state(setup.abstract)
    directory = str(tmp_path_factory.mktemp("ckpt"))
    with checkpointing.Checkpointer(directory, async_save=False,
                                    signature=setup.signature, writer=True) as ckpt:
        ckpt.save(STEP, state, {"data_position": {}})
        assert ckpt.all_steps() == [STEP]
    for leaf in jax.tree.leaves(state):  # written fully replicated over data=8
        assert leaf.sharding.spec == P()
    return dict(expert=expert, directory=directory, signature=setup.signature,
                values=host(state))


@pytest.mark.parametrize("n_devices,data,fsdp", [(8, 2, 4), (4, 1, 4)])
def test_data8_checkpoint_restores_onto_an_fsdp_mesh(saved, n_devices, data, fsdp):
    mesh = mesh_over(n_devices, data, fsdp)
    setup = setup_expert(saved["expert"], mesh, SEED)  # what training builds on this mesh
    assert setup.signature == saved["signature"]
    with checkpointing.Checkpointer(saved["directory"], signature=setup.signature) as ckpt:
        assert ckpt.latest_step() == STEP
        restored, meta = ckpt.restore(setup.abstract)
    assert meta["data_position"] == {}

    values = host(restored)
    assert values.keys() == saved["values"].keys()
    for key, want in saved["values"].items():
        np.testing.assert_array_equal(values[key], want, err_msg=key)
    assert {k.split("/")[0] for k in values} == {"params", "opt_state", "ema", "step", "rng"}

    # Laid out per the NEW mesh: the shardings train() would use, on its devices.
    named = {sharding.path_str(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    expected = {sharding.path_str(p): s
                for p, s in jax.tree_util.tree_flatten_with_path(setup.shardings)[0]}
    sharded = {"params": 0, "opt_state": 0, "ema": 0}
    for key, array in named.items():
        assert array.sharding.mesh.devices.shape == (data, fsdp), key
        assert array.sharding.spec == expected[key].spec, key
        spec = tuple(array.sharding.spec)
        if sharding.FSDP_AXIS in spec:
            dim = spec.index(sharding.FSDP_AXIS)
            shard_shapes = {s.data.shape for s in array.addressable_shards}
            assert shard_shapes == {array.shape[:dim] + (array.shape[dim] // fsdp,)
                                    + array.shape[dim + 1:]}, key
            sharded[key.split("/")[0]] += 1
    # Large kernels of params, both Adam moments and EMA are really split over 'fsdp'.
    assert sharded["params"] > 0 and sharded["ema"] == sharded["params"]
    assert sharded["opt_state"] == 2 * sharded["params"], sharded
