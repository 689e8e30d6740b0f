"""The shipped export (pretrained/demo_long): it loads, validates and draws what its card says."""

import pathlib

import numpy as np
import pytest

from pdm_jax.inference import Pipeline

EXPORT = pathlib.Path(__file__).resolve().parents[1] / "pretrained" / "demo_long"


@pytest.mark.slow
def test_pretrained_demo_draws_yellow_faces_and_white_backgrounds():
    pipeline = Pipeline.load(str(EXPORT))  # checks every tensor against model.json
    assert (pipeline.step, pipeline.num_classes, pipeline.image_size) == (24_000, 6, 32)
    assert sum(f.stat().st_size for f in EXPORT.iterdir()) < 12 << 20
    # Class 0 is "faces" (pdm_emoji_demo/curated): yellow discs on white. Coarse sampler, so
    # the check is on colours, not detail: an untrained or mis-loaded model draws neither.
    images = pipeline.sample(8, labels=0, steps="25", seed=0).astype(np.float32)
    centre, corners = images[:, 12:20, 12:20], images[:, :3, :3]
    r, g, b = centre.reshape(-1, 3).mean(0)
    assert r > 180 and g > 150 and b < 110, (r, g, b)
    assert corners.mean() > 235
