"""report.html: one self-contained page with the content of report.md (same table rows, every plot embedded
byte for byte), all user text escaped."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rloop.report import FIGURES, collect, iteration_rows, report_blocks, write_report
from rloop.report_format import Figure, Heading, Paragraph, Table, to_html
from tests.report_fixtures import finished_run

HOSTILE = "<script>alert('x')</script> & \"q\""


class Page(HTMLParser):
    """What a parser sees: elements (tag, attributes), table cells by row, and all text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def elements(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("store") / HOSTILE.replace("/", "|")  # the store URI is user text too
    store = finished_run(root, "tiny")
    finished_run(root, "tiny-rl", mode="rl")  # beside it: the vanilla row and its curves
    files = write_report([store])
    report_dir = Path(store.base) / "report"
    assert files.markdown == f"{store.uri}/report/report.md" and files.html == f"{store.uri}/report/report.html"
    html_text = (report_dir / "report.html").read_text(encoding="utf-8")
    return {"store": store, "dir": report_dir, "html": html_text, "page": Page(html_text)}


def test_table_rows_are_the_markdown_rows(report):
    store = report["store"]
    header, rows = iteration_rows(collect(store), collect(finished_run(store.root_uri, "tiny-rl", mode="rl")))
    assert report["page"].rows == [header, *rows]
    assert rows[-1][:2] == ["vanilla RL (tiny-rl), end", "12"]
    md = (report["dir"] / "report.md").read_text()
    for row in rows:  # the same cells, in both renderings
        assert "| " + " | ".join(row) + " |" in md
    assert len(report["page"].elements("th")) == len(header) + len(rows)  # column headers + one per row label
    assert report["html"].count('<td class="num">0.510</td>') == 4  # iter 1 and vanilla: avg@16 and pass@1


def test_one_embedded_image_per_plot_with_the_png_bytes(report):
    images = report["page"].elements("img")
    assert [i["alt"] for i in images] == [f.caption for f in FIGURES]
    for img, figure in zip(images, FIGURES, strict=True):
        prefix, _, payload = img["src"].partition(",")
        assert prefix == "data:image/png;base64"
        png = (report["dir"] / figure.file).read_bytes()
        assert base64.b64decode(payload, validate=True) == png
        assert int(img["width"]) > 100 and int(img["height"]) > 100
    captions = "".join(report["page"].text)
    assert all(f.caption in captions for f in FIGURES)


def test_self_contained_no_script_no_external_reference(report):
    page, text = report["page"], report["html"]
    assert not page.elements("script") and not page.elements("link") and not page.elements("a")
    fetching = {"src", "href", "srcset", "poster", "data", "action", "background"}
    links = [(tag, k, v) for tag, attrs in page.tags for k, v in attrs.items() if k in fetching]
    assert links and all(v.startswith("data:image/png;base64,") for _, _, v in links), [link[:2] for link in links]
    assert "url(" not in text and "@import" not in text  # the stylesheet fetches nothing either
    assert len(page.elements("style")) == 1


def test_user_text_is_escaped(report):
    page = report["page"]
    assert HOSTILE.replace("/", "|") in "".join(page.text)  # shown literally (the store path)
    assert "<script>alert" not in report["html"]
    blocks = [Heading(1, (HOSTILE,)), Paragraph((HOSTILE,)), Table([HOSTILE, "n"], [[HOSTILE, "1"]])]
    rendered = Page(to_html(blocks, {}))
    assert not rendered.elements("script")
    assert "".join(rendered.text).count(HOSTILE) == 5  # <title>, heading, paragraph, column header, row label
    assert rendered.rows == [[HOSTILE, "n"], [HOSTILE, "1"]]


def test_figure_without_its_png_names_the_file():
    with pytest.raises(ValueError, match="'eval.png'.*no PNG"):
        to_html([Figure("eval.png", "held-out evaluation")], {"eval.png": b"GIF89a"})


def test_report_blocks_render_the_markdown_headings(tmp_path):
    data = collect(finished_run(tmp_path, "solo", steps_run=(6,)))
    blocks = report_blocks([data], None)
    assert [b.file for b in blocks if isinstance(b, Figure)] == [f.file for f in FIGURES]
    page = Page(to_html(blocks, {f.file: _png() for f in FIGURES}))
    assert page.elements("h1") and len(page.elements("h2")) == 2  # the run, then the plots
    assert page.elements("code")  # mode, store and the config key stay code


def _png() -> bytes:
    """The start of a 1x1 PNG: the magic and the IHDR chunk, all the renderer reads."""
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (1).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
