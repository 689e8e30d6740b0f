"""Checkpoints: roundtrips, explicit steps, cross-mesh restore, refusals, crash safety, expert
sets resumed as one (partial steps discarded, pruning), incomplete step directories, SIGTERM."""

import logging
import os
import pathlib
import re
import shutil
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
from jax.sharding import Mesh

from conftest import REPO, demo_config
from pdm_jax import sharding
from pdm_jax.checkpointing import Checkpointer, ExpertCheckpoints, expert_checkpoint_dir
from pdm_jax.run_loading import latest_expert_step
from pdm_jax.training.preemption import StopRequest
from pdm_jax.training.state import setup_experts


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


def step_dirs(directory) -> list[str]:
    """Names of the entries of a checkpoint directory that start with a step number."""
    return sorted((p.name for p in pathlib.Path(directory).iterdir() if p.name[0].isdigit()),
                  key=lambda name: (int(re.match(r"\d+", name)[0]), name))


def files_under(directory) -> set[str]:
    directory = pathlib.Path(directory)
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


#### One directory: Checkpointer ####


def test_roundtrip_with_adam_state_metadata_and_signature(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    meta = {"data_position": {"examples_consumed": 4096}, "note": "first"}
    signature = {"model": {"patch_size": 2, "channel_mult": [1, 2]}, "optim": {"grad_clip": True}}
    target = abstract(state, mesh)
    # Saving and restoring make only explicit host<->device copies (STYLE: transfer guard).
    with jax.transfer_guard("disallow"):
        with Checkpointer(str(tmp_path), signature=signature, writer=True) as ckpt:
            assert ckpt.latest_step() is None and ckpt.all_steps() == []
            ckpt.save(7, state, meta)
            ckpt.wait_until_finished()
            assert ckpt.latest_step() == 7
        with Checkpointer(str(tmp_path), signature=signature) as ckpt:  # a fresh reader
            restored, restored_meta = ckpt.restore(target)
    assert_trees_bitwise_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert int(restored["opt_state"][0].count) == 1
    assert restored_meta["data_position"] == {"examples_consumed": 4096}
    assert restored_meta["note"] == "first"
    assert restored_meta["checkpoint_signature"] == signature
    assert step_dirs(tmp_path) == ["7"]


def test_save_interval_decides_should_save_and_every_saved_step_is_kept(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = {"w": jax.device_put(jnp.arange(4.0), sharding.replicated(mesh))}
    with Checkpointer(str(tmp_path), save_interval_steps=2, writer=True) as ckpt:
        due = [step for step in range(1, 7) if ckpt.should_save(step)]
        assert due == [2, 4, 6]
        for step in due:
            ckpt.save(step, {"w": state["w"] + step}, {"step": step})
        ckpt.save(7, state, {"step": 7})  # off-interval (e.g. on preemption) is written too
        with pytest.raises(ValueError, match=r"Checkpoint step 7 already exists in "):
            ckpt.save(7, state, {})  # an existing step is never rewritten
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 4, 6, 7]  # orbax prunes nothing
        ckpt.delete(4)
        assert ckpt.all_steps() == [2, 6, 7]
        target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding.replicated(mesh))}
        restored, meta = ckpt.restore(target, step=6)
    np.testing.assert_array_equal(np.asarray(restored["w"]), [6.0, 7.0, 8.0, 9.0])
    assert meta["step"] == 6
    assert step_dirs(tmp_path) == ["2", "6", "7"]
    with pytest.raises(ValueError, match="save_interval_steps must be >= 1, got 0"):
        Checkpointer(str(tmp_path), save_interval_steps=0)


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


def test_restore_under_another_signature_names_the_differing_dotted_keys(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = {"w": jax.device_put(jnp.ones(4), sharding.replicated(mesh))}
    old = {"model": {"ch": 64, "patch_size": 2}, "optim": {"grad_clip": True}}
    new = {"model": {"ch": 64, "patch_size": 4, "extra": 1}, "optim": {"grad_clip": True}}
    with Checkpointer(str(tmp_path), signature=old) as ckpt:
        ckpt.save(1, state, {})
    with Checkpointer(str(tmp_path), signature=new) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.restore(abstract(state, mesh))
    assert str(err.value) == (
        f"Checkpoint {tmp_path} step 1 was written for another architecture (checkpoint vs "
        f"current config): model.extra: (absent) vs 1; model.patch_size: 2 vs 4. Resume with "
        f"the original settings or use a new workdir.")
    with Checkpointer(str(tmp_path), signature=old) as ckpt:  # the same signature restores
        restored, meta = ckpt.restore(abstract(state, mesh))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(4))
    assert meta["checkpoint_signature"] == old


