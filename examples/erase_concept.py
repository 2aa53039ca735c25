"""Erase gender at one site (LEACE, and ablating the top SAE features for it) and measure what is
left: pronoun accuracy, a linear probe against chance, the edit size and the damage on neutral text.

    python examples/erase_concept.py --site resid.9 --k 8 --n-prompts 64
"""
import argparse

import torch

from interventions import erase
from interventions.erasure import collateral, edited_positions, fit_probe
from interventions.runners import get_saes, load_corpus_for
from interventions.runners.erasure_bench import token_labels
from interventions.tasks import accuracy, make_pronouns, two_way_probability
from sae import load_model
from sae.harvesting import trace_sites

parser = argparse.ArgumentParser()
parser.add_argument("--site", default="resid.9")
parser.add_argument("--k", type=int, default=8, help="SAE features ablated")
parser.add_argument("--n-prompts", type=int, default=64, help="pronoun prompts, half held out (by name)")
parser.add_argument("--neutral-tokens", type=int, default=256, help="corpus tokens for the collateral KL")
parser.add_argument("--sae-tokens", type=int, default=16_384, help="SAE training budget if none is cached")
parser.add_argument("--sae-dir", default=None, help="train_at_sites run directory (default: the cache)")
args = parser.parse_args()

model = load_model()
corpus = load_corpus_for(model, args.sae_tokens)
saes, source = get_saes(model, [args.site], corpus=corpus, sae_tokens=args.sae_tokens, directory=args.sae_dir,
                        progress=False)
print(f"SAE at {args.site}: {saes[args.site]} ({source})")
site = args.site
ds = make_pronouns(model.tokenizer, args.n_prompts, heldout_fraction=0.5)   # "When Mary woke up," -> " she"
train, held = ds.split("train"), ds.split("heldout")
z_train, z_held = token_labels(train, "name"), token_labels(held, "name")  # gender at the name token, else -1
neutral = corpus.heldout[:, :64].reshape(-1)[:args.neutral_tokens].reshape(-1, 64)

# Fit on train names; LEACE edits the activation, the SAE erasure zeroes the k most gender-specific features.
erasures = {"LEACE": erase(model, None, site, train.input_ids, z_train, method="leace"),
            f"SAE top-{args.k}": erase(model, saes, site, train.input_ids, z_train, method="features", k=args.k,
                                       ablation="zero")}
acts = lambda ids: trace_sites(model, ids, None, [model.site(site)])[site]  # noqa: E731  [batch, pos, d]
probe = fit_probe(acts(train.input_ids)[z_train >= 0], z_train[z_train >= 0])
y = z_held[z_held >= 0]
chance = float(torch.bincount(y).max() / len(y))
with torch.no_grad():
    clean = model.hf(input_ids=held.input_ids).logits
    clean_neutral = model.hf(input_ids=neutral).logits
print(f"\n{'':12} {'accuracy':>8} {'two-way p':>9} {'probe acc':>9} {'edit L2':>8} {'KL neutral':>10}")
print(f"{'no edit':12} {accuracy(clean, held):8.3f} {two_way_probability(clean, held).mean():9.3f} "
      f"{probe.accuracy(acts(held.input_ids)[z_held >= 0], y):9.3f} {0:8.2f} {0:10.4f}")
for name, e in erasures.items():
    # Edit every position but 0 (before the name; SmolLM2's attention sink, ~100x the others' norm).
    run = e.run(model, held.input_ids, positions=edited_positions(held.input_ids))
    kl = collateral(clean_neutral, e.run(model, neutral, positions=edited_positions(neutral)).logits, neutral)
    print(f"{name:12} {accuracy(run.logits, held):8.3f} {two_way_probability(run.logits, held).mean():9.3f} "
          f"{probe.accuracy(run.outputs[site][z_held >= 0], y):9.3f} "
          f"{run.edit_norm(site)[:, 1:].mean():8.2f} {kl['kl_unrelated']:10.4f}")
print(f"(probe chance = {chance:.3f}; edit L2 = mean ||x' - x|| over edited tokens of the held-out prompts)")
