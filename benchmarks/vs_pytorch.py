"""pdm_jax's U-Net against the authors' PyTorch U-Net on this machine, same weights. Prints JSON.

Builds the authors' network from a local clone of their code (github.com/ericl122333/
PatchDiffusion-Pytorch; nothing is downloaded), imports its random-initialised weights into
pdm_jax (pdm_jax.models.torch_import, the path released checkpoints take), checks that both
give the same output, then times forward and forward + backward (gradient of mean(out^2) with
respect to every parameter) of both in one process, alternating the two so that any change in
the machine's load hits both alike. float32 on both sides; PyTorch with as many threads as
JAX's CPU client uses (every core).

  python benchmarks/vs_pytorch.py --torch_repo=$HOME/PatchDiffusion-Pytorch \
      --archs=lsun_p4,demo --batches=1,4 --iters=3

Needs torch (requirements-dev.txt). Report only figures taken on an idle machine (the JSON
carries the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_COMMON = dict(num_head_channels=64, use_scale_shift_norm=True, use_new_attention_order=True,
               dropout=0.0, resblock_updown=False, use_fp16=False)
# Constructor arguments of the authors' create_model (attention at patched resolutions).
ARCHS = {
    # Released LSUN Church architectures (SPEC section 3), 121.4 M and 122.9 M parameters.
    "lsun_p4": dict(image_size=256, num_channels=256, num_res_blocks=2, patch_size=4,
                    channel_mult="1,1,2,2", attention_resolutions="16,8", class_cond=False,
                    learn_sigma=True),
    "lsun_p2": dict(image_size=256, num_channels=128, num_res_blocks=2, patch_size=2,
                    channel_mult="1,2,2,4,4", attention_resolutions="16,8", class_cond=False,
                    learn_sigma=True),
    # The demo's U-Net at 64x64 (P=4: a 16x16 token grid), class-conditional.
    "demo": dict(image_size=64, num_channels=64, num_res_blocks=1, patch_size=4,
                 channel_mult="1,2,2", attention_resolutions="8,4", class_cond=True,
                 learn_sigma=False),
}


# Pause before each timed call: both frameworks' worker threads spin-wait for a while after a
# call, and without the pause they steal the cores from the other framework's next call.
_SETTLE_S = 0.5


def _median_times(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run round-robin ``iters`` times."""
    for fn in fns.values():  # warm-up (compiles, allocator growth)
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            time.sleep(_SETTLE_S)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare(arch: str, batch: int, iters: int, torch_repo: str) -> dict:
    """Times one architecture at one batch size in both frameworks.

    Args:
      arch: a key of ARCHS.
      batch: images per call.
      iters: timed calls per measurement (median reported).
      torch_repo: path of the authors' PyTorch code (holds patch_diffusion/).

    Returns:
      Seconds per call for each framework and pass, pdm_jax / PyTorch ratios and the largest
      output difference.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from pdm_jax.models import torch_import
    from pdm_jax.models.unet import UNet

    sys.path.insert(0, torch_repo)
    from patch_diffusion import script_util  # the authors' code, from the user's clone

    args = {**ARCHS[arch], **_COMMON}
    torch.manual_seed(0)
    torch_model = script_util.create_model(**args).float()
    # The authors zero-initialise output layers: perturb every weight of their init so outputs
    # and gradients are non-trivial and the parity check means something. (Replacing the init
    # outright, e.g. norm scales ~ N(0, 0.02), shrinks activations layer by layer into float32
    # denormals, which slow XLA:CPU down by 30% and measure nothing a real network does.)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    config = torch_import.unet_config_from_torch_args(args)
    model = UNet(config, rngs=nnx.Rngs(0))
    torch_import.load_torch_state_dict(model, state)
    graphdef, params = nnx.split(model)

    rng = np.random.default_rng(0)
    size = args["image_size"]
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, 1000, batch) if args["class_cond"] else None
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    t_t = torch.from_numpy(t)
    y_t = None if y is None else torch.from_numpy(y)
    x_j, t_j = jnp.asarray(x), jnp.asarray(t, jnp.int32)
    y_j = None if y is None else jnp.asarray(y, jnp.int32)

    def jax_full(p, x, t, y):  # both heads, to compare with the torch output's channels
        out = nnx.merge(graphdef, p)(x, t, y)
        if isinstance(out, tuple):  # (mean, variance or None)
            out = jnp.concatenate([o for o in out if o is not None], axis=-1)
        return out

    jax_fwd = jax.jit(jax_full)
    jax_grad = jax.jit(jax.grad(lambda p, x, t, y: jnp.mean(jnp.square(jax_full(p, x, t, y)))))

    def torch_fwd():
        with torch.no_grad():
            return torch_model(x_t, t_t, y_t)

    def torch_grad():
        torch_model.zero_grad(set_to_none=True)
        torch.mean(torch.square(torch_model(x_t, t_t, y_t))).backward()

    ours = np.asarray(jax_fwd(params, x_j, t_j, y_j))
    theirs = torch_fwd().numpy().transpose(0, 2, 3, 1)
    max_diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    if max_diff > 1e-3 * max(scale, 1.0):
        raise AssertionError(f"{arch}: outputs differ by {max_diff} (scale {scale}); the timing "
                             f"would compare different networks.")
    times = _median_times({
        "torch_forward": torch_fwd,
        "jax_forward": lambda: jax.block_until_ready(jax_fwd(params, x_j, t_j, y_j)),
        "torch_forward_backward": torch_grad,
        "jax_forward_backward": lambda: jax.block_until_ready(
            jax_grad(params, x_j, t_j, y_j)),
    }, iters)
    return {"arch": arch, "batch": batch,
            "params_m": sum(p.numel() for p in torch_model.parameters()) / 1e6,
            "max_abs_output_diff": max_diff, "output_scale": scale,
            "seconds": times,
            "jax_over_torch": {
                "forward": times["jax_forward"] / times["torch_forward"],
                "forward_backward": times["jax_forward_backward"]
                / times["torch_forward_backward"]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_repo", required=True,
                        help="local clone of the authors' PatchDiffusion-Pytorch")
    parser.add_argument("--archs", default="lsun_p4,demo",
                        help=f"comma list of {sorted(ARCHS)}")
    parser.add_argument("--batches", default="1,4", help="comma list; applied to every arch")
    parser.add_argument("--demo_batch", type=int, default=16, help="the demo arch's batch")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--archs: unknown architecture {a!r}; known: {sorted(ARCHS)}")
    if not (pathlib.Path(args.torch_repo) / "patch_diffusion" / "unet.py").is_file():
        parser.error(f"--torch_repo={args.torch_repo!r} holds no patch_diffusion/unet.py (a "
                     f"clone of github.com/ericl122333/PatchDiffusion-Pytorch is expected)")

    import jax
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()
    results = []
    for arch in archs:
        batches = [args.demo_batch] if arch == "demo" else [int(b) for b in
                                                            args.batches.split(",")]
        for batch in batches:
            results.append(compare(arch, batch, args.iters, args.torch_repo))
            print(json.dumps(results[-1]), file=sys.stderr)
    out = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "jax": jax.__version__,
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "results": results}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