def test_restore_into_a_different_shape_or_tree_names_the_key(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state, {})
        target = abstract(state, mesh)
        target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 8), jnp.float32)
        with pytest.raises(ValueError, match=r"Shape mismatch at params/dense/kernel: "
                           r"checkpoint .* has shape \(32, 8\), the restore target has shape "
                           r"\(16, 8\)"):
            ckpt.restore(target)
        target = abstract(state, mesh)
        target["params"]["new_layer"] = jax.ShapeDtypeStruct((4,), jnp.float32)
        with pytest.raises(ValueError, match=r"key params/new_layer \(shape \(4,\)\) is not in"):
            ckpt.restore(target)
        target = abstract(state, mesh)
        del target["ema"]
        with pytest.raises(ValueError, match=r"has key ema/conv/kernel .* target lacks "
                                             r"\(3 such keys\)"):
            ckpt.restore(target)
        with pytest.raises(FileNotFoundError, match=r"No checkpoint step 5 .* steps: \[1\]"):
            ckpt.restore(abstract(state, mesh), step=5)


def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path):
    mesh = sharding.make_mesh((8, 1))
    state = make_state(mesh)
    bad = jax.tree.map(lambda x: x, state)
    bad["ema"]["dense"]["bias"] = bad["ema"]["dense"]["bias"].at[3].set(jnp.nan)
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError, match=r"step 5 .* state leaf ema/dense/bias contains "
                                             r"NaN or Inf"):
            ckpt.save(5, bad, {})
        bad["ema"]["dense"]["bias"] = state["ema"]["dense"]["bias"]
        bad["opt_state"][0].nu["conv"]["kernel"] = jnp.full((3, 3, 8, 16), jnp.inf, jnp.bfloat16)
        with pytest.raises(ValueError, match=r"leaf opt_state/0/nu/conv/kernel contains NaN or"):
            ckpt.save(5, bad, {})
        with pytest.raises(ValueError, match="metadata is not JSON-serialisable"):
            ckpt.save(5, state, {"when": object()})
        assert ckpt.all_steps() == [] and step_dirs(tmp_path) == []
        ckpt.save(5, state, {})  # the finite state is accepted
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5]


# Runs in a subprocess: finalises step 1, then dies (SIGKILL, no clean-up) during step 2.
_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from pdm_jax.checkpointing import Checkpointer
    mode, directory = sys.argv[1:]
    ckpt = Checkpointer(directory, async_save=True, writer=True)
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
    assert all(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers
    if mode == "at_rename":  # all data written: only the rename into place is missing
        assert leftovers, "step 2 was never started"
    # (after_save_returns: orbax creates the directories asynchronously too, so a kill right
    # after save() returns may come before '2.orbax-checkpoint-tmp' exists.)
    assert step_dirs(tmp_path) == ["1"] + leftovers

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


#### Incomplete step directories ####


@pytest.mark.parametrize("missing", ["_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata"])
def test_incomplete_step_dirs_are_skipped_by_readers_and_set_aside_by_writers(
        tmp_path, caplog, missing):
    mesh = sharding.make_mesh((8, 1))
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh))}
    directory = pathlib.Path(expert_checkpoint_dir(str(tmp_path), "e"))

    def value(v):
        return {"w": jax.device_put(jnp.full((3,), float(v)), sharding.replicated(mesh))}

    with Checkpointer(str(directory), writer=True) as ckpt:
        ckpt.save(2, value(2), {"step": 2})
        ckpt.save(4, value(4), {"step": 4})
    (directory / "6").mkdir()  # what two trainers on one workdir left behind
    shutil.copytree(directory / "4", directory / "8")
    (directory / "8" / missing).unlink()  # a step cut short before its commit

    # A reader (sampling, export, a second process) lists and restores complete steps only.
    assert latest_expert_step(str(tmp_path), "e") == 4
    with Checkpointer(str(directory)) as reader:
        assert reader.all_steps() == [2, 4] and reader.latest_step() == 4
        restored, meta = reader.restore(target)  # orbax died on '6': Item "meta" was not found
    np.testing.assert_array_equal(np.asarray(restored["w"]), [4.0, 4.0, 4.0])
    assert meta["step"] == 4
    assert step_dirs(directory) == ["2", "4", "6", "8"]  # readers move nothing

    with caplog.at_level(logging.WARNING):
        writer = Checkpointer(str(directory), writer=True)
    names = step_dirs(directory)
    assert len(names) == 4 and names[:2] == ["2", "4"], names
    assert re.fullmatch(r"6\.incomplete-\d{8}-\d{6}", names[2]), names
    assert re.fullmatch(r"8\.incomplete-\d{8}-\d{6}", names[3]), names
    # Moved, not deleted: the set-aside step holds the files it had.
    assert files_under(directory / names[3]) == files_under(directory / "4") - {missing}
    assert files_under(directory / names[2]) == set()
    for step, aside in ((6, names[2]), (8, names[3])):
        assert (f"{directory}/{step} is not a complete checkpoint (no commit files: killed or "
                f"concurrent writer?); moving it aside to {aside}") in caplog.text
    with writer:
        assert writer.all_steps() == [2, 4]
        writer.save(6, value(6), {"step": 6})  # the step number is free again
        writer.wait_until_finished()
        assert writer.all_steps() == [2, 4, 6]
        restored, meta = writer.restore(target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), [6.0, 6.0, 6.0])
    assert meta["step"] == 6
    assert latest_expert_step(str(tmp_path), "e") == 6


