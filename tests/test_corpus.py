"""The corpus builder on small made-up package files (no Debian or PyPI package needed)."""
import gzip
import io
import json
import tarfile

import pytest

from hmt_runtime.training import corpus
from hmt_runtime.training.corpus import Source, build, extract, html_to_text, pod_to_text, strip_gutenberg, verify

PARAGRAPH = "The quick brown fox jumps over the lazy dog, and then it reads a manual. " * 20


def test_extractors():
    page = ("<html><head><title>T</title><style>p {}</style></head><body><h1>Intro</h1><p>One &amp; two"
            "\n   three.</p><pre>  code\n    indented</pre><script>x()</script></body></html>")
    text = html_to_text(page)
    assert "Intro" in text and "One & two three." in text and "  code\n    indented" in text
    assert "x()" not in text and "p {}" not in text and "T" not in text.split()
    pod = "=head1 NAME\n\nperlx - B<bold> and C<code> and L<perlop/Ops> E<lt>tagE<gt> X<idx>\n\n=cut\n"
    assert pod_to_text(pod).split("\n") == ["NAME", "", "perlx - bold and code and perlop/Ops <tag> ", ""]
    book = "header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence"
    assert strip_gutenberg(book).strip() == "body"
    assert strip_gutenberg("no markers") == "no markers"
    assert extract(gzip.compress(b"a\r\nb   \n\n\n\nc"), "gzip") == "a\nb\n\nc\n"
    with pytest.raises(UnicodeDecodeError):
        extract(b"\xff\xfe", "text")


def _fake_root(tmp_path):
    root = tmp_path / "root"
    (root / "usr/share/doc/pkg").mkdir(parents=True)
    (root / "usr/share/doc/pkg/manual.html").write_text(f"<p>{PARAGRAPH}</p><p>Second part.</p>")
    (root / "usr/share/doc/pkg/part1.pod").write_text(f"=head1 ONE\n\n{PARAGRAPH}\n")
    (root / "usr/share/doc/pkg/part2.pod").write_text("=head1 TWO\n\nI<end>\n")
    (root / "usr/share/dict").mkdir(parents=True)
    (root / "usr/share/dict/words.dict.dz").write_bytes(gzip.compress(PARAGRAPH.encode()))
    (root / "usr/share/common-licenses").mkdir(parents=True)
    (root / "usr/share/common-licenses/GFDL-1.3").write_text("the licence")
    sdists = tmp_path / "sdist"
    sdists.mkdir()
    with tarfile.open(sdists / "storybook-1.0.tar.gz", "w:gz") as tar:
        data = f"*** START OF THE PROJECT GUTENBERG EBOOK S ***\n{PARAGRAPH}\n*** END OF THE PROJECT GUTENBERG EBOOK S ***".encode()
        info = tarfile.TarInfo("storybook-1.0/examples/story.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return root, sdists


SMALL = [
    Source("manual", "technical", "valid", "pkg", ["/usr/share/doc/pkg/manual.html"], "html", "GFDL-1.3",
           licence_files=["/usr/share/common-licenses/GFDL-1.3"]),
    Source("pods", "technical", "train", "pkg", ["/usr/share/doc/pkg/part*.pod"], "pod", "Artistic"),
    Source("words", "satire", "train", "dictpkg", ["/usr/share/dict/words.dict.dz"], "dictzip", "public domain"),
    Source("story", "fiction", "train", "storybook", ["*/examples/story.txt"], "text", "public domain",
           kind="sdist"),
]


def test_build_writes_documents_manifest_and_licences(tmp_path):
    root, sdists = _fake_root(tmp_path)
    out = tmp_path / "corpus"
    manifest = build(out, SMALL, root=root, sdist_dir=sdists)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["LICENSES.md", "MANIFEST.json", "licenses/GFDL-1.3", "train/fiction/story.txt",
                     "train/satire/words.txt", "train/technical/pods.txt", "valid/technical/manual.html"
                     .replace(".html", ".txt")]
    pods = (out / "train/technical/pods.txt").read_text()
    assert pods.index("ONE") < pods.index("TWO") and pods.endswith("end\n")  # files concatenated in order
    story = (out / "train/fiction/story.txt").read_text()
    assert "GUTENBERG" not in story and story.startswith("The quick brown fox")
    entries = {e["name"]: e for e in json.loads((out / "MANIFEST.json").read_text())["documents"]}
    assert entries == {e["name"]: e for e in manifest["documents"]}
    assert entries["story"]["from"] == ["storybook-1.0.tar.gz:storybook-1.0/examples/story.txt"]
    assert entries["pods"]["from"] == ["/usr/share/doc/pkg/part1.pod", "/usr/share/doc/pkg/part2.pod"]
    assert entries["manual"]["split"] == "valid" and entries["manual"]["licence"] == "GFDL-1.3"
    assert "| `valid/technical/manual.txt` | valid | technical | pkg | GFDL-1.3 |" in (out / "LICENSES.md").read_text()
    assert verify(out) == []
    # rebuilding gives the same bytes (reproducible); a changed file is reported
    again = build(tmp_path / "again", SMALL, root=root, sdist_dir=sdists)
    assert [e["sha256"] for e in again["documents"]] == [e["sha256"] for e in manifest["documents"]]
    (out / "train/satire/words.txt").write_text("changed")
    assert verify(out) == ["train/satire/words.txt: content differs from the manifest"]


def test_builder_errors(tmp_path):
    root, sdists = _fake_root(tmp_path)
    missing = Source("gone", "technical", "train", "nopkg", ["/usr/share/doc/nopkg/x.html"], "html", "MIT")
    with pytest.raises(FileNotFoundError, match="install the Debian package 'nopkg'"):
        build(tmp_path / "o", [missing], root=root)
    with pytest.raises(FileNotFoundError, match="no storybook-"):
        build(tmp_path / "o", SMALL[3:], root=root, sdist_dir=tmp_path)
    (root / "usr/share/doc/pkg/short.html").write_text("<p>tiny</p>")
    short = Source("short", "technical", "train", "pkg", ["/usr/share/doc/pkg/short.html"], "html", "MIT")
    with pytest.raises(ValueError, match="expected a long document"):
        build(tmp_path / "o", [short], root=root)
    with pytest.raises(ValueError, match="duplicate names"):
        build(tmp_path / "o", [SMALL[0], SMALL[0]], root=root)
    with pytest.raises(ValueError, match="split='test'"):
        Source("x", "g", "test", "p", ["/a"], "text", "MIT")
    with pytest.raises(ValueError, match="format='pdf'"):
        Source("x", "g", "train", "p", ["/a"], "pdf", "MIT")
    for name, files in (("kjv-bible", ["/a"]), ("plays", ["/usr/share/shakespeare/hamlet.txt"]),
                        ("docs", ["/usr/share/doc/python3-doc/html/index.html"])):
        with pytest.raises(ValueError, match="reserved for independent evaluation"):
            Source(name, "g", "train", "p", files, "text", "PD")


def test_shipped_sources_keep_the_reserved_texts_out_and_validation_whole():
    assert {s.split for s in corpus.SOURCES} == {"train", "valid"}
    valid = [s for s in corpus.SOURCES if s.split == "valid"]
    assert valid and all(s.genre != "fiction" for s in valid)  # fiction validation: data/austen/persuasion.txt
    assert not any("persuasion" in f for s in corpus.SOURCES for f in s.files)
    genres = {s.genre for s in corpus.SOURCES if s.split == "train"}
    assert {"fiction", "technical"} <= genres and len(genres) >= 4
