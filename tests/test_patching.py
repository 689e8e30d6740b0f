"""Patch layout (SPEC section 2): TF space_to_depth order, exact inverse, not PyTorch's order."""

import numpy as np
import pytest

from pdm_jax.models.patching import patchify, torch_to_tf_channel_permutation, unpatchify


def space_to_depth_reference(x: np.ndarray, p: int) -> np.ndarray:
    """Loop-based numpy space_to_depth: channel k = (i*P + j)*C + c."""
    b, h, w, c = x.shape
    out = np.zeros((b, h // p, w // p, p * p * c), x.dtype)
    for i in range(p):
        for j in range(p):
            for ch in range(c):
                out[..., (i * p + j) * c + ch] = x[:, i::p, j::p, ch]
    return out


def pixel_unshuffle_order(x: np.ndarray, p: int) -> np.ndarray:
    """PyTorch pixel_unshuffle order (c p1 p2), in NHWC."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(
        b, h // p, w // p, c * p * p)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_patchify_equals_space_to_depth(p):
    x = np.random.default_rng(p).normal(size=(2, 16, 24, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(patchify(x, p)), space_to_depth_reference(x, p))


@pytest.mark.parametrize("p", [1, 2, 4])
def test_unpatchify_inverts_patchify(p):
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(x, p), p)), x)


def test_patch_size_one_is_identity():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    assert patchify(x, 1) is x and unpatchify(x, 1) is x


def test_layout_differs_from_pixel_unshuffle_and_permutation_maps_it():
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 3)).astype(np.float32)
    ours, torch_order = np.asarray(patchify(x, 4)), pixel_unshuffle_order(x, 4)
    assert not np.array_equal(ours, torch_order)
    np.testing.assert_array_equal(ours, torch_order[..., torch_to_tf_channel_permutation(4, 3)])


def test_patch_size_that_does_not_divide_raises():
    with pytest.raises(ValueError, match="patch_size=3 does not divide image_size=16"):
        patchify(np.zeros((1, 16, 16, 3), np.float32), 3)
