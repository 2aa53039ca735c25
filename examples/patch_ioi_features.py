"""Patch SAE features from clean IOI prompts into their counterfactuals and watch the logit
difference logit(IO) - logit(S) come back (Cunningham et al. 2023's sub-rank-one patch).

    python examples/patch_ioi_features.py --site resid.6 --n-prompts 8
"""
import argparse

import torch

from interventions import patch_features
from interventions.runners import get_saes, load_corpus_for
from interventions.runners.ioi_patching import candidate_features
from interventions.tasks import logit_diff, make_ioi
from sae import load_model
from sae.harvesting import trace_sites

parser = argparse.ArgumentParser()
parser.add_argument("--site", default="resid.6")
parser.add_argument("--n-prompts", type=int, default=8)
parser.add_argument("--max-features", type=int, default=32, help="largest feature set patched")
parser.add_argument("--sae-tokens", type=int, default=16_384, help="SAE training budget if none is cached")
parser.add_argument("--sae-dir", default=None, help="train_at_sites run directory (default: the cache)")
args = parser.parse_args()

model = load_model()
# The README main job's SAEs when cached, else a small TopK SAE trained now (cached for next time).
saes, source = get_saes(model, [args.site], corpus=load_corpus_for(model, args.sae_tokens),
                        sae_tokens=args.sae_tokens, directory=args.sae_dir, progress=False)
sae = saes[args.site]
print(f"SAE at {args.site}: {sae} ({source})")

# Clean: "When Mary and John ..., John gave a drink to" -> " Mary". Counterfactual: Mary -> a third name.
ds = make_ioi(model.tokenizer, args.n_prompts, counterfactual="replace_io")
print(f"clean:          {ds.texts[0]!r}\ncounterfactual: {ds.cf_texts[0]!r}")
with torch.no_grad():
    clean_ld = logit_diff(model.hf(input_ids=ds.input_ids).logits, ds).mean().item()
    cf_ld = logit_diff(model.hf(input_ids=ds.cf_input_ids).logits, ds).mean().item()
print(f"mean logit(IO) - logit(S): clean {clean_ld:.2f}, counterfactual {cf_ld:.2f}")

# Rank features by how much of the clean-vs-counterfactual activation difference they carry.
acts = trace_sites(model, torch.cat([ds.cf_input_ids, ds.input_ids]), None, [model.site(args.site)])[args.site]
ranked = candidate_features(sae, acts[:len(ds)], acts[len(ds):], args.max_features)
print(f"top features by |c_clean - c_cf| * ||f||: {ranked[:10].tolist()}")

# Run the counterfactual prompts with the clean codes of the top-k features (error term kept).
print(f"{'features':>8} {'logit diff':>10} {'restored':>9} {'edit L2':>8}")
k = 0
while True:
    run = patch_features(model, {args.site: sae}, ds.cf_input_ids, ds.input_ids, {args.site: ranked[:k].tolist()})
    ld = logit_diff(run.logits, ds).mean().item()
    print(f"{k:>8} {ld:>10.2f} {(ld - cf_ld) / (clean_ld - cf_ld):>9.2f} {run.edit_norm(args.site).mean():>8.2f}")
    if k >= len(ranked):
        break
    k = min(len(ranked), max(1, 2 * k))
