"""Training building blocks: per-expert state and setup, the pure train step, preemption and
workdir leases. The loop itself is the train job (pdm_jax/jobs/train.py)."""
