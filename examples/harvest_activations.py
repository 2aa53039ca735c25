"""Harvest activations at a few sites of the embedded corpus and summarise them.

    python examples/harvest_activations.py --tokens 4096 --sites resid.6 mlp_hidden.6 --store /tmp/acts
"""
import argparse

from sae import harvest, harvest_to_store, load_corpus, load_model
from sae.stats import activation_stats

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=4096)
parser.add_argument("--sites", nargs="+", default=["resid.6", "mlp_hidden.6"])
parser.add_argument("--store", default=None, help="also write a resumable on-disk store here")
args = parser.parse_args()

model = load_model()                       # SmolLM2-135M-Instruct, offline
print(model, "- a few sites:", list(model.sites)[:6])
corpus = load_corpus(None, model.tokenizer, ctx_len=128, max_tokens=args.tokens)

# Stream {site: [n_tokens, width]} batches; the forward stops after the deepest site.
print(activation_stats(harvest(model, corpus, args.sites, batch_size=8)))

if args.store:
    store = harvest_to_store(model, corpus, args.sites, args.store, contexts_per_shard=16)
    batch = next(store.iter_batches(args.sites[0], batch_size=256, shuffle=True))
    print(store, "-> one shuffled training batch:", tuple(batch.shape))
