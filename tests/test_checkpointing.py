"""Checkpointer: roundtrips, retention, cross-mesh restore, refusals, crash safety, SIGTERM."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdm_jax import sharding
from pdm_jax.checkpointing import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_state(mesh, seed=0, min_fsdp_size=2**14):
    """A small train state: params, a real optax adam state, EMA, step, rng; sharded on `mesh`."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)},
              "dense": {"kernel": rng.normal(size=(32, 8)).astype(np.float32),
                        "bias": rng.normal(size=(8,)).astype(np.float32)}}
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments, count = 1
    state = {"params": params, "opt_state": opt_state,
             "ema": jax.tree.map(lambda p: 0.5 * p, params),
             "step": jnp.asarray(7, jnp.int32), "rng": jax.random.key(seed),  # typed key
             "rng_raw": jax.random.key_data(jax.random.key(seed + 1))}
    return jax.device_put(state, sharding.param_shardings(state, mesh, min_fsdp_size=min_fsdp_size))


def abstract(state, mesh, min_fsdp_size=2**14):
    """The restore target for `mesh`: shapes/dtypes of `state`, shardings from the rules."""
    shardings = sharding.param_shardings(state, mesh, min_fsdp_size=min_fsdp_size)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_with_adam_state_and_metadata(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    meta = {"data_position": {"examples_consumed": 4096}, "note": "first"}
    target = abstract(state, mesh)
    # Saving and restoring make only explicit host<->device copies (STYLE: transfer guard).
    with jax.transfer_guard("disallow"):
        with Checkpointer(str(tmp_path), config_fingerprint="fp1", config_json='{"a": 1}') as ckpt:
            assert ckpt.latest_step() is None
            assert ckpt.save(7, state, meta)
            ckpt.wait_until_finished()
            assert ckpt.latest_step() == 7
        with Checkpointer(str(tmp_path), config_fingerprint="fp1") as ckpt:  # a fresh process
            restored, restored_meta = ckpt.restore(target)
    assert_trees_bitwise_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert int(restored["opt_state"][0].count) == 1
    assert restored_meta["data_position"] == {"examples_consumed": 4096}
    assert restored_meta["config_fingerprint"] == "fp1"
    assert json.loads(restored_meta["config_json"]) == {"a": 1}


def test_save_interval_and_max_to_keep_are_honoured(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = {"w": jax.device_put(jnp.arange(4.0), sharding.replicated(mesh))}
    with Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [step for step in range(1, 7) if ckpt.save(step, state, {"step": step})]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, {}, force=True)  # e.g. on preemption, off-interval
        assert not ckpt.save(7, state, {}, force=True)  # an existing step is never rewritten
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


@pytest.mark.parametrize("save_shape, restore_shape", [((8, 1), (2, 4)), ((2, 4), (1, 8))])
def test_restore_onto_a_different_mesh_is_bitwise_identical(tmp_path, save_shape, restore_shape):
    save_mesh = sharding.make_mesh(save_shape)
    state = make_state(save_mesh, min_fsdp_size=64)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, state, {})
    new_mesh = sharding.make_mesh(restore_shape)
    target = abstract(state, new_mesh, min_fsdp_size=64)
    with Checkpointer(str(tmp_path)) as ckpt:
        restored, _ = ckpt.restore(target, step=3)
    assert_trees_bitwise_equal(restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert leaf.sharding == want.sharding
    kernel = restored["params"]["conv"]["kernel"]
    assert kernel.sharding.mesh.shape == dict(zip(("data", "fsdp"), restore_shape))
    assert kernel.addressable_shards[0].data.shape[-1] == 16 // restore_shape[1]


def test_restore_under_another_config_names_both_fingerprints_and_differing_keys(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = {"w": jax.device_put(jnp.ones(4), sharding.replicated(mesh))}
    old_cfg = json.dumps({"model": {"ch": 64}, "optim": {"lr": 1e-4}, "seed": 0})
    new_cfg = json.dumps({"model": {"ch": 64}, "optim": {"lr": 5e-5}, "seed": 0, "extra": 1})
    with Checkpointer(str(tmp_path), config_fingerprint="aaa111", config_json=old_cfg) as ckpt:
        ckpt.save(1, state, {})
    with Checkpointer(str(tmp_path), config_fingerprint="bbb222", config_json=new_cfg) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.restore(abstract(state, mesh))
    message = str(err.value)
    assert "'aaa111'" in message and "'bbb222'" in message
    assert str(tmp_path) in message
    assert "['extra', 'optim']" in message


def test_restore_into_a_different_shape_or_tree_names_the_key(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state, {})
        target = abstract(state, mesh)
        target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 8), jnp.float32)
        with pytest.raises(ValueError, match=r"Shape mismatch at 'params/dense/kernel': "
                           r"checkpoint .* has shape \(32, 8\), the restore target has shape "
                           r"\(16, 8\)"):
            ckpt.restore(target)
        target = abstract(state, mesh)
        target["params"]["new_layer"] = jax.ShapeDtypeStruct((4,), jnp.float32)
        with pytest.raises(ValueError, match=r"key 'params/new_layer' \(shape \(4,\)\) is not in"):
            ckpt.restore(target)
        target = abstract(state, mesh)
        del target["ema"]
        with pytest.raises(ValueError, match=r"has key 'ema/conv/kernel' .* target lacks"):
            ckpt.restore(target)
        with pytest.raises(FileNotFoundError, match=r"No checkpoint step 5 .* steps: \[1\]"):
            ckpt.restore(abstract(state, mesh), step=5)


