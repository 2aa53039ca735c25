"""Behavioural tasks for interventions: prompt datasets with word positions, and their metrics.

- IOI (Wang et al. 2022, arXiv 2211.00593): `make_ioi` -> `IOIDataset` of ABBA/BABA prompts with
  token-aligned counterfactuals (ABC, replace_io, replace_s2), as used for feature patching by
  Cunningham et al. 2023 (arXiv 2309.08600).
- Gendered pronouns (Cunningham et al. 2023's erasure task): `make_pronouns` -> `PronounDataset`
  of balanced " he"/" she" prompts, split into train / held-out by name.

Every dataset's prompts tokenize to one length with words at fixed positions (words that are
not single tokens are skipped and counted), so `dataset.input_ids` is a batch and the metrics
below index it directly:

    logits = model.hf(input_ids=ds.input_ids).logits      # [batch, pos, vocab]
    logit_diff(logits, ds)        # [batch]: IOI logit(IO) - logit(S); pronouns signed he - she
    accuracy(logits, ds)          # fraction with logit_diff > 0
    two_way_probability(logits, ds)   # sigmoid(logit_diff): Cunningham et al.'s "Prediction Ability"
    kl_to_target(logits, target_logits, ds.end_pos)   # [batch]
"""
from .common import accuracy, kl_to_target, logit_diff, two_way_probability
from .ioi import IOIDataset, IOIPrompt, make_ioi
from .pronouns import PronounDataset, PronounPrompt, make_pronouns

__all__ = [
    "IOIDataset", "IOIPrompt", "make_ioi",
    "PronounDataset", "PronounPrompt", "make_pronouns",
    "logit_diff", "accuracy", "two_way_probability", "kl_to_target",
]
