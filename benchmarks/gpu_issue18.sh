#!/usr/bin/env bash
# Issue 18, item 4, as one call on a lent GPU (H100 / H200; about 8 minutes of device time):
#   1. the ImageNet-256 P=4 expert's bf16 train step (analytic FLOPs, MFU) at batch 64, 128
#      and 256: is the 42% of 2026-11-27 (batch 64) a feeding problem that batch size fixes?
#   2. guided 250-step sampling images/s of the default two-expert recipe (configs/imagenet256.py,
#      P=1 low noise / P=4 high noise), bf16, batch 64.
# Prints one JSON document per measurement on stdout (tables on stderr); copy them into
# benchmarks/RESULTS.md with the card's name.
#
# The device image has jax, flax, optax, orbax, einops and absl, not ml-collections. Before the
# call, here:   pip download --no-deps --dest .whl ml-collections      (.whl/ is git-ignored)
# then run it with carry [".whl"] and the command:   bash benchmarks/gpu_issue18.sh
# SMOKE=1 runs the same steps with micro networks on any backend (seconds; used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ -d .whl ]] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --no-deps --no-index .whl/*.whl
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())" >&2

if [[ "${SMOKE:-0}" == 1 ]]; then
  batches=(2 4)
  cost_args=(--preset=micro --specs=4@16 --warmup=1 --iters=1)
  sampling_args=(--variants=project --image_size=16 --model_channels=16 --channel_mult=1
                 --num_res_blocks=1 --num_groups=8 --num_head_channels=16
                 --attention_resolutions= --batch=2 --time_steps=2 --iters=1)
else
  batches=(64 128 256)
  cost_args=(--preset=imagenet256 --patch_sizes=4 --dtype=bfloat16 --warmup=2 --iters=5)
  sampling_args=(--variants=project --batch=64 --dtype=bfloat16 --time_steps=4 --iters=3)
fi

for batch in "${batches[@]}"; do
  "$PYTHON" benchmarks/model_cost.py "${cost_args[@]}" --batch="$batch"
done
"$PYTHON" benchmarks/sampling_throughput.py "${sampling_args[@]}"