def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    bad = jax.tree.map(lambda x: x, state)
    bad["ema"]["dense"]["bias"] = bad["ema"]["dense"]["bias"].at[3].set(jnp.nan)
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError, match=r"step 5 .* 'ema/dense/bias' contains NaN or Inf"):
            ckpt.save(5, bad, {})
        bad["ema"]["dense"]["bias"] = state["ema"]["dense"]["bias"]
        bad["opt_state"][0].nu["conv"]["kernel"] = jnp.full((3, 3, 8, 16), jnp.inf, jnp.bfloat16)
        with pytest.raises(ValueError, match=r"'opt_state/0/nu/conv/kernel' contains NaN or Inf"):
            ckpt.save(5, bad, {})
        assert ckpt.save(5, state, {})  # the finite state is accepted
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5]


# Runs in a subprocess: finalises step 1, then dies (SIGKILL, no clean-up) during step 2.
_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from pdm_jax.checkpointing import Checkpointer
    mode, directory = sys.argv[1:]
    ckpt = Checkpointer(directory, async_save=True)
    big = lambda v: {"w": jnp.full((4 * 1024 * 1024,), v, jnp.float32)}  # 16 MiB
    ckpt.save(1, big(1.0), {"examples_consumed": 1})
    ckpt.wait_until_finished()
    if mode == "at_rename":  # the worst moment: all data written, not yet renamed into place
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename = os.replace = die
    ckpt.save(2, big(2.0), {"examples_consumed": 2})
    if mode == "after_save_returns":  # async write still in flight
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.wait_until_finished()
    sys.exit(3)  # not reached: the process must have been killed
""")


@pytest.mark.parametrize("mode", ["after_save_returns", "at_rename"])
def test_kill_during_save_leaves_the_last_finalised_step(tmp_path, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, mode, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.isdigit()]
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers
    assert not (tmp_path / "2").exists()

    mesh = sharding.make_mesh((8, 1))
    target = {"w": jax.ShapeDtypeStruct((4 * 1024 * 1024,), jnp.float32,
                                        sharding=sharding.replicated(mesh))}
    with Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(target)
    assert float(restored["w"].min()) == float(restored["w"].max()) == 1.0
    assert meta["examples_consumed"] == 1
    # The unfinished directory was cleaned up when the directory was reopened.
    assert not any(p.name.startswith("2.") for p in tmp_path.iterdir())


def test_sigterm_sets_should_stop_and_close_restores_the_old_handler(tmp_path):
    original = signal.getsignal(signal.SIGTERM)
    try:
        ckpt = Checkpointer(str(tmp_path))
        assert ckpt.install_sigterm_handler() is original
        assert not ckpt.should_stop(step=0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not ckpt.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread
        assert ckpt.should_stop(step=1)
        assert not ckpt.reached_preemption(1)  # no preemption service in a single process
        ckpt.close()
        assert signal.getsignal(signal.SIGTERM) is original
    finally:
        signal.signal(signal.SIGTERM, original)
