"""The gallery of a sampling run: `<output_dir>/gallery.html` (larp.core.gallery), one section per class.

The page shows the first `per_class` samples of each class (by global index; the class of every sample is known
before sampling, so `gallery_indices` does not depend on the shard layout). Only those samples get thumbnails in
gallery/ (`thumbnail_names`), written while they are sampled: the generated clip, the real clip it was drawn for
and, for frame prediction, the still strip of its condition frames. A run of any size writes at most
`per_class` x classes of them. Each time a shard finalizes, `update_gallery` makes the thumbnails still missing
from the samples' mp4s (a finished run rerun with a larger bound) and rebuilds the page from the folder's files;
it reads the outputs and never changes them.
"""
import glob
import json
import os

from larp.core.gallery import Page, Section, Tile, save_strip, save_thumbnail, write_page
from larp.core.io import to_uint8
from larp.data.video_io import read_frames
from larp.models.sampling_params import SAMPLING_FIELDS
from larp.sampling.output_folder import folder_lock, read_csv, run_id
from larp.sampling.overlap import host_copy

GALLERY_DIR = "gallery"
PAGE = "gallery.html"


def thumbnail_names(index):
    """Paths, relative to the output folder, of sample `index`'s thumbnails."""
    return {"fake": f"{GALLERY_DIR}/{index}.webp", "real": f"{GALLERY_DIR}/{index}_real.webp",
            "cond": f"{GALLERY_DIR}/{index}_cond.png"}


def gallery_indices(labels, per_class):
    """The global sample indices the page shows: the first `per_class` of each class. labels[i]: the class of
    sample i (known before sampling: that of the real clip it is drawn for)."""
    seen, shown = {}, set()
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= per_class:
            shown.add(i)
    return frozenset(shown)


def shown_samples(plan, per_class):
    """gallery_indices of a run (a SamplePlan: sample i is drawn for clip plan.chosen[i], whose label it takes)."""
    return gallery_indices([plan.dataset.clips[c][2] for c in plan.chosen], per_class)


def write_thumbnails(out, index, fake_copy, real_copy, j, num_cond):
    """The thumbnails of sample `index` (row j of the host copies of its batch; see larp.sampling.overlap): the
    generated clip and its real clip (see save_thumbnails)."""
    clips = []
    for host, done in (fake_copy, real_copy):
        if done is not None:
            done.synchronize()
        clips.append(to_uint8(host[j:j + 1])[0])  # (T, H, W, 3)
    save_thumbnails(out, index, *clips, num_cond)


def save_thumbnails(out, index, fake, real, num_cond):
    """The thumbnails of sample `index` from its generated and real uint8 clips (T, H, W, 3), the `num_cond`
    condition frames (frame prediction) marked and also shown as a strip. The generated one is written last: the
    page shows a sample once it exists."""
    names = thumbnail_names(index)
    save_thumbnail(os.path.join(out, names["real"]), real, mark=num_cond)
    if num_cond:
        save_strip(os.path.join(out, names["cond"]), real[:num_cond], mark=num_cond)
    save_thumbnail(os.path.join(out, names["fake"]), fake, mark=num_cond)


def fill_thumbnails(out, plan, shown, num_cond):
    """Thumbnails of the shown, finished samples that have none (the run was sampled with a smaller bound, or a
    writer was killed): made from the sample's mp4 and its real clip. Samples without an mp4 (--stats_only) stay
    out of the page. Returns how many were made."""
    made = 0
    for r in read_csv(os.path.join(out, "samples.csv")):
        i, mp4 = int(r["index"]), os.path.join(out, r["path"]) if r["path"] else ""
        if i in shown and mp4 and os.path.exists(mp4) and \
                not os.path.exists(os.path.join(out, thumbnail_names(i)["fake"])):
            real = to_uint8(plan.dataset[plan.chosen[i]]["video"][None])[0]  # (T, H, W, 3), as sampling loaded it
            save_thumbnails(out, i, read_frames(mp4), real, num_cond)
            made += 1
    return made


def _report_row(out, rid):
    rows = [r for r in read_csv(os.path.join(out, "fvd_report.csv")) if r.get("run_id") == rid]
    return rows[-1] if rows else None


def _timing(out):
    """(videos, generation seconds) of the finished ranges: timing.json once the run is covered, else the parts."""
    path = os.path.join(out, "timing.json")
    if os.path.exists(path):
        with open(path) as f:
            t = json.load(f)
        return t["num_videos"], t["generate_s"]
    parts = []
    for p in sorted(glob.glob(os.path.join(out, "parts", "range_*.json"))):
        with open(p) as f:
            parts.append(json.load(f)["timing"])
    return sum(t["num_videos"] for t in parts), sum(t["generate_s"] for t in parts)


