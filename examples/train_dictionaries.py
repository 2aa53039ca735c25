"""Train TopK dictionaries at sites you pick, compare them with PCA and neuron-basis baselines on
the same evaluation, and round-trip one through the SAELens checkpoint format.

    python examples/train_dictionaries.py --sites resid.6 mlp_hidden.6 --tokens 65536
"""
import argparse
import tempfile

import pandas as pd
import torch

from sae import evaluate, fit_baseline, harvest, load_any, load_corpus, load_model
from sae.formats import save_saelens
from sae.pipeline import train_at_sites
from sae.training import TrainConfig

parser = argparse.ArgumentParser()
parser.add_argument("--sites", nargs="+", default=["resid.6", "mlp_hidden.6"])
parser.add_argument("--tokens", type=int, default=65_536, help="training tokens per site")
parser.add_argument("--k", type=int, default=32)
parser.add_argument("--eval-tokens", type=int, default=2048)
parser.add_argument("--out", default=None, help="run directory (reused when rerun with the same settings)")
args = parser.parse_args()

model = load_model()
corpus = load_corpus(None, model.tokenizer, ctx_len=128, max_tokens=args.tokens + 4 * args.eval_tokens,
                     heldout_fraction=0.2)
out = args.out or tempfile.mkdtemp(prefix="sae-run-")

# 1. TopK SAEs (Gao et al. 2024) at every chosen site, from one harvest pass.
cfg = TrainConfig(total_tokens=args.tokens, batch_size=1024, calibration_tokens=4096, progress=False)
saes = train_at_sites(model, corpus.train, args.sites, k=args.k, expansion=4, cfg=cfg, directory=out)

# 2. Baselines fitted on harvested activations, under the same interface: PCA with k components
#    (the same number of active codes per token as TopK) and the neuron basis (exact, L0 = d).
sample = {s: torch.cat([b[s] for b in harvest(model, corpus.train[:32], args.sites, progress=False)])
          for s in args.sites}
families = {"topk": saes,
            "pca": {s: fit_baseline("pca", x, n_latents=args.k) for s, x in sample.items()},
            "neurons": {s: fit_baseline("identity", x) for s, x in sample.items()}}
tables = [evaluate(model, dicts, corpus, tokens=args.eval_tokens, ce_tokens=256, progress=False).assign(family=name)
          for name, dicts in families.items()]
table = pd.concat(tables).reset_index().set_index(["site", "family"]).sort_index()
print(table[["n_latents", "l0", "fvu", "ce_recovered", "kl"]].to_string(float_format="{:.3f}".format))

# 3. SAELens interop: write the first SAE as a SAELens checkpoint and load it back.
site = args.sites[0]
path = save_saelens(saes[site], f"{out}/saelens-{site}", hook_name=site)
again = load_any(path)
x = sample[site][:64]
print(f"SAELens round trip of {site}: max |x_hat difference| = {(again(x) - saes[site](x)).abs().max():.2e}")
