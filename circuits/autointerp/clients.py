"""Language-model clients for explainers and scorers: a local `transformers` model and an
OpenAI-compatible HTTP server, behind one small interface.

Every client offers

    generate(messages, *, max_tokens, temperature=0.0) -> str
        a chat completion (greedy at temperature 0)
    next_token_logprobs(messages, candidates) -> {candidate: log P(candidate | chat prompt)}
        the answer's first token(s) after the assistant turn opens (detection, fuzzing)
    prompt_logprobs(text, *, candidates=None) -> [TokenLogprob]
        log P(t_i | t_<i) for every token of a raw text, and optionally, at every position, the
        log-probability of each single-token candidate as the next token (simulation, surprisal,
        intervention scoring)

plus `*_batch` variants taking lists (the local client batches forward passes; the HTTP client
loops). `LocalClient` is exact: candidate log-probabilities come from the full softmax, and a
candidate spanning several tokens is scored by teacher forcing, log P(c) = Σ_j log P(c_j | c_<j).
`OpenAIClient` reads the server's `logprobs` / `top_logprobs`; a candidate the server did not list
among the top alternatives gets log P = -inf, and tokens that differ from a candidate only in
case or surrounding whitespace ("Yes", " yes") count for it (their probabilities summed). Servers
differ in how they align echoed prompt log-probabilities: `echo_alignment="next"` reads
llama-cpp-python's (its prompt log P values are shifted by one position; checked here against
the local model on the same weights).
"""
from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

Messages = list[dict]


@dataclass
class TokenLogprob:
    """One token of a scored text."""

    token: str                      # the token's text
    offset: int                     # character offset of the token in the text
    logprob: float                  # log P(token | previous tokens); nan for the first token
    candidates: dict[str, float] = field(default_factory=dict)  # log P(candidate next | up to this token)


class ClientError(RuntimeError):
    """A server that could not be reached or answered nonsense, after all retries."""


def _check_messages(messages: Messages) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                         f"got {messages!r:.200}")


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    if isinstance(candidates, str) or not candidates or not all(isinstance(c, str) and c for c in candidates):
        raise ValueError(f"candidates must be a non-empty list of non-empty strings, got {candidates!r}")
    return list(candidates)


class _Usage:
    """Token counts for throughput measurements (prompt tokens read, completion tokens written)."""

    def __init__(self):
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def _count(self, prompt: int, completion: int) -> None:
        self.usage["prompt_tokens"] += int(prompt)
        self.usage["completion_tokens"] += int(completion)


# --- local transformers model -----------------------------------------------------------------