def fvd_facts(row, covered, total):
    """The head's FVD lines: value, interval and protocol card of the report row, or how far the run is."""
    if row is None:
        return (("FVD", f"not yet: {covered} of {total} samples finished; computed when the run is covered"),)
    card = json.loads(row["protocol"]) if row.get("protocol") else {}
    ci = card.pop("bootstrap", None)
    interval = (f"[{ci['lo']:.4f}, {ci['hi']:.4f}] ({ci['level']:.0%} percentile bootstrap, {ci['num']} resamples)"
                if ci else "none here: the run keeps feature sums only; eval/compute_fvd.py --bootstrap N on its "
                           "samples gives one")
    return (("FVD", f"{float(row['fvd']):.4f} ({row['detector']})"), ("FVD interval", interval),
            ("protocol", card), ("mean NLL / token", row["mean_nll"]))


def head_facts(out, settings, rows):
    """Everything above the sections: FVD, models, sampling settings, timing."""
    total = settings["num_samples_total"]
    facts = fvd_facts(_report_row(out, run_id(settings)), len(rows), total)
    videos, seconds = _timing(out)
    speed = f"{videos / seconds:.2f} videos/s ({videos} videos in {seconds:.2f} s of generation)" if seconds else \
        "no finished range yet"
    sampling = {k: settings[k] for k in (*SAMPLING_FIELDS, "seed", "dtype", "tokenizer_dtype", "num_samples_total",
                                         "dataset_split_seed") if k in settings}
    if settings["frame_prediction"]:
        sampling.update({k: settings[k] for k in ("num_cond_frames", "paste_cond_frames", "argmax_cond")})
    return facts + (("generator", settings["ar_model"]), ("tokenizer", settings["tokenizer"]),
                    ("real clips", settings["dataset_csv"]), ("sampling", sampling), ("timing", speed))


def class_sections(out, rows, per_class, frame_prediction):
    """One Section per class (by label), with its first `per_class` samples that have thumbnails."""
    by_class = {}
    for r in sorted(rows, key=lambda r: int(r["index"])):
        shown = by_class.setdefault(int(r["label"]), (r["action"], []))[1]
        names = thumbnail_names(r["index"])
        if len(shown) < per_class and os.path.exists(os.path.join(out, names["fake"])):
            shown.append((r, names))
    sections = []
    for label in sorted(by_class):
        action, shown = by_class[label]
        if frame_prediction:
            tiles = tuple(Tile((n["cond"], n["fake"], n["real"]), f"#{r['index']} condition | prediction | real",
                               r["path"]) for r, n in shown)
            groups = (("condition frames (orange border), prediction, real clip", tiles),)
        else:
            groups = (("generated", tuple(Tile((n["fake"],), f"#{r['index']}", r["path"]) for r, n in shown)),
                      ("real clips they were drawn for", tuple(Tile((n["real"],), f"#{r['index']} real")
                                                              for r, n in shown)))
        sections.append(Section(f"{action or 'class'} (label {label})", groups))
    return tuple(sections)


def write_run_gallery(out, settings, per_class):
    """Write (or leave alone, when nothing changed) `<out>/gallery.html`. Returns whether the file changed."""
    rows = read_csv(os.path.join(out, "samples.csv"))
    fp = bool(settings["frame_prediction"])
    links = [(name, name) for name in ("samples.csv", "fvd_report.csv", "timing.json", "run_config.json",
                                       "preview.png") if os.path.exists(os.path.join(out, name))]
    links += [(os.path.basename(p), os.path.basename(p))
              for p in sorted(glob.glob(os.path.join(out, "*_fvd_stats_*.pkl")))]
    notes = [f"{len(rows)} of {settings['num_samples_total']} samples finished. Each class shows its first "
             f"{per_class} samples (click one for its mp4)."]
    if fp:
        notes.append(f"Frame prediction: the first {settings['num_cond_frames']} frames are the condition (orange "
                     f"border); the rest is predicted.")
    page = Page(title=f"Samples of run {run_id(settings)}", facts=head_facts(out, settings, rows),
                links=tuple(links), notes=tuple(notes), sections=class_sections(out, rows, per_class, fp))
    return write_page(os.path.join(out, PAGE), page)


def queue_thumbnails(pool, out, shown, idx, fake_copy, video, num_cond, real_copy=None):
    """Queue on `pool` the thumbnails of the samples `idx` of one batch that the page shows (`shown`).
    `fake_copy` / `real_copy`: host copies of the generated and real clips (larp.sampling.overlap.host_copy); the real
    clips `video` are copied only when a sample is shown. Returns the futures."""
    picked = [(j, i) for j, i in enumerate(idx) if i in shown]
    if picked and real_copy is None:
        real_copy = host_copy(video)
    return [pool.submit(write_thumbnails, out, i, fake_copy, real_copy, j, num_cond) for j, i in picked]


def update_gallery(job, plan):
    """The page of a SampleJob's run (larp.sampling.job): thumbnails that are missing are made first
    (fill_thumbnails), then write_run_gallery runs under the folder's lock, so shards finishing together leave the
    page of the last one. Returns whether the page changed."""
    if job.gallery_per_class <= 0:
        return False
    fill_thumbnails(job.output_dir, plan, shown_samples(plan, job.gallery_per_class),
                    job.num_cond_frames if job.frame_prediction else 0)
    with folder_lock(job.output_dir):
        return write_run_gallery(job.output_dir, plan.settings, job.gallery_per_class)
