"""Autointerp runners: one command per experiment, with CSV, PNG and markdown output.

    python -m circuits.runners.autointerp_bench --help    SAE features vs neurons vs PCA vs random
    python -m circuits.runners.layer_similarity --help    Hungarian matching across adjacent layers
"""
