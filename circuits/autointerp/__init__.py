"""Automatic interpretability of dictionary features (Paulo et al. 2024; Cunningham et al. 2023;
Bricken et al. 2023): a latent cache of activating windows, explainers, scorers and runners."""
