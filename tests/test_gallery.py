"""The gallery page of a sampling run (larp.core.gallery, larp.sampling.run_gallery): opened from file:// in headless
Chromium (tools/browser.py), every image on it loads, the class names and the FVD are shown, the screenshot is not
blank; names from the data are shown as text; a rerun that changes nothing rewrites nothing.

Without a `chromium` binary the browser tests are skipped, except under CI=true where they fail (.ci/run installs
it)."""
import os
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from larp.core.gallery import Page, Section, Tile, render_page, write_if_changed
from larp.quickstart import report as quickstart_report
from larp.quickstart.index_page import write_index
from larp.sampling.run_gallery import gallery_indices
from tests.test_sample_fp import fp_model  # noqa: F401 (a fixture)
from tests.conftest import GOLDEN
from tests.test_sample_sharding import run
from tools.browser import LOAD_ALL_IMAGES, Browser, find_chromium

HOSTILE = '<script>document.title="ran"</script> & "red"'  # the name of class 0
PER_CLASS = 2


@pytest.fixture(scope="module")
def named_csv(tmp_path_factory):
    """The synthetic set of 4 classes, class 0 renamed HOSTILE."""
    from larp.data.synthetic import make_synthetic_dataset
    train_csv, _ = make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), classes=4, videos_per_class=4,
                                          frames=8, size=32, progress=False)
    df = pd.read_csv(train_csv)
    df.loc[df["label"] == 0, "action"] = HOSTILE
    df.to_csv(train_csv, index=False)
    return train_csv


@pytest.fixture(scope="module")
def class_run(named_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery") / "cc"
    fvd = run(named_csv, out, gallery_per_class=PER_CLASS)
    return str(out), fvd


@pytest.fixture(scope="module")
def fp_run(named_csv, fp_model, tmp_path_factory):  # noqa: F811 (fp_model: the fixture imported above)
    out = tmp_path_factory.mktemp("gallery") / "fp"
    fvd = run(named_csv, out, ar=fp_model, frame_prediction=True, num_cond_frames=3, cfg_scale=1.0, num_samples=4,
              sample_batch_size=2)
    return str(out), fvd


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no chromium on PATH: the gallery's browser tests need it (.ci/run installs it)")
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    with Browser() as b:
        yield b


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("src", "href")]


def targets(page_path):
    parser = Links()
    parser.feed(open(page_path).read())
    return parser.targets


def look(browser, page_path, shot_path):
    """Open the page, load every image on it, take a screenshot: (what the page reports, load seconds)."""
    seconds = browser.open(page_path)
    seen = browser.evaluate(LOAD_ALL_IMAGES)
    browser.screenshot(str(shot_path))
    return seen, seconds


def broken(seen):
    return [i["src"] for i in seen["images"] if not i["loaded"]] + [v["src"] for v in seen["videos"] if v["error"]]


def not_blank(png):
    """A screenshot with content: many colours and spread-out grey levels, not one flat page."""
    a = np.asarray(Image.open(png).convert("RGB"))
    return a.reshape(-1, 3).std(0).mean() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_class_conditional_gallery_in_chromium(class_run, browser, tmp_path):
    out, fvd = class_run
    page = os.path.join(out, "gallery.html")
    seen, _ = look(browser, page, tmp_path / "shot.png")
    rows = pd.read_csv(os.path.join(out, "samples.csv"))
    assert len(seen["images"]) == 2 * PER_CLASS * rows["label"].nunique()  # generated and real, bounded per class
    assert not broken(seen), f"images that did not load: {broken(seen)}"
    for name in rows["action"].unique():
        assert name in seen["text"]  # the hostile one too, as text
    assert f"{fvd:.4f}" in seen["text"]
    assert seen["scripts"] == 0 and seen["title"].startswith("Samples of run")
    assert not_blank(tmp_path / "shot.png")


