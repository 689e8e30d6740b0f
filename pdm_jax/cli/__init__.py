"""Standalone commands, each owning its absl flags: ``python -m pdm_jax.cli.<name>``.

evaluate (ADM's evaluator on two .npz files), sample_export (sample an export),
import_torch (the authors' PyTorch checkpoints -> an export), convert_inception (TF-FID
Inception weights -> pdm_jax's weight file).
"""
