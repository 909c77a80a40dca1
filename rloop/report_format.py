"""The report as a document (headings, paragraphs, tables, figures) and its two renderings: markdown and
one self-contained HTML file. Both come from the same blocks, so report.md and report.html cannot drift.

The HTML embeds every image as a `data:` URI and its stylesheet inline, and all text is escaped: run
names, store URIs and eval-set names come from users. Its Content-Security-Policy forbids scripts and
every fetch but `data:` images, so the page stays a document even if some text slipped through."""

from __future__ import annotations

import base64
import html
import re
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """Inline code: backticks in markdown, <code> in HTML."""

    text: str


Inline = tuple[str | Code, ...]


@dataclass(frozen=True)
class Heading:
    level: int
    text: Inline


@dataclass(frozen=True)
class Paragraph:
    text: Inline


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """A PNG written next to the report (`file`), with the text that describes it (alt text, caption)."""

    file: str
    caption: str


Block = Heading | Paragraph | Table | Figure


# ------------------------------------------------------------------------------------------ markdown
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (the report's and the science benchmark's)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(_markdown_block(b) for b in blocks) + "\n"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _markdown_inline(block.text)
    if isinstance(block, Paragraph):
        return _markdown_inline(block.text)
    if isinstance(block, Table):
        return markdown_table(block.header, block.rows)
    return f"![{block.caption}]({block.file})"


def _markdown_inline(text: Inline) -> str:
    return "".join(f"`{part.text}`" if isinstance(part, Code) else part for part in text)


# ------------------------------------------------------------------------------------------ HTML
# Tabular figures keep the digits of a column aligned; the policy column stays left-aligned.
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; }
code { font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f6f8fa;
       padding: .1em .3em; border-radius: 4px; }
table { border-collapse: collapse; margin: 1em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .35em .7em; }
td, tbody th { white-space: nowrap; }
thead th { background: #f6f8fa; text-align: center; vertical-align: bottom; }
tbody th { text-align: left; font-weight: 600; }
td { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #59636e; font-size: .9em; margin-top: .3em; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# a number, a missing value (–) or a before→after pair of them
_NUMERIC = re.compile(r"[-+]?[\d.]+(→[-+]?[\d.]+|→–)?|–")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def to_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """One HTML page; `images` maps each Figure's file name to its PNG bytes (embedded, not linked)."""
    title = next((_plain(b.text) for b in blocks if isinstance(b, Heading)), "RLoop report")
    head = (f'<meta charset="utf-8">\n<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>")
    body = "\n".join(_html_block(b, images) for b in blocks)
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n'


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_html_inline(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_html_inline(block.text)}</p>"
    if isinstance(block, Table):
        return html_table(block.header, block.rows)
    return _html_figure(block, images)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """A <table> with column headers; each row's first cell labels the row (the policy)."""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    body = []
    for row in rows:
        label, *cells = row
        tds = "".join(_html_cell(c) for c in cells)
        body.append(f'<tr><th scope="row">{html.escape(label)}</th>{tds}</tr>')
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _html_cell(cell: str) -> str:
    align = ' class="num"' if _NUMERIC.fullmatch(cell) else ""
    return f"<td{align}>{html.escape(cell)}</td>"


def _html_figure(figure: Figure, images: dict[str, bytes]) -> str:
    png = images.get(figure.file)
    if png is None or not png.startswith(PNG_MAGIC):
        raise ValueError(f"report figure {figure.file!r}: no PNG image was written for it; plot it before rendering")
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk: the page reserves the space before decoding
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    caption = html.escape(figure.caption)
    return (f'<figure><img src="{src}" alt="{caption}" width="{width}" height="{height}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _html_inline(text: Inline) -> str:
    return "".join(f"<code>{html.escape(p.text)}</code>" if isinstance(p, Code) else html.escape(p) for p in text)


def _plain(text: Inline) -> str:
    return "".join(p.text if isinstance(p, Code) else p for p in text)