@pytest.mark.slow
def test_frame_prediction_gallery_in_chromium(fp_run, browser, tmp_path):
    out, fvd = fp_run
    seen, _ = look(browser, os.path.join(out, "gallery.html"), tmp_path / "shot.png")
    conds = [i for i in seen["images"] if i["src"].endswith("_cond.png")]
    assert len(conds) == 4 and len(seen["images"]) == 12  # condition strip, prediction, real clip of 4 samples
    assert not broken(seen), f"images that did not load: {broken(seen)}"
    assert "first 3 frames are the condition" in seen["text"] and f"{fvd:.4f}" in seen["text"]
    assert not_blank(tmp_path / "shot.png")


@pytest.mark.slow
def test_tokenizer_gallery_in_chromium(named_csv, browser, tmp_path):
    """eval/eval_larp_tokenizer.py: each clip beside its reconstruction, with the metrics."""
    from tests.test_tokenizer import _eval_module
    ev, out = _eval_module(), tmp_path / "eval"
    metrics = ev.main(ev.get_args(["--tokenizer", str(GOLDEN / "tokenizer"), "--dataset_csv", named_csv, "--det",
                                   "--no_fvd", "--clips", "all", "--max_clips", "4", "--num_preview", "3",
                                   "--device", "cpu",
                                   "--out", str(out)]))
    seen, _ = look(browser, out / "gallery.html", tmp_path / "shot.png")
    assert [i["src"] for i in seen["images"]] == [f"gallery/{i}_{k}.webp" for i in range(3) for k in ("input", "recon")]
    assert not broken(seen), f"images that did not load: {broken(seen)}"
    assert f"{metrics['psnr']:.6g}" in seen["text"] and "input | reconstruction" in seen["text"]
    assert not_blank(tmp_path / "shot.png")


def fabricated_quickstart(q, sample_run):
    """A quickstart folder with what index.html shows: both generators' sample folders (copies of `sample_run`), a
    tokenizer gallery, curves, previews; the goals of made-up measurements. Returns the goal rows."""
    from larp.core.gallery import write_page
    from larp.core.visualize import save_curves_png, save_video_grid_gif
    for order in ("nar", "raster"):
        shutil.copytree(sample_run, q / "samples" / f"{order}_seed0")
    write_page(str(q / "eval_tokenizer" / "gallery.html"), Page(title="tokenizer"))
    save_curves_png([("loss", {"train": ([0, 1, 2], [3.0, 2.0, 1.5])}, None)], str(q / "training_curves.png"))
    clips = np.random.default_rng(0).random((4, 3, 4, 8, 8))
    for order in ("nar", "raster"):
        save_video_grid_gif(clips, str(q / f"preview_{order}.gif"), nrow=2)
    stats = {"spread": {"real videos (val)": 0.1, "NAR samples, seed 0": 0.09}, "nearest_train":
             {"real videos (val)": 0.05, "NAR samples, seed 0": 0.06}}
    kept = {"nar": {"val_loss": 3.0, "lowest": 3.0}, "raster": {"val_loss": 3.3, "lowest": 3.0}}
    return quickstart_report.goal_rows({"nar": {0: 0.96}, "raster": {0: 0.91}}, kept, stats, 1.5, 5.0, 600)


@pytest.mark.slow
def test_quickstart_index_in_chromium(class_run, browser, tmp_path):
    q = tmp_path / "quickstart"
    goals = fabricated_quickstart(q, class_run[0])
    galleries = quickstart_report.gallery_links(str(q), lambda o, s: str(q / "samples" / f"{o}_seed{s}"), 0)
    assert [p for _, p in galleries] == ["eval_tokenizer/gallery.html", "samples/nar_seed0/gallery.html",
                                         "samples/raster_seed0/gallery.html"]
    assert any("(samples/nar_seed0/gallery.html)" in line for line in quickstart_report.gallery_lines(galleries))
    assert write_index(str(q), goals, galleries) and not write_index(str(q), goals, galleries)
    seen, _ = look(browser, q / "index.html", tmp_path / "shot.png")
    assert [i["src"] for i in seen["images"]] == ["training_curves.png", "preview_nar.gif", "preview_raster.gif"]
    assert not broken(seen), f"images that did not load: {broken(seen)}"
    assert all(name in seen["text"] for name, *_ in goals) and "within-class spread" in seen["text"]
    assert set(seen["links"]) == {"report.md", *(p for _, p in galleries)}
    assert all(os.path.exists(q / p) for _, p in galleries)
    assert not_blank(tmp_path / "shot.png")


