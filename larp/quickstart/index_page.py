"""quickstart/index.html: the quickstart's results in a browser, offline. The goals table, the training curves,
the previews, and links to the pages of the tokenizer (eval_larp_tokenizer.py's gallery: inputs beside their
reconstructions) and of the two generators (sample.py's galleries: samples by class beside real clips)."""
import os

from larp.core.gallery import Page, Table, write_page

FIGURES = (("training_curves.png", "training curves"),
           ("preview_nar.gif", "NAR samples of seed 0: one row per class"),
           ("preview_raster.gif", "raster samples of seed 0: one row per class"),
           ("tokenizer_recon.png", "tokenizer: input rows (real) and reconstructions (recon)"))


def write_index(q, goals, galleries):
    """Write quickstart/index.html (left alone when nothing changed). `goals`: the (goal, this run, target, met)
    rows of larp.quickstart.report.goal_rows; `galleries`: (text, path relative to quickstart/) of the gallery
    pages. Returns whether the file changed."""
    links = (("report.md (every table)", "report.md"), *galleries)
    figures = tuple((src, caption) for src, caption in FIGURES if os.path.exists(os.path.join(q, src)))
    page = Page(title="Quickstart results", links=links,
                notes=("Synthetic videos, a tiny LARP tokenizer and tiny NAR and raster generators, trained and "
                       "measured on this machine; report.md holds every table.",),
                tables=(Table("Goals", ("goal", "this run", "target", "met"), tuple(goals)),), figures=figures)
    return write_page(os.path.join(q, "index.html"), page)