#### The experts of a run: ExpertCheckpoints ####


def one_device_mesh() -> Mesh:
    # One device: no replicas for orbax to write or slice; the set logic is mesh-independent
    # (cross-mesh restores are tested above and in test_topology_restore.py).
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                (sharding.DATA_AXIS, sharding.FSDP_AXIS),
                axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def setups():
    """The two experts of the smoke demo (patch 2 and patch 4), shrunk to ~250 state leaves."""
    config = demo_config("smoke")
    config.model.channel_mult = (1,)
    config.model.attention_resolutions = ()
    result = setup_experts(config, one_device_mesh())
    assert [s.expert.model.patch_size for s in result] == [2, 4]
    return result


def random_states(setups, step: int) -> dict:
    """{expert name: state}: random values placed with the setups' shardings, distinct per
    expert and step (no compilation)."""
    states = {}
    for i, setup in enumerate(setups):
        rng = np.random.default_rng(1000 * step + i)

        def one(a):
            if np.issubdtype(a.dtype, np.integer):
                value = rng.integers(0, 2**16, a.shape).astype(a.dtype)
            else:
                value = rng.standard_normal(a.shape).astype(a.dtype)
            return jax.device_put(value, a.sharding)

        states[setup.name] = jax.tree.map(one, setup.abstract)
    return states


def expert_steps(workdir, setups) -> dict[str, list[str]]:
    return {s.name: step_dirs(expert_checkpoint_dir(str(workdir), s.name)) for s in setups}


@pytest.mark.parametrize("cut_short", ["expert 1 never wrote step 4",
                                       "expert 1 step 4 lacks its commit files"])
def test_restore_latest_resumes_the_newest_step_every_expert_committed(tmp_path, setups,
                                                                       cut_short):
    first, second = (s.name for s in setups)
    at = {2: random_states(setups, 2), 4: random_states(setups, 4)}
    ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=5)
    assert ckpts.restore_latest() is None  # a fresh run
    ckpts.save(2, at[2], {"data_position": 2})
    ckpts.close()
    if cut_short == "expert 1 never wrote step 4":  # killed between the experts' saves
        with Checkpointer(expert_checkpoint_dir(str(tmp_path), first), writer=True,
                          signature=setups[0].signature) as ckpt:
            ckpt.save(4, at[4][first], {"data_position": 4})
    else:  # killed while expert 1's step 4 was being committed
        ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=5)
        ckpts.save(4, at[4], {"data_position": 4})
        ckpts.close()
        (pathlib.Path(expert_checkpoint_dir(str(tmp_path), second)) / "4" /
         "_CHECKPOINT_METADATA").unlink()
    assert latest_expert_step(str(tmp_path), first) == 4
    assert latest_expert_step(str(tmp_path), second) == 2

    ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=5)
    step, states, meta = ckpts.restore_latest()
    assert step == 2 and meta["data_position"] == 2
    assert states.keys() == {first, second}
    for name in (first, second):
        assert_trees_bitwise_equal(states[name], at[2][name])
    # Expert 0's step 4 is gone: the resumed run writes it again.
    assert expert_steps(tmp_path, setups)[first] == ["2"]
    assert latest_expert_step(str(tmp_path), first) == 2
    if cut_short == "expert 1 never wrote step 4":
        assert expert_steps(tmp_path, setups)[second] == ["2"]
    else:
        assert expert_steps(tmp_path, setups)[second][0] == "2"
        assert re.fullmatch(r"4\.incomplete-.*", expert_steps(tmp_path, setups)[second][1])
    ckpts.save(4, at[4], {"data_position": 4})
    ckpts.close()
    ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=5)
    step, states, meta = ckpts.restore_latest()
    ckpts.close()
    assert step == 4 and meta["data_position"] == 4
    for name in (first, second):
        assert_trees_bitwise_equal(states[name], at[4][name])


