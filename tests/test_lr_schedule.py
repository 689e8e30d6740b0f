"""The learning-rate schedule: warmup then constant (as released) or cosine decay."""

import ml_collections
import numpy as np
import pytest

from conftest import demo_config
from pdm_jax import config_lib, config_validation
from pdm_jax.training import state as state_lib


def _optim(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(config_lib.base_config().optim.to_dict(), **overrides))


def test_constant_schedule_warms_up_linearly_then_holds():
    schedule = state_lib.learning_rate_schedule(_optim(lr=1e-3, warmup_steps=10))
    values = [float(schedule(s)) for s in (0, 5, 10, 1_000_000)]
    np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_cosine_schedule_decays_from_lr_to_final_lr_at_decay_steps():
    optim = _optim(lr=2e-3, warmup_steps=100, schedule="cosine", decay_steps=1100, final_lr=1e-4)
    schedule = state_lib.learning_rate_schedule(optim)
    # Warmup end = lr; halfway through the decay = the mean of lr and final_lr; the end and
    # beyond = final_lr.
    values = [float(schedule(s)) for s in (50, 100, 600, 1100, 5000)]
    np.testing.assert_allclose(values, [1e-3, 2e-3, 1.05e-3, 1e-4, 1e-4], rtol=1e-5)
    steps = np.arange(100, 1101)
    assert np.all(np.diff([float(v) for v in schedule(steps)]) <= 0)


@pytest.mark.parametrize("overrides, message", [
    (dict(schedule="linear"), "Unknown optim.schedule 'linear'"),
    (dict(schedule="cosine", warmup_steps=100, decay_steps=0), "optim.decay_steps > "),
    (dict(schedule="cosine", warmup_steps=0, decay_steps=10, lr=1e-3, final_lr=2e-3),
     "optim.final_lr=0.002"),
])
def test_bad_schedule_settings_are_refused_by_config_validation(overrides, message):
    config = demo_config("smoke")
    config.optim.update(overrides)
    with pytest.raises(ValueError, match=message):
        config_validation.validate(config, "train")


def test_model_card_names_the_schedule():
    from pdm_jax import export_format

    config = demo_config("long=True")
    config.optim.update(schedule="cosine", decay_steps=24_000, final_lr=0.0)
    meta = {"num_classes": 6, "step": 24_000, "dtype": "bfloat16", "config_hash": "0" * 16,
            "source": {}, "experts": []}
    card = export_format.model_card(meta, config, "")
    assert "Adam lr 0.002 (warmup 100, cosine decay to 0 at step 24000)" in card, card
    config.optim.schedule = "constant"
    assert "Adam lr 0.002 (warmup 100), EMA" in export_format.model_card(meta, config, "")
