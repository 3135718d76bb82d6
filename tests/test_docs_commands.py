"""Every shell command shown in README.md, BENCHMARKS.md and docs/*.md is checked against the code (how:
tools/docs_commands.py): the entry point exists, every flag shown is in its --help (or read by the shell script),
every variable set in front of a script is read by it. The commands that finish offline in seconds run: every `--help`, the synthetic
set (with tiny sizes), the oracle on it, and `make_csv check` on a tiny fake tree. The README's Python snippet runs
on the tiny golden models. `python tools/docs_commands.py FILE.md` checks any other file (e.g. an older README)."""
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tools.docs_commands import DOC_FILES, ROOT, check_files, code_blocks, entry_argv, extract, run


def with_values(args, values):
    """`args` with the value after each flag of `values` replaced (the flag appended when `args` lacks it)."""
    out, values = list(args), dict(values)
    for k, v in values.items():
        if k in out:
            out[out.index(k) + 1] = str(v)
        else:
            out += [k, str(v)]
    return out


def runnable(commands, tmp):
    """(command, argv) for the documented commands that finish offline in seconds."""
    synthetic = tmp / "synthetic"
    fake_csv = tmp / "fake.csv"
    plans = []
    for c in commands:
        target = c.target
        if "--help" in c.args or "-h" in c.args:
            plans.append((c, entry_argv(c.kind, c.target) + tuple(a for a in c.args if a in ("--help", "-h"))))
        elif c.kind == "mod" and target == "larp.data.synthetic":
            args = with_values(c.args, {"--out": synthetic, "--classes": 4, "--videos-per-class": 4, "--frames": 8,
                                          "--size": 32, "--val-fraction": 0.25})
            plans.append((c, entry_argv("mod", target) + tuple(args)))
        elif c.kind == "mod" and target == "larp.data.oracle":
            flags_shown = c.args[1:]  # the documented flags, on the tiny set (4 classes) instead of the CSV shown
            plans.append((c, entry_argv("mod", target) + (str(synthetic / "val.csv"),)
                          + tuple(with_values(flags_shown, {"--num-classes": 4}))))
        elif c.kind == "mod" and target == "larp.data.make_csv" and c.args[:1] == ["check"]:
            plans.append((c, entry_argv("mod", target) + ("check", str(fake_csv))))
    return plans


def fake_tree(tmp):
    """A one-video tree and its CSV, for `make_csv check`."""
    video = tmp / "videos" / "Walk" / "v_Walk_g01_c01.avi"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"not read by check")
    (tmp / "fake.csv").write_text(f"id,path,action,label\n0,{video},Walk,0\n")


def test_every_documented_command_matches_the_code(tmp_path):
    count, problems = check_files(DOC_FILES)
    print(f"{count} documented commands checked")
    assert count >= 40, f"only {count} commands found in README.md, BENCHMARKS.md and docs/*.md"
    assert not problems, f"{len(problems)} of {count} commands disagree with the code:\n" + "\n".join(problems)


def test_offline_commands_run(tmp_path):
    commands = [c for p in DOC_FILES for c in extract(p)]
    fake_tree(tmp_path)
    plans = runnable(commands, tmp_path)
    kinds = {(c.target, "help" if "--help" in c.args or "-h" in c.args else "run") for c, _ in plans}
    print(f"{len(plans)} documented commands run")
    for needed in [("larp.data.synthetic", "run"), ("larp.data.oracle", "run"), ("larp.data.make_csv", "run")]:
        assert needed in kinds, f"the docs no longer show {needed[0]}; this test runs it"
    # the synthetic set first (the oracle reads it), the rest in parallel
    first = [p for p in plans if p[0].target == "larp.data.synthetic"]
    rest = [p for p in plans if p[0].target != "larp.data.synthetic"]
    failures = []
    for c, argv in first:
        rc, out = run(tuple(argv))
        if rc:
            failures.append(f"{c.source}: `{c.text}` -> exit {rc}: {out.strip()[-300:]}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        for (c, argv), (rc, out) in zip(rest, pool.map(lambda p: run(tuple(p[1])), rest)):
            if rc:
                failures.append(f"{c.source}: `{c.text}` -> exit {rc}: {out.strip()[-300:]}")
    assert not failures, "\n".join(failures)


GOLDEN = ROOT / "tests" / "fixtures" / "reference" / "golden" / "tiny"


def readme_snippet():
    """The README's Python sampling snippet (the block that writes a GIF)."""
    blocks = [body for lang, body in code_blocks((ROOT / "README.md").read_text()) if lang == "python"]
    gif = [b for b in blocks if "save_video_grid_gif" in b]
    assert len(gif) == 1, "README.md should show one Python snippet that writes a GIF"
    return gif[0]


@pytest.mark.parametrize("order", ["raster", "nar"])
def test_readme_snippet_writes_a_gif(order, tmp_path):
    """The snippet, with the released hub ids replaced by the tiny golden models of the same layout."""
    code = readme_snippet()
    for hub_id, local in [("hywang66/LARP-L-long-tokenizer", GOLDEN / "tokenizer"),
                          ("hywang66/LARP-L-long-AR", GOLDEN / order), ("samples.gif", tmp_path / "samples.gif")]:
        assert f'"{hub_id}"' in code, f"the README snippet no longer uses {hub_id}"
        code = code.replace(f'"{hub_id}"', repr(str(local)))
    namespace = {}
    exec(compile(code, "README.md snippet", "exec"), namespace)
    assert tuple(namespace["tokens"].shape) == (4, 32)   # the tiny models' 2x4x4 grid
    with Image.open(tmp_path / "samples.gif") as gif:
        assert gif.n_frames == namespace["video"].shape[2] > 1


BROKEN = """
```bash
bash set_datasets.sh --ucf101 /d/UCF-101 --ucf101-splits /d/ucfTrainTestlist
python -m larp.data.make_csv k600 --root data/k600 [--train-split train] [--val-split val]
python -m larp.data.make_csv kinetics --root data/k600
python sample.py --ar_model a --tokenizer b --output_dir o --fp
UCF101_SPLIT=2 bash set_datasets.sh --ucf101 /d/UCF-101
python nowhere.py --x
```
and inline: `bash scripts/quickstart.sh --frash`.
"""


def test_the_checker_finds_wrong_commands(tmp_path):
    """Each kind of drift the docs once had is caught: an argument a script does not read, flags a subcommand
    lacks, an unknown subcommand, a flag of the reference's CLI, an environment variable nobody reads, a missing
    file, a typo in a flag forwarded to a module."""
    doc = tmp_path / "broken.md"
    doc.write_text(BROKEN)
    count, problems = check_files([doc])
    assert count == 7
    text = "\n".join(problems)
    for expected in ["--ucf101-splits is not read by set_datasets.sh", "--train-split is not an option of",
                     "--val-split is not an option of", "kinetics is not a subcommand", "--fp is not an option",
                     "UCF101_SPLIT is not read by set_datasets.sh", "nowhere.py does not exist",
                     "--frash is not read by scripts/quickstart.sh"]:
        assert expected in text, f"not caught: {expected}\n{text}"


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_every_relative_link_and_anchor_exists():
    """Links between README.md, BENCHMARKS.md and docs/ point at files that exist and at headings (or explicit
    anchors) they hold."""
    bad = []
    for doc in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                text = dest.read_text()
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
                anchors |= set(re.findall(r'<a id="([^"]+)">', text))
                if anchor not in anchors:
                    bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)
