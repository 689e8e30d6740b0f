"""One job per ``--mode`` of ``python -m pdm_jax.main``, each a linear ``run(config, workdir)``.

train (the training loop over the experts), sample, eval (module ``evaluate``), ref_stats,
export, analyze, summary, prepare_data. Jobs read flags never: main.py parses them and passes the config.
"""
