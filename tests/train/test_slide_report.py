"""One new slide → its report page, as the README types it, on the README demo's store, checkpoint and
clinical table: heads saved by `evaluate --save-head`, a real Aperio slide encoded with the store's own
encoder and tiling, a slide the store holds read from it (the same text as batch generation gave it), bad
slides refused by name, and the page rendered by headless Chromium (skipped, with the reason, without it)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from store import EmbeddingStore
from tests.readme import run_in_process, to_argv

pytestmark = [pytest.mark.xdist_group("test_slide_report"),  # its module fixture is built once, on one worker
              pytest.mark.timeout(1500)]  # its fixture may wait on the shared README demo run (the lock)

SAVE_SURVIVAL = ("python -m evaluate survival --store STORE --clinical TABLE --head abmil-cox --save-head heads/os "
                 "--out DIR")
SAVE_GRADE = "python -m evaluate grade --store STORE --clinical TABLE --head logreg --save-head heads/grade --out DIR"
SLIDE = ("python -m train.generate --checkpoint runs/r1 --store STORE --slide SLIDE --survival_head heads/os "
         "--grade_head heads/grade [--page_dir DIR]")
SLIDE_ALONE = "python -m train.generate --checkpoint runs/r1 --store STORE --slide SLIDE"


def run(command, cwd, **values):
    result = run_in_process(to_argv(command, values), cwd)
    assert "Traceback" not in result.log, result.log[-3000:]
    return result


@pytest.fixture(scope="module")
def page_run(readme_demo, shared_data, tmp_path_factory):
    """Heads saved from the demo, then the README's --slide command on a real SVS the demo store lacks."""
    cwd = tmp_path_factory.mktemp("slide_report")
    (cwd / "runs").mkdir()
    (cwd / "runs" / "r1").symlink_to(readme_demo.out / "train")
    table = str(readme_demo.out / "clinical.csv")
    for command, out in ((SAVE_SURVIVAL, "cv_os"), (SAVE_GRADE, "cv_grade")):
        result = run(command, cwd, STORE=readme_demo.store, TABLE=table, DIR=out)
        assert result.code == 0, result.log[-2000:]
    slide = shared_data / "wsi" / "aperio" / "CMU-1-Small-Region.svs"
    result = run(SLIDE, cwd, STORE=readme_demo.store, SLIDE=str(slide))
    assert result.code == 0, result.log[-3000:]
    page = cwd / "slide_reports" / "CMU-1-Small-Region"  # the default page folder, in the working directory
    return cwd, page, result, json.loads((page / "report.json").read_text())


@pytest.mark.readme(SAVE_SURVIVAL)
@pytest.mark.readme(SAVE_GRADE)
@pytest.mark.readme(SLIDE)
def test_a_new_slide_is_encoded_as_the_store_and_reported_with_both_heads(page_run, readme_demo):
    cwd, page, result, record = page_run
    store = EmbeddingStore.open(readme_demo.store)
    encoded = EmbeddingStore.open(str(page / "slide_store.zarr"))
    assert record["encoded_now"] and "CMU-1-Small-Region" not in store
    assert encoded.fingerprint == store.fingerprint == record["store_fingerprint"]
    assert encoded.slide_ids() == ["CMU-1-Small-Region"] and record["tiles"] == encoded.slide("CMU-1-Small-Region").n_tiles > 0
    assert record["report"] and record["report"] in result.stdout
    survival, grade = record["predictions"]["survival"], record["predictions"]["grade"]
    assert survival["risk_group"] == ("high" if survival["risk"] > survival["risk_cut"] else "low")
    cut = json.loads((cwd / "heads" / "os" / "head.json").read_text())["risk_cut"]
    assert survival["risk_cut"] == cut and survival["head"] == "abmil-cox"
    assert grade["grade"] == max(grade["probabilities"], key=grade["probabilities"].get)
    assert abs(sum(grade["probabilities"].values()) - 1) < 1e-6
    assert record["heatmap"] and (page / "thumbnail.png").is_file()  # the ABMIL head's attention
    html = (page / "report.html").read_text()
    assert record["report"].split()[0] in html and "abmil-cox" in html and store.fingerprint[:12] in html
    assert "data:image/png;base64," in html  # self-contained: the picture is inlined
    provenance = json.loads((page / "report.json").read_text())["provenance"]
    assert provenance["code_version"] and provenance["config"]["survival_head"] == "heads/os"