@pytest.mark.slow
def test_a_missing_thumbnail_is_reported(class_run, browser, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(class_run[0], copy)  # relative links: the copied folder works as it is
    first = sorted(os.listdir(copy / "gallery"))[0]
    os.remove(copy / "gallery" / first)
    seen, _ = look(browser, copy / "gallery.html", tmp_path / "shot.png")
    assert broken(seen) == [f"gallery/{first}"]


@pytest.mark.slow
def test_links_are_relative_and_resolve(class_run):
    out = class_run[0]
    found = targets(os.path.join(out, "gallery.html"))
    assert any(t.endswith(".mp4") for t in found) and "samples.csv" in found and "fvd_report.csv" in found
    assert any(re.match(r"generated_fvd_stats_\d+_\d+\.pkl$", t) for t in found)
    for t in found:
        assert "://" not in t and not t.startswith("/"), t
        assert os.path.exists(os.path.join(out, t)), t


@pytest.mark.slow
def test_names_from_the_data_are_escaped(class_run):
    text = open(os.path.join(class_run[0], "gallery.html")).read()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;document.title=&quot;ran&quot;&lt;/script&gt; &amp; &quot;red&quot;" in text


@pytest.mark.slow
def test_a_rerun_that_changes_nothing_rewrites_nothing(named_csv, class_run):
    out, _ = class_run
    page = os.path.join(out, "gallery.html")
    before = os.stat(page)
    run(named_csv, out, gallery_per_class=PER_CLASS)  # finds the run finished
    after = os.stat(page)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_page_shows_the_first_samples_of_each_class():
    assert gallery_indices([0, 1, 0, 0, 1, 2, 2, 2], 2) == {0, 1, 2, 4, 5, 6}
    assert gallery_indices([0, 1, 0], 0) == set()


def test_a_negative_bound_is_one_line():
    from larp.core.errors import SampleError
    from larp.sampling.job import SampleJob
    with pytest.raises(SampleError, match=r"^--gallery_per_class -1: expected a number of samples >= 0$"):
        SampleJob(ar_model="a", tokenizer="t", output_dir="o", gallery_per_class=-1)


@pytest.mark.slow
def test_a_larger_bound_on_a_finished_run_fills_in_thumbnails(named_csv, class_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(class_run[0], copy)
    before = set(os.listdir(copy / "gallery"))
    run(named_csv, copy, gallery_per_class=PER_CLASS + 1)  # finds the run finished: no sampling, more thumbnails
    rows = pd.read_csv(copy / "samples.csv").sort_values("index")
    want = set(rows.groupby("label").head(PER_CLASS + 1)["index"])
    assert before < set(os.listdir(copy / "gallery")) == {f"{i}{k}.webp" for i in want for k in ("", "_real")}
    shown = re.findall(r'src="gallery/(\d+)\.webp"', open(copy / "gallery.html").read())
    assert sorted(map(int, shown)) == sorted(want)


def test_write_if_changed(tmp_path):
    path = str(tmp_path / "page.html")
    assert write_if_changed(path, "a")
    assert not write_if_changed(path, "a")
    assert write_if_changed(path, "b") and open(path).read() == "b"


def test_render_escapes_every_text_and_link():
    page = Page(title="<b>t</b>", facts=(("k<", {"x": "<i>"}),), links=(("<a>", 'a"b#c.csv'),),
                sections=(Section("<script>x</script>", (("g<", (Tile(("p?q.webp",), "<c>", "v#1.mp4"),)),)),))
    text = render_page(page)
    assert "<script" not in text and "<b>" not in text and "<i>" not in text and "<c>" not in text
    assert 'href="a%22b%23c.csv"' in text and 'src="p%3Fq.webp"' in text and 'href="v%231.mp4"' in text
    assert render_page(page) == text