class LocalClient(_Usage):
    """A `transformers` causal LM run in-process. `model`: an `sae.Model` (default: the embedded
    SmolLM2-135M-Instruct from `sae.load_model()`) or a bare `transformers` model with `tokenizer`.
    Chat prompts use the tokenizer's chat template; generation is greedy at temperature 0."""

    def __init__(self, model: Any = None, tokenizer: Any = None, *, batch_size: int = 8,
                 max_length: int | None = None):
        super().__init__()
        if model is None:
            from sae import load_model

            model = load_model()
        hf = getattr(model, "hf", model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("pass tokenizer=... with a bare transformers model")
        if not isinstance(hf, torch.nn.Module):
            raise TypeError(f"model must be an sae.Model or a transformers model, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.hf = hf.eval()
        self.batch_size = int(batch_size)
        cfg_len = getattr(hf.config, "max_position_embeddings", None)
        self.max_length = int(max_length or cfg_len or 2048)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def chat_text(self, messages: Messages) -> str:
        """The chat-templated prompt, ending where the assistant's answer starts."""
        _check_messages(messages)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # no template (e.g. tiny test tokenizers): a plain transcript
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's {self.max_length}; "
                             "show fewer or shorter examples")
        return ids

    @torch.no_grad()
    def _forward(self, seqs: list[list[int]], *, last_only: bool = False) -> list[torch.Tensor]:
        """log-softmax [len_i, vocab] for each token sequence, in right-padded batches; with
        `last_only`, [1, vocab] at each sequence's last position (the unembedding and softmax
        run only at the chunk's distinct last positions)."""
        out: list[torch.Tensor] = []
        for lo in range(0, len(seqs), self.batch_size):
            chunk = seqs[lo:lo + self.batch_size]
            n = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), n), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            if last_only:
                keep = sorted({len(s) - 1 for s in chunk})
                logits = self.hf(**kwargs, logits_to_keep=torch.tensor(keep, device=self.device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # [b, len(keep), vocab]
                out.extend(logp[i, keep.index(len(s) - 1)][None] for i, s in enumerate(chunk))
            else:
                logp = torch.log_softmax(self.hf(**kwargs).logits.float(), dim=-1).cpu()  # [b, n, vocab]
                out.extend(logp[i, :len(s)] for i, s in enumerate(chunk))
            self._count(int(mask.sum()), 0)
        return out

    @torch.no_grad()
    def generate(self, messages: Messages, *, max_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> str:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = torch.tensor([self._encode(self.chat_text(messages))], device=self.device)
        kwargs: dict[str, Any] = dict(do_sample=False)
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_tokens),
                               pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[:new.index(eos)]
        self._count(ids.shape[1], len(new))
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def next_token_logprobs(self, messages: Messages, candidates: Sequence[str]) -> dict[str, float]:
        return self.next_token_logprobs_batch([messages], candidates)[0]

    def next_token_logprobs_batch(self, batch: Sequence[Messages], candidates: Sequence[str]
                                  ) -> list[dict[str, float]]:
        """Exact log P(candidate | prompt) per prompt, by teacher forcing each candidate's tokens."""
        cands = _check_candidates(candidates)
        cand_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in cands]
        prompts = [self._encode(self.chat_text(m)) for m in batch]
        single = all(len(c) == 1 for c in cand_ids)
        if single:  # one forward per prompt: read the candidates off the last position
            return [{c: float(lp[-1, ci[0]]) for c, ci in zip(cands, cand_ids)}
                    for lp in self._forward(prompts, last_only=True)]
        seqs = [p + ci for p in prompts for ci in cand_ids]
        logps = self._forward(seqs)
        out = []
        for i, p in enumerate(prompts):
            row = {}
            for j, (c, ci) in enumerate(zip(cands, cand_ids)):
                lp = logps[i * len(cands) + j]
                row[c] = float(sum(lp[len(p) - 1 + k, t] for k, t in enumerate(ci)))
            out.append(row)
        return out

    def prompt_logprobs(self, text: str, *, candidates: Sequence[str] | None = None) -> list[TokenLogprob]:
        return self.prompt_logprobs_batch([text], candidates=candidates)[0]

    def prompt_logprobs_batch(self, texts: Sequence[str], *, candidates: Sequence[str] | None = None
                              ) -> list[list[TokenLogprob]]:
        """Per-token log-probabilities of raw texts (no chat template, no special tokens added).
        `candidates` that are single tokens get their exact next-token log P at every position;
        multi-token candidates are left out (they cannot be read off one position)."""
        cand = {}
        for c in _check_candidates(candidates) if candidates else []:
            ci = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if len(ci) == 1:
                cand[c] = ci[0]
        encs = [self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        for e in encs:
            if len(e["input_ids"]) > self.max_length:
                raise ValueError(f"text of {len(e['input_ids'])} tokens exceeds the model's {self.max_length}")
        logps = self._forward([e["input_ids"] for e in encs])
        out = []
        for e, lp in zip(encs, logps):
            ids = e["input_ids"]
            rows = []
            for i, t in enumerate(ids):
                rows.append(TokenLogprob(
                    token=self.tokenizer.decode([t]), offset=int(e["offset_mapping"][i][0]),
                    logprob=float(lp[i - 1, t]) if i > 0 else math.nan,
                    candidates={c: float(lp[i, j]) for c, j in cand.items()}))
            out.append(rows)
        return out


# --- OpenAI-compatible HTTP server ------------------------------------------------------------

def _norm(token: str) -> str:
    return token.strip().lower()


def _merge_top(top: Any, candidates: Sequence[str]) -> dict[str, float]:
    """{candidate: log Σ p} over listed alternatives whose text matches it up to case/whitespace."""
    if isinstance(top, list):  # chat format: [{"token": .., "logprob": ..}, ...]
        pairs = [(t.get("token", ""), t.get("logprob")) for t in top if isinstance(t, dict)]
    elif isinstance(top, dict):  # completions format: {token: logprob}
        pairs = list(top.items())
    else:
        pairs = []
    out = {}
    for c in candidates:
        lps = [float(lp) for tok, lp in pairs if isinstance(tok, str) and lp is not None and _norm(tok) == _norm(c)]
        if len(lps) == 1:
            out[c] = lps[0]
        else:
            m = max(lps, default=-math.inf)
            out[c] = m + math.log(sum(math.exp(v - m) for v in lps)) if m > -math.inf else -math.inf
    return out


class OpenAIClient(_Usage):
    """An OpenAI-compatible server (llama.cpp, vLLM, ...) over HTTP with the standard library.

    Requests are retried `retries` times after the first try, with exponential backoff
    (backoff * 2^k seconds), on connection errors, timeouts, HTTP 429/5xx and replies that are not
    the JSON expected; then a `ClientError` names the URL and the last problem. HTTP 4xx other than
    429 is not retried (the request itself is wrong). `echo_alignment` says how the server aligns
    prompt log-probabilities (see `prompt_logprobs`): "openai", or "next" for llama-cpp-python."""

    def __init__(self, base_url: str, *, model: str = "default", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, api_key: str | None = None, top_logprobs: int = 20,
                 echo_alignment: str = "openai"):
        super().__init__()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8080/v1', got {base_url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model, self.timeout, self.retries, self.backoff = model, float(timeout), int(retries), float(backoff)
        if echo_alignment not in ("openai", "next"):
            raise ValueError(f"echo_alignment must be 'openai' or 'next' (llama-cpp-python), got {echo_alignment!r}")
        self.api_key, self.top_logprobs, self.echo_alignment = api_key, int(top_logprobs), echo_alignment

    def _post(self, path: str, payload: dict, check) -> dict:
        url = f"{self.base_url}/{path}"
        body = json.dumps({"model": self.model, **payload}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace") if e.fp else ""
                problem = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code != 429 and 400 <= e.code < 500:
                    raise ClientError(f"{url} rejected the request ({problem})") from None
                continue
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                problem = f"{type(reason).__name__}: {reason}"
                continue
            try:
                data = json.loads(raw.decode("utf-8", errors="replace"))
                check(data)
                return data
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"malformed reply ({type(e).__name__}: {e}): {raw[:200]!r}"
        raise ClientError(f"no valid reply from {url} after {self.retries + 1} attempts; last problem: "
                          f"{problem}. Is an OpenAI-compatible server running there?")

    def _chat(self, messages: Messages, **payload) -> dict:
        _check_messages(messages)

        def check(d):
            msg = d["choices"][0]["message"]
            if not isinstance(msg.get("content") or "", str):
                raise TypeError("message content is not a string")

        data = self._post("chat/completions", {"messages": messages, **payload}, check)
        usage = data.get("usage") or {}
        self._count(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        return data

    def generate(self, messages: Messages, *, max_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> str:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        data = self._chat(messages, max_tokens=int(max_tokens), temperature=float(temperature), seed=seed)
        return data["choices"][0]["message"].get("content") or ""

    def next_token_logprobs(self, messages: Messages, candidates: Sequence[str]) -> dict[str, float]:
        cands = _check_candidates(candidates)
        data = self._chat(messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs)
        content = ((data["choices"][0].get("logprobs") or {}).get("content")) or []
        if not content:
            raise ClientError(f"{self.base_url}/chat/completions returned no logprobs: the server must "
                              "support logprobs/top_logprobs")
        return _merge_top(content[0].get("top_logprobs"), cands)

    def next_token_logprobs_batch(self, batch: Sequence[Messages], candidates: Sequence[str]) -> list[dict[str, float]]:
        return [self.next_token_logprobs(m, candidates) for m in batch]

    def prompt_logprobs(self, text: str, *, candidates: Sequence[str] | None = None) -> list[TokenLogprob]:
        """/v1/completions with echo: the prompt's own token log-probabilities (a llama.cpp server
        must run with `--logits_all true`). One extra token is generated and dropped.

        echo_alignment "openai": top_logprobs[i] lists the alternatives to token i, so row i's
        next-token candidates are top_logprobs[i + 1]. "next" (llama-cpp-python's server, issue
        abetlen/llama-cpp-python#1983): top_logprobs[i] is the distribution *after* token i and
        token_logprobs[i] scores token i under it (meaningless), so row i's candidates are
        top_logprobs[i] and its log P is read from top_logprobs[i - 1] (nan when the token is
        not among the listed alternatives, and for the first two tokens)."""
        cands = _check_candidates(candidates) if candidates else []

        def check(d):
            lp = d["choices"][0]["logprobs"]
            if not isinstance(lp["tokens"], list) or len(lp["tokens"]) != len(lp["token_logprobs"]):
                raise ValueError("logprobs.tokens and logprobs.token_logprobs differ in length")

        data = self._post("completions", {"prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                                          "logprobs": self.top_logprobs}, check)
        lp = data["choices"][0]["logprobs"]
        offsets = lp.get("text_offset") or []
        tops = list(lp.get("top_logprobs") or [])
        tops += [None] * (len(lp["tokens"]) + 1 - len(tops))
        rows, pos = [], 0
        for i, tok in enumerate(lp["tokens"]):
            off = int(offsets[i]) if i < len(offsets) else pos
            if off >= len(text):
                break  # the generated token
            pos = off + len(tok)
            if self.echo_alignment == "openai":
                v = lp["token_logprobs"][i]
                value = math.nan if v is None else float(v)
                nxt = tops[i + 1]
            else:
                prev = tops[i - 1] if i > 0 else None
                value = float(prev[tok]) if isinstance(prev, dict) and prev.get(tok) is not None else math.nan
                nxt = tops[i]
            rows.append(TokenLogprob(token=tok, offset=off, logprob=value,
                                     candidates=(_merge_top(nxt, cands) if nxt else {c: -math.inf for c in cands})
                                     if cands else {}))
        self._count(len(rows), 0)
        return rows

    def prompt_logprobs_batch(self, texts: Sequence[str], *, candidates: Sequence[str] | None = None
                              ) -> list[list[TokenLogprob]]:
        return [self.prompt_logprobs(t, candidates=candidates) for t in texts]
