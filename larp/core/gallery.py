"""A run's gallery: one HTML page that shows its videos as small animated thumbnails, for people to look at.

The page is self-contained and offline: plain HTML and an inline style sheet, no script, no font or file from the
network, and every link relative to the page, so the folder can be copied or served as it is. Every text that comes
from data (class names, paths, settings) is escaped, and every link is percent-encoded, so nothing from the data can
run or break the page. Pages hold no clock time: a rerun that finds the same files renders the same bytes, and
`write_page` then leaves the file alone.

Thumbnails are animated WebP files (looping, silent, `THUMB_PX` pixels high); condition frames of frame prediction
carry an orange border (`mark` frames) so a reader tells the real context from the prediction.
"""
import html
import os
import urllib.parse
from dataclasses import dataclass

import numpy as np
from PIL import Image

from larp.core.io import atomic_write, atomic_write_text

THUMB_PX = 64
MARK_RGB = (255, 140, 0)  # the border of condition frames
MARK_PX = 3
STYLE = """body{font-family:sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:18px 0 6px;border-top:1px solid #ccc;padding-top:8px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;
vertical-align:top;font-size:13px}th{background:#f4f4f4}table table td{border:none;padding:0 4px}
.groups{display:flex;flex-wrap:wrap;gap:18px}.group h3{font-size:13px;margin:2px 0;color:#555}
.tiles{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px;color:#444}
figure img{display:inline-block;vertical-align:top;image-rendering:pixelated;margin:0 1px 2px;background:#eee}
.mark{color:rgb(255,140,0);font-weight:bold}.links a{margin-right:12px}.note{font-size:13px;color:#444}
.figure{margin:8px 0}.figure img{max-width:100%;display:block}"""


@dataclass(frozen=True)
class Tile:
    """One thing shown: its images (paths relative to the page) side by side, a caption, and an optional link (the
    full video) around them."""
    images: tuple
    caption: str
    href: str = ""


@dataclass(frozen=True)
class Section:
    """A heading and its groups of tiles: ((group heading, (Tile, ...)), ...)."""
    title: str
    groups: tuple


@dataclass(frozen=True)
class Table:
    """A table of text: a title, the header row and the rows."""
    title: str
    header: tuple
    rows: tuple


@dataclass(frozen=True)
class Page:
    """What a gallery page shows, top to bottom. `facts`: ((name, value), ...), a value being text or a dict (a
    card, shown as a table of its own); `links`: ((text, href), ...); `figures`: ((src, caption), ...) still images;
    `notes`: paragraphs of text."""
    title: str
    facts: tuple = ()
    links: tuple = ()
    notes: tuple = ()
    tables: tuple = ()
    figures: tuple = ()
    sections: tuple = ()


def esc(text):
    return html.escape(str(text), quote=True)


def href(path):
    """A relative path as a link target: percent-encoded (a name with `#`, `?` or spaces stays one path), then
    escaped for the attribute."""
    return esc(urllib.parse.quote(str(path).replace(os.sep, "/"), safe="/"))


def _value(value):
    if isinstance(value, dict):
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    return esc(value)


def _tile(tile):
    imgs = "".join(f'<img src="{href(src)}" alt="{esc(tile.caption)}" height="{THUMB_PX}" loading="lazy">'
                   for src in tile.images)
    body = f'<a href="{href(tile.href)}">{imgs}</a>' if tile.href else imgs
    return f'<figure><div class="tiles">{body}</div><figcaption>{esc(tile.caption)}</figcaption></figure>'


def _section(section):
    groups = "".join(f'<div class="group"><h3>{esc(heading)}</h3><div class="tiles">'
                     f'{"".join(_tile(t) for t in tiles)}</div></div>' for heading, tiles in section.groups)
    return f'<section><h2>{esc(section.title)}</h2><div class="groups">{groups}</div></section>'


def _table(table):
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<h2>{esc(table.title)}</h2><table><tr>{head}</tr>{rows}</table>"


def render_page(page):
    """The page as one HTML string (deterministic: the same Page gives the same text)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(page.title)}</title><style>{STYLE}</style></head><body>", f"<h1>{esc(page.title)}</h1>"]
    if page.facts:
        parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{_value(v)}</td></tr>" for k, v in page.facts)
                     + "</table>")
    if page.links:
        parts.append('<p class="links">' + "".join(f'<a href="{href(h)}">{esc(t)}</a>' for t, h in page.links)
                     + "</p>")
    parts += [f'<p class="note">{esc(n)}</p>' for n in page.notes]
    parts += [_table(t) for t in page.tables]
    parts += [f'<figure class="figure"><img src="{href(src)}" alt="{esc(cap)}"><figcaption>{esc(cap)}</figcaption>'
              f"</figure>" for src, cap in page.figures]
    parts += [_section(s) for s in page.sections]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_if_changed(path, text):
    """Write `text` to `path` atomically unless the file already holds exactly these bytes. Returns whether it
    wrote."""
    data = text.encode("utf-8")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    atomic_write_text(path, text)
    return True


def write_page(path, page):
    """Render `page` into `path` (see write_if_changed). Returns whether the file changed."""
    return write_if_changed(path, render_page(page))


def thumbnail_frames(frames, mark=0, size=THUMB_PX):
    """PIL frames `size` pixels high of uint8 frames (T, H, W, 3); the first `mark` of them framed in MARK_RGB."""
    t, h, w, _ = frames.shape
    out = []
    for k in range(t):
        image = Image.fromarray(np.ascontiguousarray(frames[k])).resize((max(1, round(w * size / h)), size),
                                                                        Image.Resampling.NEAREST)
        if k < mark:
            a = np.array(image)
            a[:MARK_PX], a[-MARK_PX:], a[:, :MARK_PX], a[:, -MARK_PX:] = MARK_RGB, MARK_RGB, MARK_RGB, MARK_RGB
            image = Image.fromarray(a)
        out.append(image)
    return out


def save_thumbnail(path, frames, mark=0, fps=8):
    """An animated, looping WebP thumbnail of uint8 frames (T, H, W, 3), written atomically (see thumbnail_frames)."""
    images = thumbnail_frames(frames, mark)
    atomic_write(path, lambda tmp: images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:],
                                                  duration=max(20, round(1000 / fps)), loop=0, quality=80,
                                                  method=4))
    return path


def save_strip(path, frames, mark=0):
    """A still PNG of uint8 frames (T, H, W, 3) side by side (the condition of a prediction), atomically."""
    images = thumbnail_frames(frames, mark)
    strip = Image.fromarray(np.concatenate([np.array(i) for i in images], axis=1))
    atomic_write(path, lambda tmp: strip.save(tmp, format="PNG"))
    return path
