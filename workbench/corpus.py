"""Plain text for haystacks, SAE training and next-token tasks.

Sources: `python-docs` (the offline default), a local `.txt`/`.jsonl`/`.md` file or a folder of
them, or `hf:NAME[:SPLIT]` for a Hugging Face dataset when a hub is reachable.

`python-docs` is English prose already on every machine with Python: the language reference
topics behind `help()` (`pydoc_data`) and the longer docstrings of the standard library
(about 1.8 MB, ~450k tokens on the embedded model). It needs no download, is the same on every
machine with the same Python, and is cached once as JSONL in the model cache.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from workbench.atomic import write_file_atomic
from workbench.errors import WorkbenchError
from workbench.paths import cache_dir

DEFAULT_CORPUS = "python-docs"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def corpus_texts(source: str = DEFAULT_CORPUS) -> list[str]:
    """The documents of a corpus, in a fixed order."""
    if source == DEFAULT_CORPUS:
        return _python_docs()
    if source.startswith("hf:"):
        return _hf_dataset(source[3:])
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise WorkbenchError(f"corpus folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [doc for f in files for doc in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    raise WorkbenchError(
        f"unknown corpus '{source}': use '{DEFAULT_CORPUS}', a .txt/.jsonl/.md file or folder, or hf:DATASET[:SPLIT]"
    )


def corpus_tokens(model, source: str = DEFAULT_CORPUS, n_tokens: int | None = None) -> list[int]:
    """The corpus as one token stream (documents joined by the EOS token when there is one)."""
    sep = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    out: list[int] = []
    for doc in corpus_texts(source):
        out.extend(model.to_tokens(doc, prepend_bos=False))
        if sep is not None:
            out.append(sep)
        if n_tokens is not None and len(out) >= n_tokens:
            return out[:n_tokens]
    if n_tokens is not None and len(out) < n_tokens:
        raise WorkbenchError(f"corpus '{source}' has only {len(out)} tokens but {n_tokens} were asked for; use a larger corpus")
    return out


def _read_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{path} line {i} is not JSON ({e.msg}); each line must be {{\"text\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise WorkbenchError(f"{path} line {i} has no string field 'text'")
        docs.append(row["text"])
    return docs


def _python_docs() -> list[str]:
    cached = cache_dir() / "corpus" / f"python-docs-{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if cached.is_file():
        return _read_file(cached)
    from rich.console import Console

    with Console(stderr=True).status("collecting the python-docs corpus once (a few seconds)"):
        docs = list(_iter_python_docs())
    write_file_atomic(cached, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def _iter_python_docs(min_chars: int = 200) -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    for f in sorted(root.rglob("*.py")):
        if skip & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _hf_dataset(name: str) -> list[str]:
    dataset, _, split = name.partition(":")
    try:
        import datasets

        rows = datasets.load_dataset(dataset, split=split or "train")
    except Exception as e:  # the datasets library raises many types for "not reachable" / "not found"
        raise WorkbenchError(
            f"could not load dataset '{dataset}' from the Hugging Face hub ({type(e).__name__}); "
            "check the network or pass a local .txt/.jsonl file or folder"
        ) from e
    if "text" not in rows.column_names:
        raise WorkbenchError(f"dataset '{dataset}' has no 'text' column (columns: {rows.column_names})")
    return [t for t in rows["text"] if t]
