"""Corpus sources: every format yields the same excerpts for the same documents."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.corpus import load_corpus, stdlib_docstrings
from engine.errors import UserError
from tests.tiny import corpus_texts, make_tokenizer

T = 8


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(corpus_texts(30))


def test_formats_agree(tok, tmp_path):
    docs = corpus_texts(25, seed=4)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    (tmp_path / "dir").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "dir" / f"{i:03d}.txt").write_text(d)
    got = [load_corpus(str(tmp_path / name), tok, T, text_field="body").tokens
           for name in ("a.jsonl", "a.parquet", "dir")]
    # By hand: documents joined with the EOS token between them, cut into T-token excerpts.
    stream = []
    for i, d in enumerate(docs):
        stream += ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    want = np.array(stream[: len(stream) // T * T], dtype=np.int32).reshape(-1, T)
    for g in got:
        np.testing.assert_array_equal(g, want)
    # --max-excerpts cuts the same stream.
    cut = load_corpus(str(tmp_path / "a.jsonl"), tok, T, max_excerpts=7, text_field="body")
    np.testing.assert_array_equal(cut.tokens, want[:7])
    assert cut.description["tokens_sha256"] != load_corpus(str(tmp_path / "a.jsonl"), tok, T, text_field="body").description["tokens_sha256"]


def test_a_byte_order_mark_is_not_text(tok, tmp_path):
    """Editors on Windows start UTF-8 files with a BOM: it is no part of the document (as in .jsonl)."""
    docs = corpus_texts(12, seed=5)
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "plain" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
        (tmp_path / "bom" / f"{i:02d}.txt").write_text(d, encoding="utf-8-sig")
    (tmp_path / "bom.txt").write_text(docs[0], encoding="utf-8-sig")
    (tmp_path / "plain.txt").write_text(docs[0], encoding="utf-8")
    for a, b in (("plain", "bom"), ("plain.txt", "bom.txt")):
        np.testing.assert_array_equal(load_corpus(str(tmp_path / a), tok, T).tokens,
                                      load_corpus(str(tmp_path / b), tok, T).tokens)


def test_documents_stay_apart_with_a_tokenizer_that_drops_whitespace(tmp_path):
    """No EOS, and "\n\n" tokenizes to nothing (a word-level tokenizer): the boundary is marked
    with the tokenizer's unknown token rather than not at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in corpus_texts(30) for w in d.replace(".", " .").split()})
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    wl = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    assert wl.eos_token_id is None and wl("\n\n", add_special_tokens=False)["input_ids"] == []
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "0.txt").write_text("cat sat")
    (tmp_path / "d" / "1.txt").write_text("fox jumps")
    got = load_corpus(str(tmp_path / "d"), wl, 5).tokens
    ids = wl("cat sat", add_special_tokens=False)["input_ids"] + [wl.unk_token_id] + \
        wl("fox jumps", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(got, np.array([ids], dtype=np.int32))


def test_parquet_without_the_field(tok, tmp_path):
    pq.write_table(pa.table({"content": ["a b c"]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="no column 'text'.*content"):
        load_corpus(str(tmp_path / "b.parquet"), tok, T)


def test_embedded_corpus_is_deterministic_and_offline():
    a = list(stdlib_docstrings())
    assert len(a) > 1000 and a == list(stdlib_docstrings())
    assert any("Return" in d for d in a[:200])


def _metaspace_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                     show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_token_strings_spell_the_text(kind):
    """Joining an excerpt's token strings gives its text back, also where decode([i]) alone drops a
    token's leading space (SentencePiece-style decoders: Llama 2, Mistral, Gemma)."""
    from engine.recorder import vocab_strings

    texts = corpus_texts()
    tok = make_tokenizer(texts) if kind == "byte-level" else _metaspace_tokenizer(texts)
    vocab = vocab_strings(tok)
    assert len(vocab) == len(tok)
    for text in texts[:20]:
        ids = tok.encode(text, add_special_tokens=False)
        # The metaspace tokenizer writes the text's first word as "▁the": a space in the text it saw.
        assert "".join(vocab[i] for i in ids) == (" " + text if kind == "metaspace" else text)
    if kind == "metaspace":
        cat = tok.encode(" cat", add_special_tokens=False)
        assert tok.decode([cat[0]]) == "cat" and vocab[cat[0]] == " cat"
    else:  # byte-level strings were right already: unchanged
        assert vocab == [tok.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tok))]


def test_corpus_text_python_reads_but_a_tokenizer_should_not_get(tok, tmp_path):
    """A parquet binary column is UTF-8 text, a list column no text; a lone surrogate in .jsonl is
    U+FFFD (the tokenizer raised on it); a document's literal "<|endoftext|>" is text, not the
    separator it would forge."""
    pq.write_table(pa.table({"text": [b"the cat sat", "caf\u00e9 dog".encode()]}), tmp_path / "bin.parquet")
    pq.write_table(pa.table({"text": ["the cat sat", "caf\u00e9 dog"]}), tmp_path / "str.parquet")
    np.testing.assert_array_equal(load_corpus(str(tmp_path / "bin.parquet"), tok, 2).tokens,
                                  load_corpus(str(tmp_path / "str.parquet"), tok, 2).tokens)
    pq.write_table(pa.table({"text": [["the cat", "sat"]]}), tmp_path / "list.parquet")
    with pytest.raises(UserError, match="holds list values .*, not text"):
        load_corpus(str(tmp_path / "list.parquet"), tok, 2)
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "int.parquet")  # the wrong column, surely
    with pytest.raises(UserError, match=r"holds int values \(int64\), not text"):
        load_corpus(str(tmp_path / "int.parquet"), tok, 1)
    # A .txt document keeps its line endings, as .jsonl text does.
    (tmp_path / "crlf.txt").write_bytes(b"the cat\r\nsat on\rthe mat\n")
    (tmp_path / "crlf.jsonl").write_text(json.dumps({"text": "the cat\r\nsat on\rthe mat\n"}) + "\n")
    ids = load_corpus(str(tmp_path / "crlf.txt"), tok, 1).tokens.ravel()
    np.testing.assert_array_equal(ids, load_corpus(str(tmp_path / "crlf.jsonl"), tok, 1).tokens.ravel())
    assert tok.decode(ids.tolist()) == "the cat\r\nsat on\rthe mat\n"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_bytes(b"the cat\r\nsat")
    (tmp_path / "dir" / "b.txt").write_bytes(b" \r\n ")  # white space only: no document, no separator
    (tmp_path / "dir" / "c.txt").write_bytes(b"on the mat")
    ids = load_corpus(str(tmp_path / "dir"), tok, 1).tokens.ravel().tolist()
    assert ids.count(tok.eos_token_id) == 1 and "the cat\r\nsat" in tok.decode(ids)
    (tmp_path / "s.jsonl").write_text('{"text": "the cat \\ud800 sat on the mat"}\n')
    (tmp_path / "r.jsonl").write_text('{"text": "the cat \\ufffd sat on the mat"}\n')
    np.testing.assert_array_equal(load_corpus(str(tmp_path / "s.jsonl"), tok, 2).tokens,
                                  load_corpus(str(tmp_path / "r.jsonl"), tok, 2).tokens)
    (tmp_path / "eos.txt").write_text("the cat <|endoftext|> sat on the mat")
    ids = load_corpus(str(tmp_path / "eos.txt"), tok, 1).tokens.ravel().tolist()
    assert tok.eos_token_id not in ids and tok.decode(ids) == "the cat <|endoftext|> sat on the mat"