def test_chromium_renders_the_report_and_the_heatmap(page_run, tmp_path):
    """Before the runs below rewrite the page: the first run's, with both heads and the attention heatmap."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`)")
    from PIL import Image

    page, record = page_run[1], page_run[3]
    url = (page / "report.html").as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert record["report"].split("\n")[0][:40] in dom.stdout and 'id="thumbnail"' in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,1000", url], capture_output=True,
                   timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    thumbnail_area = pixels[120:480, 40:500]  # inside the 512 px image column, below the title
    not_white = (np.abs(thumbnail_area - 255).sum(-1) > 60).mean()
    assert not_white > 0.3 and thumbnail_area.std() > 10, f"thumbnail area {not_white:.0%} painted"


def test_a_second_run_reuses_the_slide_encoded_by_the_first(page_run, readme_demo):
    cwd, page, _, first = page_run
    slide = first["slide"]
    result = run(SLIDE_ALONE + " --page_dir DIR", cwd, STORE=readme_demo.store, SLIDE=slide, DIR=str(page))
    assert result.code == 0, result.log[-2000:]
    again = json.loads((page / "report.json").read_text())
    assert not again["encoded_now"] and "encoded into" in result.stdout and again["report"] == first["report"]
    assert again["predictions"] == {} and not again["heatmap"]  # no heads: the stored thumbnail alone


def test_a_slide_the_store_holds_is_read_from_it_and_answers_as_batch_generation(page_run, readme_demo):
    cwd = page_run[0]
    held_out = [json.loads(line) for line in (readme_demo.out / "reports_heldout.jsonl").read_text().splitlines()]
    row = held_out[0]
    path = next((readme_demo.out / "slides").rglob(f"{row['slide']}.*"))
    result = run(SLIDE_ALONE, cwd, STORE=readme_demo.store, SLIDE=str(path))
    assert result.code == 0, result.log[-2000:]
    record = json.loads((cwd / "slide_reports" / row["slide"] / "report.json").read_text())
    assert not record["encoded_now"] and not (cwd / "slide_reports" / row["slide"] / "slide_store.zarr").exists()
    assert record["report"] == row["text"]  # the same tiles, prompt and greedy decoding as train.generate --meta_path


@pytest.mark.parametrize("name", ["broken-random-ascii.svs", "unreadable.svs", "missing.svs"])
def test_a_bad_slide_is_refused_by_name(page_run, readme_demo, shared_data, name, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(readme_demo.out / "train")
    path = shared_data / "wsi" / "bad_inputs" / name
    result = run(SLIDE_ALONE, tmp_path, STORE=readme_demo.store, SLIDE=str(path))
    assert result.code == 2 and name in result.stderr, result.log[-2000:]
    assert not (tmp_path / "slide_reports" / path.stem / "report.html").exists()


def test_a_file_named_like_a_stored_slide_is_encoded_itself_not_taken_for_it(page_run, readme_demo, tmp_path):
    """Slides are known by content: another patient's slide under a stored slide's name gets its own tiles
    (not the stored slide's), and so does a third file of that name whose page folder caches the second."""
    cwd = page_run[0]
    held_out = [json.loads(line) for line in (readme_demo.out / "reports_heldout.jsonl").read_text().splitlines()]
    named = held_out[0]
    impostor = next(row for row in held_out if row["text"] != named["text"])
    third = next(row for row in held_out if row["text"] not in (named["text"], impostor["text"]))
    slides = readme_demo.out / "slides"
    source = next(slides.rglob(f"{impostor['slide']}.*"))
    fake = tmp_path / "elsewhere" / f"{named['slide']}{source.suffix}"
    fake.parent.mkdir()
    shutil.copy(source, fake)
    result = run(SLIDE_ALONE + " --page_dir DIR", cwd, STORE=readme_demo.store, SLIDE=str(fake), DIR="page")
    assert result.code == 0, result.log[-2000:]
    record = json.loads((cwd / "page" / "report.json").read_text())
    assert record["encoded_now"] and "holds another reading of" in result.stdout, result.stdout[-2000:]
    stored = EmbeddingStore.open(readme_demo.store)
    assert record["tiles"] == stored.slide(impostor["slide"]).n_tiles
    assert record["report"] == impostor["text"]  # the impostor's own tiles, read and encoded anew

    shutil.copy(next(slides.rglob(f"{third['slide']}.*")), fake)  # same name, same page folder, other content
    result = run(SLIDE_ALONE + " --page_dir DIR", cwd, STORE=readme_demo.store, SLIDE=str(fake), DIR="page")
    assert result.code == 0, result.log[-2000:]
    record = json.loads((cwd / "page" / "report.json").read_text())
    assert record["encoded_now"] and "replacing it" in result.stdout, result.stdout[-2000:]
    assert record["tiles"] == stored.slide(third["slide"]).n_tiles and record["report"] == third["text"]


def test_a_slide_without_mpp_is_refused_with_a_fix_that_works(page_run, readme_demo, tmp_path):
    """The error names --mpp-override, and train.generate takes it (the page's provenance records it)."""
    import tifffile

    cwd = page_run[0]
    row = json.loads((readme_demo.out / "reports_heldout.jsonl").read_text().splitlines()[0])
    source = next((readme_demo.out / "slides").rglob(f"{row['slide']}.*"))
    stored = EmbeddingStore.open(readme_demo.store).slide(row["slide"])
    bare = tmp_path / f"{row['slide']}-bare.tiff"  # the same pixels, no resolution tags
    with tifffile.TiffWriter(bare) as tif:
        tif.write(tifffile.imread(source, level=0), photometric="rgb", tile=(256, 256), compression="jpeg")
    result = run_in_process(to_argv(SLIDE_ALONE, {"STORE": readme_demo.store, "SLIDE": str(bare)}), cwd)
    assert result.code == 2 and "--mpp-override" in result.stderr and "Traceback" not in result.log, result.log[-2000:]
    result = run(SLIDE_ALONE + " --mpp-override X", cwd, STORE=readme_demo.store, SLIDE=str(bare),
                 X=str(stored.attrs["mpp"]))
    assert result.code == 0, result.log[-2000:]
    record = json.loads((cwd / "slide_reports" / bare.stem / "report.json").read_text())
    assert record["encoded_now"] and record["tiles"] > 0
    first_tiles = record["tiles"]
    assert record["provenance"]["config"]["mpp_override"] == stored.attrs["mpp"]
    again = run(SLIDE_ALONE + " --mpp-override X", cwd, STORE=readme_demo.store, SLIDE=str(bare),
                X=str(stored.attrs["mpp"]))  # the same reading: reused
    assert not json.loads((cwd / "slide_reports" / bare.stem / "report.json").read_text())["encoded_now"], again.stdout
    other = run(SLIDE_ALONE + " --mpp-override X", cwd, STORE=readme_demo.store, SLIDE=str(bare),
                X=str(1.5 * stored.attrs["mpp"]))  # another pixel size: not the cached reading
    assert "--mpp-override is" in other.stdout and "replacing it" in other.stdout, other.stdout[-2000:]
    record = json.loads((cwd / "slide_reports" / bare.stem / "report.json").read_text())
    assert record["encoded_now"] and record["tiles"] > first_tiles  # larger pixels: more tissue at 0.5 µm/px


def test_a_cpu_run_prints_only_its_own_lines_on_stderr(page_run, readme_demo, tmp_path):
    """No library noise (cuFile, libcuda, deprecation warnings between our pinned packages) around the report:
    a new process, as the user runs it, on a slide that is encoded on this CPU."""
    from tests.readme import run_subprocess

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(readme_demo.out / "train")
    row = json.loads((readme_demo.out / "reports_heldout.jsonl").read_text().splitlines()[1])
    slide = tmp_path / "copy" / f"{row['slide']}-copy.tiff"
    slide.parent.mkdir()
    shutil.copy(next((readme_demo.out / "slides").rglob(f"{row['slide']}.*")), slide)
    result = run_subprocess(to_argv(SLIDE_ALONE, {"STORE": readme_demo.store, "SLIDE": str(slide)}), tmp_path,
                            env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert result.code == 0, result.log[-3000:]
    foreign = [line for line in result.stderr.splitlines()
               if line.strip() and not line.startswith(("[extract]", "[slide]", "warning: "))]
    assert not foreign, "\n".join(foreign)
    noise = [line for line in result.stdout.splitlines() if "cuda" in line.lower() or "cufile" in line.lower()]
    assert not noise, "\n".join(noise)  # cuCIM prints on stdout when torch is loaded in a reader process
    assert not (tmp_path / "cufile.log").exists()
