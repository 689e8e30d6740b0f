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
  # pdm_jax on another jaxlib (another interpreter), PyTorch here; calls still alternate:
  python benchmarks/vs_pytorch.py --torch_repo=... --jax_python=/path/to/py312-venv/bin/python

Needs torch (requirements-dev.txt). Report only figures taken on an idle machine (the JSON
carries the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
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
    """Median seconds of each zero-argument callable, run round-robin ``iters`` times.

    A callable that returns a float is taken to have timed itself (``_JaxPeer``).
    """
    for fn in fns.values():  # warm-up (compiles, allocator growth)
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            time.sleep(_SETTLE_S)
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            # A call run in another process reports its own time (float), without the pipe.
            times[name].append(result if isinstance(result, float) else elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _jax_info() -> dict:
    """This process's JAX: version, device kind and XLA_FLAGS (pdm_jax's CPU options included)."""
    import pdm_jax  # noqa: F401  (its XLA:CPU options must precede JAX's CPU client)
    import jax

    return {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _jax_side(args: dict, state: dict, x: np.ndarray, t: np.ndarray,
              y: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """pdm_jax's half of a comparison: the U-Net with the given weights, jitted and warmed up.

    Args:
      args: the authors' create_model arguments (e.g. ``{**ARCHS[arch], **_COMMON}``).
      state: the authors' state_dict as numpy arrays.
      x, t, y: the inputs (x NHWC; y None without classes).

    Returns:
      The forward output (NHWC, every head concatenated) and zero-argument callables
      ``jax_forward`` and ``jax_forward_backward`` that block until done.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pdm_jax.models import torch_import
    from pdm_jax.models.unet import UNet

    config = torch_import.unet_config_from_torch_args(args)
    model = UNet(config, rngs=nnx.Rngs(0))
    torch_import.load_torch_state_dict(model, state)
    graphdef, params = nnx.split(model)
    x_j, t_j = jnp.asarray(x), jnp.asarray(t, jnp.int32)
    y_j = None if y is None else jnp.asarray(y, jnp.int32)

    def full(p, x, t, y):  # both heads, to compare with the torch output's channels
        out = nnx.merge(graphdef, p)(x, t, y)
        if isinstance(out, tuple):  # (mean, variance or None)
            out = jnp.concatenate([o for o in out if o is not None], axis=-1)
        return out

    forward = jax.jit(full)
    grad = jax.jit(jax.grad(lambda p, x, t, y: jnp.mean(jnp.square(full(p, x, t, y)))))
    out = np.asarray(forward(params, x_j, t_j, y_j))

    def timed(fn):
        def call():
            # A host array among the inputs would be copied to the device inside the timed call
            # (121 M float32 weights: ~0.2 s here); refuse instead of timing the copy.
            with jax.transfer_guard("disallow"):
                return jax.block_until_ready(fn(params, x_j, t_j, y_j))
        return call

    return out, {"jax_forward": timed(forward), "jax_forward_backward": timed(grad)}


class _JaxPeer:
    """pdm_jax's half run by another Python (``--jax_python``), driven one call at a time.

    For a jaxlib that cannot share an interpreter with torch (e.g. jax 0.12 needs Python 3.12,
    where this project installs no torch): each timed call is a request to the other process,
    so the two frameworks still alternate as they do in one process. The peer times its own
    calls, leaving the pipe's round trip out.
    """

    def __init__(self, python: str):
        self._python = python
        self._proc = subprocess.Popen([python, str(pathlib.Path(__file__).resolve()),
                                       "--serve_jax"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.info = self._ask({"cmd": "hello"})

    def _ask(self, message: dict) -> dict:
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"the pdm_jax process under {self._python} exited (code "
                               f"{self._proc.wait()}); its error is printed above")
        return json.loads(line)

    def load(self, args: dict, state: dict, x: np.ndarray, t: np.ndarray,
             y: np.ndarray | None, scratch: str) -> tuple[np.ndarray, dict]:
        """Builds the network in the peer; same contract as ``_jax_side``."""
        path = os.path.join(scratch, f"batch{len(x)}_{time.time_ns()}.npz")
        extra = {} if y is None else {"y": y}
        np.savez(path, x=x, t=t, **extra, **{f"state/{k}": v for k, v in state.items()})
        out = np.load(self._ask({"cmd": "load", "args": args, "npz": path})["out"])
        return out, {name: (lambda name=name: self._ask({"cmd": "call", "name": name})["seconds"])
                     for name in ("jax_forward", "jax_forward_backward")}

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()


def _serve_jax() -> None:
    """The peer's loop: one JSON request per stdin line, one JSON reply per line."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed (JAX, XLA) goes to stderr, not into the replies
    calls: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "hello":
            reply = _jax_info()
        elif request["cmd"] == "load":
            data = np.load(request["npz"])
            state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
            out, calls = _jax_side(request["args"], state, data["x"], data["t"],
                                   data["y"] if "y" in data.files else None)
            reply = {"out": request["npz"] + ".out.npy"}
            np.save(reply["out"], out)
        else:
            start = time.perf_counter()
            calls[request["name"]]()
            reply = {"seconds": time.perf_counter() - start}
        print(json.dumps(reply), file=replies, flush=True)


def compare(arch: str, batch: int, iters: int, torch_repo: str,
            peer: _JaxPeer | None = None, scratch: str = "") -> dict:
    """Times one architecture at one batch size in both frameworks.

    Args:
      arch: a key of ARCHS.
      batch: images per call.
      iters: timed calls per measurement (median reported).
      torch_repo: path of the authors' PyTorch code (holds patch_diffusion/).
      peer: runs pdm_jax's half in another Python (None: in this process).
      scratch: a folder for the arrays handed to ``peer``.

    Returns:
      Seconds per call for each framework and pass, pdm_jax / PyTorch ratios and the largest
      output difference.
    """
    import torch

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

    rng = np.random.default_rng(0)
    size = args["image_size"]
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, 1000, batch) if args["class_cond"] else None
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    t_t = torch.from_numpy(t)
    y_t = None if y is None else torch.from_numpy(y)
    if peer is None:
        ours, jax_calls = _jax_side(args, state, x, t, y)
    else:
        ours, jax_calls = peer.load(args, state, x, t, y, scratch)

    def torch_fwd():
        with torch.no_grad():
            return torch_model(x_t, t_t, y_t)

    def torch_grad():
        torch_model.zero_grad(set_to_none=True)
        torch.mean(torch.square(torch_model(x_t, t_t, y_t))).backward()

    theirs = torch_fwd().numpy().transpose(0, 2, 3, 1)
    max_diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    if max_diff > 1e-3 * max(scale, 1.0):
        raise AssertionError(f"{arch}: outputs differ by {max_diff} (scale {scale}); the timing "
                             f"would compare different networks.")
    times = _median_times({
        "torch_forward": torch_fwd,
        "jax_forward": jax_calls["jax_forward"],
        "torch_forward_backward": torch_grad,
        "jax_forward_backward": jax_calls["jax_forward_backward"],
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
    parser.add_argument("--jax_python", default="",
                        help="run pdm_jax under this Python instead (e.g. a Python 3.12 venv "
                             "with jax 0.12 and requirements.txt, where torch is not installed); "
                             "calls still alternate with PyTorch's")
    args = parser.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            parser.error(f"--archs: unknown architecture {a!r}; known: {sorted(ARCHS)}")
    if args.jax_python and not os.access(args.jax_python, os.X_OK):
        parser.error(f"--jax_python={args.jax_python!r} is not an executable Python")
    if not (pathlib.Path(args.torch_repo) / "patch_diffusion" / "unet.py").is_file():
        parser.error(f"--torch_repo={args.torch_repo!r} holds no patch_diffusion/unet.py (a "
                     f"clone of github.com/ericl122333/PatchDiffusion-Pytorch is expected)")

    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    peer = _JaxPeer(args.jax_python) if args.jax_python else None
    jax_info = _jax_info() if peer is None else {**peer.info, "jax_python": args.jax_python}
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in archs:
            batches = [args.demo_batch] if arch == "demo" else [int(b) for b in
                                                                args.batches.split(",")]
            for batch in batches:
                results.append(compare(arch, batch, args.iters, args.torch_repo, peer, scratch))
                print(json.dumps(results[-1]), file=sys.stderr)
    if peer is not None:
        peer.close()
    out = {**jax_info, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "results": results}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve_jax"]:  # the other end of --jax_python
        _serve_jax()
    else:
        main()
