"""Corpora: documents in, fixed-length excerpts of token ids out.

How documents become excerpts (the same for every source):

1. Documents are read in a fixed order and tokenized without special tokens.
2. They are joined into one stream with the tokenizer's end-of-sequence token between consecutive
   documents (two newlines' tokens when it has none), so an excerpt may span a document boundary,
   as the separator shows.
3. The stream is cut into consecutive, non-overlapping excerpts of `excerpt_len` tokens; excerpt i
   holds tokens [i * T, (i + 1) * T). A final partial excerpt is dropped. Excerpt ids are these
   indices, so they are deterministic for a given corpus, tokenizer and length.
4. Each excerpt is fed to the model as a sequence of its own. With BOS (see `--bos`), the
   tokenizer's BOS token is put in front and its position is not recorded.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from client.results import LONE_SURROGATE
from engine.errors import UserError

EMBEDDED = "stdlib"
"""Name of the embedded default corpus: the docstrings of Python's standard library."""

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def stdlib_docstrings() -> Iterator[str]:
    """Every module, class and function docstring of the standard library's .py files, in a
    fixed order (sorted paths, then source order). Read with `ast`: nothing is imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    yield doc


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # an error at the line's end is in this line
            except json.JSONDecodeError as exc:
                where = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg  # "Invalid control character at"
                raise UserError(f"{path}:{lineno}: not valid JSON ({where} at column {exc.colno})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise UserError(f"{path}:{lineno}: no text field '{field}' (set --text-field)")
            text = obj[field]
            if text is None:  # a missing value, as Parquet's nulls: no document
                continue
            if not isinstance(text, str):
                kind = {bool: "boolean", int: "number", float: "number"}.get(type(text), type(text).__name__)
                raise UserError(f"{path}:{lineno}: field '{field}' holds a JSON {kind} ({json.dumps(text)[:40]}), "
                                "not text (set --text-field)")
            yield text


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("a .parquet corpus needs the pyarrow package: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        first = str(exc).strip().splitlines()
        raise UserError(f"{path}: not a readable Parquet file ({first[0] if first else type(exc).__name__})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)}; set --text-field)")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for v in batch.column(0).to_pylist():
            if v is None:
                continue
            if isinstance(v, (bytes, bytearray)):  # a binary column: UTF-8, bad bytes replaced (as .txt)
                yield bytes(v).decode("utf-8", errors="replace")
            elif isinstance(v, str):
                yield v
            else:
                raise UserError(f"{path}: column '{field}' holds {type(v).__name__} values "
                                f"({pf.schema_arrow.field(field).type}), not text (set --text-field)")


def _hf_docs(name: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets need the datasets package: pip install datasets") from None
    parts = name.split(":")
    ds_name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        ds = datasets.load_dataset(ds_name, config, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise UserError(f"cannot load dataset '{ds_name}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for row in ds:
        if field not in row:
            raise UserError(f"dataset '{ds_name}' has no field '{field}' (set --text-field)")
        value = row[field]
        if value is None:  # a missing value: no document
            continue
        if not isinstance(value, str):
            raise UserError(f"dataset '{ds_name}': field '{field}' holds {type(value).__name__} values, not text "
                            "(set --text-field)")
        yield value


def _read_txt(path: Path) -> str:
    """A .txt document as its bytes say: UTF-8 (a BOM dropped, bad bytes replaced by U+FFFD), line
    endings as they are (\r\n stays \r\n, as in .jsonl text; Python's default would make it \n)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        return f.read()


def documents(source: str, text_field: str = "text") -> tuple[Iterator[str], dict]:
    """The documents of `source` and a description of it for the run's attributes.

    `source`: "stdlib" (embedded), a .txt file (one document), a directory of .txt files (one
    document each, sorted by name), a .jsonl or .parquet file (the `text_field` of each row), or
    "hf:NAME[:CONFIG[:SPLIT]]" for a Hugging Face dataset (when the hub is reachable).
    """
    if source == EMBEDDED:
        desc = {"kind": "embedded", "name": "stdlib-docstrings",
                "python": ".".join(map(str, sys.version_info[:3]))}
        return stdlib_docstrings(), desc
    if source.startswith("hf:"):
        return _hf_docs(source[3:], text_field), {"kind": "hf", "name": source[3:], "text_field": text_field}
    path = Path(source)
    if not path.exists():
        raise UserError(f"corpus '{source}' does not exist (give a .txt/.jsonl/.parquet file, a directory, 'stdlib' or hf:NAME)")
    desc = {"kind": "file", "path": str(path.resolve())}
    if path.is_dir():
        files = sorted(f for f in path.glob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"corpus directory '{source}' holds no .txt files")
        return (_read_txt(f) for f in files), {**desc, "format": "txt-dir", "files": len(files)}
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return iter([_read_txt(path)]), {**desc, "format": "txt"}
    if suffix == ".jsonl":
        return _jsonl_docs(path, text_field), {**desc, "format": "jsonl", "text_field": text_field}
    if suffix == ".parquet":
        return _parquet_docs(path, text_field), {**desc, "format": "parquet", "text_field": text_field}
    raise UserError(f"corpus '{source}': unknown format '{suffix}' (use .txt, .jsonl, .parquet or a directory)")


@dataclass
class Corpus:
    """A corpus cut into excerpts."""

    tokens: np.ndarray
    """[n_excerpts, excerpt_len] int32 token ids."""
    description: dict
    """Source, how it was cut, and a hash of its tokens: stored in the run's attributes."""

    @property
    def n_excerpts(self) -> int:
        return int(self.tokens.shape[0])


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def separator_ids(tokenizer) -> list[int]:
    """What goes between two documents: EOS, else the tokens of two newlines, else (a tokenizer
    that drops whitespace) its separator, BOS or unknown token, so that a boundary stays marked."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return [int(eos)]
    ids = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    if ids:
        return ids
    for name in ("sep_token_id", "bos_token_id", "unk_token_id"):
        other = getattr(tokenizer, name, None)
        if other is not None:
            return [int(other)]
    return []


def load_corpus(source: str, tokenizer, excerpt_len: int, max_excerpts: int | None = None,
                text_field: str = "text") -> Corpus:
    """Tokenize `source` into at most `max_excerpts` excerpts of `excerpt_len` tokens."""
    if excerpt_len < 1:
        raise UserError("--excerpt-len must be at least 1")
    docs, desc = documents(source, text_field)
    sep = separator_ids(tokenizer)
    need = None if max_excerpts is None else max_excerpts * excerpt_len
    chunks: list[np.ndarray] = []
    total = 0
    n_docs = 0
    for group in _batched(docs, 256):
        # split_special_tokens: a document's literal "<|endoftext|>" (or "<|im_start|>") is text,
        # never the separator or a chat-template token forged by the corpus.
        # A lone surrogate is no character a tokenizer takes: U+FFFD in its place, as for bytes
        # that are not UTF-8 (any format can carry one: JSON escapes, datasets, parquet strings).
        # A document of white space only holds no text: skipped in every format (as blank .jsonl
        # lines are), so that a corpus of nothing else is empty.
        group = [LONE_SURROGATE.sub("\ufffd", doc) for doc in group if doc and not doc.isspace()]
        if not group:
            continue
        ids = tokenizer(group, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for doc in ids:
            if not doc:
                continue
            piece = (sep if n_docs else []) + list(doc)
            chunks.append(np.asarray(piece, dtype=np.int32))
            total += len(piece)
            n_docs += 1
        if need is not None and total >= need:
            break
    if n_docs == 0:
        raise UserError(f"corpus '{source}' is empty: it holds no text")
    stream = np.concatenate(chunks)
    n = len(stream) // excerpt_len
    if max_excerpts is not None:
        n = min(n, max_excerpts)
    if n == 0:
        raise UserError(
            f"corpus '{source}' has {len(stream)} tokens, shorter than one excerpt of {excerpt_len}; "
            "use a larger corpus or a smaller --excerpt-len"
        )
    tokens = stream[: n * excerpt_len].reshape(n, excerpt_len)
    desc = {
        **desc,
        "documents_read": n_docs,
        "separator": sep,
        "excerpts": n,
        "max_excerpts": max_excerpts,
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }
    return Corpus(tokens=tokens, description=desc)
