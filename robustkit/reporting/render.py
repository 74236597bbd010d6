"""A tiny document model (sections of text, tables, figures and code) and two renderers: one
self-contained HTML file (figures as base64 data URIs, inline stylesheet, no scripts) and
GitHub-flavoured Markdown (figures as relative links into ``figures/``)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    caption: str = ""
    status_column: str | None = None


@dataclass(frozen=True)
class FigureBlock:
    name: str  # file name under figures/
    png: bytes
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""
    summary: str = ""


Block = Text | Heading | Table | FigureBlock | Code


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class Part:
    """What one report section contributes: its ``section`` (None when the runs have nothing
    for it) and the CSV tables it writes under ``tables/``, by file stem (empty frames are not
    written). Every section of :mod:`robustkit.reporting.sections` returns one."""

    section: Section | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #1f2328; background: #fff; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; margin-top: 2em; padding-bottom: 0.25em; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
nav { font-size: 0.9em; margin-bottom: 1em; }
nav a { margin-right: 1em; color: #0969da; text-decoration: none; }
p.caption { color: #59636e; font-size: 0.88em; margin-top: 0.3em; }
.table-wrap { overflow-x: auto; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #d8dee4; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td .ci { display: block; color: #59636e; font-size: 0.85em; }
td:first-child { white-space: nowrap; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef1f4; }
figcaption { color: #59636e; font-size: 0.88em; }
pre { background: #f6f8fa; padding: 10px 12px; overflow-x: auto; font-size: 0.82em;
  border-radius: 6px; }
details summary { cursor: pointer; color: #0969da; margin: 0.5em 0; }
.status { font-weight: 600; padding: 1px 8px; border-radius: 10px; font-size: 0.9em; }
.status-pass { background: #dafbe1; color: #116329; }
.status-warn { background: #fff8c5; color: #7d4e00; }
.status-fail { background: #ffebe9; color: #a40e26; }
footer { margin-top: 3em; color: #59636e; font-size: 0.85em; }
.headline { font-size: 1.08em; background: #f6f8fa; border-left: 4px solid #0969da;
  padding: 8px 12px; margin: 0.4em 0; }
"""

STATUS_MARK = {"pass": "✅ pass", "warn": "⚠️ warn", "fail": "❌ fail"}


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # nan
            return ""
        return f"{value:.4g}"
    return str(value)


NUMBER = re.compile(
    r"^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?"  # a number, maybe a percentage
    r"( \[[-+\d.e]+, [-+\d.e]+\])?( s| min)?$"  # then maybe an interval or a unit
)


INTERVAL = re.compile(r"^[-+\d.e]+ \[[-+\d.e]+, [-+\d.e]+\]$")


def _is_numeric(text: str) -> bool:
    return bool(NUMBER.match(text))


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces → hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


# --------------------------------------------------------------------------- HTML


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(table: Table) -> str:
    e = html.escape
    frame = table.frame
    head = "".join(f"<th>{e(str(c))}</th>" for c in frame.columns)
    body = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values, strict=True):
            text = _cell_text(value)
            if column == table.status_column and text in STATUS_MARK:
                cells.append(f'<td><span class="status status-{text}">{e(text)}</span></td>')
            elif INTERVAL.match(text):
                value, interval = text.split(" ", 1)
                cells.append(
                    f'<td class="num">{e(value)}<span class="ci">{e(interval)}</span></td>'
                )
            else:
                css = ' class="num"' if _is_numeric(text) else ""
                cells.append(f"<td{css}>{e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f'<p class="caption">{e(table.caption)}</p>' if table.caption else ""
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{caption}"
    )


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Text):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Heading):
        return f"<h3>{e(block.text)}</h3>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, FigureBlock):
        caption = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="{data_uri(block.png)}" alt="{e(block.alt)}">{caption}</figure>'
    pre = f"<pre><code>{e(block.text)}</code></pre>"
    if block.summary:
        return f"<details><summary>{e(block.summary)}</summary>{pre}</details>"
    return pre


#: A report's headline: (model, what its figures and checks say), one per model.
HeadlineLines = Sequence[tuple[str, str]]


def to_html(title: str, intro: list[str], sections: list[Section], footer: str,
            headline: HeadlineLines = ()) -> str:
    """The report as one HTML page: title, headline, intro lines, a table of contents, the
    sections, the footer."""
    e = html.escape
    nav = " ".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        *[f'<p class="headline"><strong>{e(model)}</strong>: {e(text)}</p>'
          for model, text in headline],
        *[f"<p>{e(line)}</p>" for line in intro],
        f"<nav>{nav}</nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{e(section.id)}"><h2>{e(section.title)}</h2>')
        parts.extend(_html_block(b) for b in section.blocks)
        parts.append("</section>")
    parts.append(f"<footer>{e(footer)}</footer></main></body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    frame = table.frame
    header = "| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values, strict=True):
            text = _cell_text(value)
            if column == table.status_column:
                text = STATUS_MARK.get(text, text)
            cells.append(_md_escape(text))
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", f"*{_md_escape(table.caption)}*"]
    return "\n".join(lines)


def _md_block(block: Block, figure_dir: str) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Heading):
        return f"### {block.text}"
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, FigureBlock):
        alt = block.alt.replace("]", ")").replace("[", "(")
        text = f"![{alt}]({figure_dir}/{block.name})"
        return text + (f"\n\n*{block.caption}*" if block.caption else "")
    fence = "~~~" if "```" in block.text else "```"
    code = f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}"
    if block.summary:
        return f"<details><summary>{html.escape(block.summary)}</summary>\n\n{code}\n\n</details>"
    return code


def to_markdown(
    title: str, intro: list[str], sections: list[Section], footer: str, figure_dir: str = "figures",
    headline: HeadlineLines = (),
) -> str:
    """The report as GitHub Markdown, in the order of :func:`to_html`; figures link into
    ``figure_dir``."""
    parts = [f"# {title}", *[f"**{_md_escape(model)}**: {text}" for model, text in headline],
             *intro, " · ".join(f"[{s.title}](#{slug(s.title)})" for s in sections)]
    for section in sections:
        parts.append(f"## {section.title}")
        parts.extend(_md_block(b, figure_dir) for b in section.blocks)
    parts.append(f"---\n\n*{footer}*")
    return "\n\n".join(parts) + "\n"