def test_keep_1_leaves_the_newest_complete_step_and_never_the_last_set_before_a_newer(
        tmp_path, setups):
    first, _ = (s.name for s in setups)
    at = {step: random_states(setups, step) for step in (2, 4, 6)}
    ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=1)
    assert [step for step in range(1, 7) if ckpts.should_save(step)] == [2, 4, 6]
    ckpts.save(2, at[2], {"data_position": 2})
    ckpts.save(4, at[4], {"data_position": 4})
    # Step 4 may still be in flight: step 2, the only complete set, must still be there.
    assert all(names[0] == "2" for names in expert_steps(tmp_path, setups).values())
    ckpts.save(6, at[6], {"data_position": 6})  # 4 is complete now: 2 goes
    for names in expert_steps(tmp_path, setups).values():
        # '6' or its '6.orbax-checkpoint-tmp' while the write is in flight
        assert names[0] == "4" and len(names) == 2 and names[1].startswith("6"), names
    ckpts.close()
    assert expert_steps(tmp_path, setups) == {s.name: ["6"] for s in setups}

    # A newer step only one expert committed does not count: step 6 stays until 8 is complete.
    with Checkpointer(expert_checkpoint_dir(str(tmp_path), first), writer=True,
                      signature=setups[0].signature) as ckpt:
        ckpt.save(8, at[2][first], {"data_position": 8})
    ExpertCheckpoints(str(tmp_path), setups, every=2, keep=1).close()
    assert expert_steps(tmp_path, setups) == {first: ["6", "8"], setups[1].name: ["6"]}
    ckpts = ExpertCheckpoints(str(tmp_path), setups, every=2, keep=1)
    step, states, meta = ckpts.restore_latest()
    assert step == 6 and meta["data_position"] == 6
    for name, state in states.items():
        assert_trees_bitwise_equal(state, at[6][name])
    ckpts.save(6, at[2], {"data_position": 0})  # a complete step is not saved again
    assert expert_steps(tmp_path, setups) == {s.name: ["6"] for s in setups}
    ckpts.save(8, at[4], {"data_position": 8})
    ckpts.close()
    assert expert_steps(tmp_path, setups) == {s.name: ["8"] for s in setups}
    with pytest.raises(ValueError, match="ckpt.keep must be >= 1, got 0"):
        ExpertCheckpoints(str(tmp_path), setups, every=2, keep=0)


def test_restoring_an_expert_under_another_architecture_names_the_dotted_keys(tmp_path, setups):
    patch2, patch4 = setups
    assert patch2.signature["model"]["patch_size"] == 2
    with Checkpointer(str(tmp_path), signature=patch2.signature) as ckpt:
        ckpt.save(2, random_states(setups, 2)[patch2.name], {})
    with Checkpointer(str(tmp_path), signature=patch4.signature) as ckpt:
        with pytest.raises(ValueError) as err:
            ckpt.restore(patch4.abstract)
    assert str(err.value) == (
        f"Checkpoint {tmp_path} step 2 was written for another architecture (checkpoint vs "
        f"current config): model.patch_size: 2 vs 4. Resume with the original settings or use "
        f"a new workdir.")
    no_clip = {**patch4.signature, "optim": {"grad_clip": False}}
    with Checkpointer(str(tmp_path), signature=no_clip) as ckpt:
        with pytest.raises(ValueError, match=r"current config\): model.patch_size: 2 vs 4; "
                                             r"optim.grad_clip: True vs False\. Resume"):
            ckpt.restore(patch4.abstract)
    with Checkpointer(str(tmp_path)) as ckpt:  # without a signature, the shapes still differ
        with pytest.raises(ValueError, match=r"Shape mismatch at ema/input_conv/kernel: .* "
                           r"has shape \(3, 3, 12, 32\), the restore target has shape "
                           r"\(3, 3, 48, 32\)"):
            ckpt.restore(patch4.abstract)


#### Stop requests ####


def _wait_for(predicate, timeout_s=5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread
    return predicate()


def test_sigterm_inside_stop_request_sets_should_stop_and_exit_restores_the_handler():
    original = signal.getsignal(signal.SIGTERM)
    received = []

    def previous(signum, frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, previous)
    try:
        with StopRequest() as stop:
            handler = signal.getsignal(signal.SIGTERM)
            assert handler is not previous and handler != signal.SIG_DFL
            assert not stop.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)  # safe: StopRequest's handler is installed
            assert _wait_for(lambda: stop.should_stop(1))
            assert received == []  # StopRequest took it, not the previous handler
        assert signal.getsignal(signal.SIGTERM) is previous
        assert stop.should_stop(2)  # the request outlives the context
        os.kill(os.getpid(), signal.SIGTERM)  # after exit, the previous handler gets it again
        assert _wait_for(lambda: received == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, original)


def test_stop_request_request_stops_without_a_signal_and_a_default_handler_comes_back():
    original = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with StopRequest() as stop:
            assert [stop.should_stop(s) for s in range(3)] == [False] * 3  # no preemption service
            stop.request()
            assert stop.should_stop(3)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, original)
