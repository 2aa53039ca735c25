"""Steer generation with one SAE feature: pick the feature most specific to a word, add it to the
residual stream at every position while generating, and compare with the unsteered text.

    python examples/steer_generation.py --site resid.6 --word " dog" --prompt "My favourite thing is"
"""
import argparse

import torch

from interventions import run_spliced, steer_generate
from interventions.runners import get_saes, load_corpus_for
from sae import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--site", default="resid.6")
parser.add_argument("--word", default=" dog", help="pick the feature most specific to this word")
parser.add_argument("--context", default="I took my dog to the park. The dog ran after a ball, and my dog was happy.")
parser.add_argument("--prompt", default="My favourite thing is")
parser.add_argument("--scale", type=float, default=4.0, help="alpha = scale x the feature's activation on the word")
parser.add_argument("--new-tokens", type=int, default=20)
parser.add_argument("--sae-tokens", type=int, default=16_384, help="SAE training budget if none is cached")
parser.add_argument("--sae-dir", default=None, help="train_at_sites run directory (default: the cache)")
args = parser.parse_args()

model = load_model()
corpus = load_corpus_for(model, args.sae_tokens)
saes, source = get_saes(model, [args.site], corpus=corpus, sae_tokens=args.sae_tokens, directory=args.sae_dir,
                        progress=False)
sae = {args.site: saes[args.site]}
print(f"SAE at {args.site}: {saes[args.site]} ({source})")

# Codes on the context; the word's positions are where its (single) token occurs.
word_ids = model.tokenizer(args.word, add_special_tokens=False)["input_ids"]
if len(word_ids) != 1:
    raise SystemExit(f"--word {args.word!r} is {len(word_ids)} tokens; pick a word that is one token")
ids = model.tokenize(args.context)["input_ids"]
at_word = ids[0] == word_ids[0]
if not at_word.any():
    raise SystemExit(f"--word {args.word!r} does not occur in --context")
codes = run_spliced(model, sae, ids, logits=False).codes[args.site][0]                  # [pos, n_latents]
# Specific to the word: high on it, relative to the feature's mean over ordinary corpus text.
background = run_spliced(model, sae, corpus.heldout[:4, :64], logits=False).codes[args.site][:, 1:].mean((0, 1))
on_word = codes[at_word].mean(0)
feature = int((on_word - background).argmax())
alpha = args.scale * float(on_word[feature])
print(f"feature {feature}: mean code {on_word[feature]:.2f} on {args.word!r}, {background[feature]:.3f} on "
      f"corpus text; steering with alpha = {alpha:.2f}")

prompt = model.tokenize(args.prompt)["input_ids"]
for a in (0.0, alpha):
    out = steer_generate(model, sae, prompt, {args.site: [feature]}, alpha=a, max_new_tokens=args.new_tokens)
    text = model.tokenizer.decode(out[0, prompt.shape[1]:])
    print(f"alpha = {a:6.2f}: {args.prompt!r} + {text!r}")
with torch.no_grad():
    plain = model.hf.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
print(f"(plain greedy generation, for reference: {model.tokenizer.decode(plain[0, prompt.shape[1]:])!r})")
