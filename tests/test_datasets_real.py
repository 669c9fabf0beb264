"""The real datasets' download and preparation, against a loopback server with archives of the real layout."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from archives import IXI_SUBJECTS, ixi_archives, lpba40_zip, oasis_tar, serve
from regbench.data.download import extract_members, fetch, sha256
from regbench.io import InputError
from regbench.data.prepared import PreparedDataset
from regbench.plugins import load_dataset, load_method

ROOT = Path(__file__).resolve().parents[1]
# train: 1-3; Learn2Reg validation pair 0395->0396; test pairs 0415->0416 and 0416->0417
OASIS_NUMBERS = [1, 2, 3, 395, 396, 415, 416, 417]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The loopback server and the folder it serves (archives are built into it by the tests)."""
    folder = tmp_path_factory.mktemp("mirror")
    url, server = serve(folder)
    yield url, server, folder
    server.shutdown()


@pytest.fixture(scope="module")
def ixi_labels(mirror, tmp_path_factory):
    """IXI-T1.tar, IXI-T2.tar on the mirror; the label maps folder; the T1 archive's md5 (as published)."""
    _, _, folder = mirror
    labels_dir = tmp_path_factory.mktemp("ixi_labels")
    ixi_archives(folder, labels_dir)
    import hashlib

    return labels_dir, "md5:" + hashlib.md5((folder / "IXI-T1.tar").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def oasis_archives(mirror):
    _, _, folder = mirror
    oasis_tar(folder / "neurite-oasis.v1.0.tar", 3, OASIS_NUMBERS)
    oasis_tar(folder / "neurite-oasis.2d.v1.0.tar", 2, OASIS_NUMBERS)
    return folder


def lpba40_labels():
    return list(sys.modules[type(load_dataset("lpba40")).__module__].LABELS["label"])


def test_workflow_downloads_prepares_and_ranks_oasis_3d_2d_lpba40_and_ixi(mirror, oasis_archives, ixi_labels,
                                                                          tmp_path):
    url, server, _ = mirror
    labels_dir, t1_md5 = ixi_labels
    workdir = tmp_path / "run"
    raw = workdir / "data" / "lpba40" / "raw"
    raw.mkdir(parents=True)
    lpba40_zip(raw / "LPBA40_Subjects_Delineation_Space.zip", lpba40_labels(), subjects=range(1, 41))
    (workdir / "real.yaml").write_text(f"""
seed: 0
torch_threads: 1
datasets:
  oasis: {{base_url: "{url}", expected_subjects: {len(OASIS_NUMBERS)}}}
  oasis2d: {{base_url: "{url}", expected_subjects: {len(OASIS_NUMBERS)}}}
  lpba40: {{n_train: 33, n_val: 4}}
  ixi: {{base_url: "{url}", t1_checksum: "{t1_md5}", labels_dir: "{labels_dir}", shape: [40, 48, 40], spacing_mm: 4.0}}
methods:
  identity: {{}}
evaluation:
  runtime_repeats: 1
""")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(ROOT / "Snakefile"),
                             "--directory", str(workdir), "--configfile", str(workdir / "real.yaml")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for dataset, n_pairs in (("oasis", 2), ("oasis2d", 2), ("lpba40", 6), ("ixi", 1)):
        board = pd.read_csv(workdir / "results" / dataset / "leaderboard.csv")
        assert list(board["method"]) == ["identity"] and board.loc[0, "n_pairs"] == n_pairs
        assert 0 < board.loc[0, "dice_mean"] < 1
    # IXI serves each subject's T2 on its T1's grid: the multi-contrast method gets it as its moving image
    ixi = PreparedDataset(workdir / "data" / "ixi" / "prepared")
    assert ixi.contrasts == ["t2"] and ixi.moving_contrast(load_method("ctf_multicontrast")) == "t2"
    assert PreparedDataset(workdir / "data" / "oasis" / "prepared").moving_contrast(load_method("ctf_multicontrast")) is None
    test_pair = ixi.split_pairs("test").iloc[0]
    batch = ixi.pair(test_pair.fixed, test_pair.moving, "t2")
    assert batch["moving"].shape == batch["fixed"].shape == (1, 1, 40, 48, 40)
    assert not torch.equal(batch["moving"], ixi.pair(test_pair.fixed, test_pair.moving)["moving"])
    pairs = pd.read_csv(workdir / "data" / "oasis" / "prepared" / "pairs.csv")
    assert (pairs["intensity_label_mi"] > 0).all()   # each pair's MI(intensity; labels), in bits
    assert pairs[["split", "fixed", "moving"]].values.tolist() == [["val", "OASIS_OAS1_0395_MR1", "OASIS_OAS1_0396_MR1"],
                                     ["test", "OASIS_OAS1_0415_MR1", "OASIS_OAS1_0416_MR1"],
                                     ["test", "OASIS_OAS1_0416_MR1", "OASIS_OAS1_0417_MR1"]]
    subjects = pd.read_csv(workdir / "data" / "oasis" / "prepared" / "subjects.csv")
    assert subjects.groupby("split").size().to_dict() == {"test": 3, "train": 3, "val": 2}
    assert len(pd.read_csv(workdir / "data" / "oasis" / "prepared" / "labels.csv")) == 35
    assert len(pd.read_csv(workdir / "data" / "oasis2d" / "prepared" / "labels.csv")) == 24
    assert len(pd.read_csv(workdir / "data" / "lpba40" / "prepared" / "labels.csv")) == 56
    # only the members used were extracted (aligned_orig is in the archive, not on disk)
    extracted = workdir / "data" / "oasis" / "raw" / "extracted" / "OASIS_OAS1_0001_MR1"
    assert sorted(p.name for p in extracted.iterdir()) == ["aligned_norm.nii.gz", "aligned_seg35.nii.gz"]
    # no checksum is published: the first valid download recorded one
    archive = workdir / "data" / "oasis" / "raw" / "neurite-oasis.v1.0.tar"
    assert (archive.parent / (archive.name + ".sha256")).read_text().split()[0] == sha256(archive)


def test_an_interrupted_download_resumes_where_it_stopped(mirror, tmp_path):
    url, server, folder = mirror
    name = "large.tar"
    (folder / name).write_bytes(np.random.default_rng(0).bytes(600_000))
    server.cut_after = 300_000  # the connection drops after 300 kB
    with pytest.raises(InputError, match="rerun to resume"):
        fetch(url + name, tmp_path / name, progress=False)
    part = tmp_path / (name + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 300_000 and not (tmp_path / name).exists()
    server.requests.clear()
    fetch(url + name, tmp_path / name, progress=False)
    assert server.requests == [("/" + name, f"bytes={kept}-")]  # it asked for the rest only
    assert sha256(tmp_path / name) == sha256(folder / name) and not part.exists()


def test_a_checksum_mismatch_stops_and_keeps_nothing(mirror, oasis_archives, tmp_path):
    url, _, _ = mirror
    name = "neurite-oasis.2d.v1.0.tar"
    with pytest.raises(InputError, match="checksum mismatch"):
        fetch(url + name, tmp_path / name, known_hash="sha256:" + "0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_recorded_checksum_catches_a_changed_file_on_the_server(mirror, tmp_path):
    url, _, folder = mirror
    (folder / "changing.tar").write_bytes(b"first version")
    fetch(url + "changing.tar", tmp_path / "changing.tar", progress=False)
    from regbench.data.download import record_checksum

    record_checksum(tmp_path / "changing.tar")
    (tmp_path / "changing.tar").write_bytes(b"damaged on disk")
    (folder / "changing.tar").write_bytes(b"second version")
    with pytest.raises(InputError, match="checksum mismatch"):
        fetch(url + "changing.tar", tmp_path / "changing.tar", progress=False)
    assert not (tmp_path / "changing.tar").exists()


def test_a_corrupt_archive_is_named_deleted_and_not_taken_as_extracted(mirror, oasis_archives, tmp_path):
    url, _, folder = mirror
    data = (folder / "neurite-oasis.2d.v1.0.tar").read_bytes()
    (folder / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    archive = fetch(url + "truncated.tar", tmp_path / "truncated.tar", progress=False)
    with pytest.raises(InputError, match=r"truncated\.tar: the archive is corrupt or truncated"):
        extract_members(archive, tmp_path / "extracted", lambda name: True)
    assert not archive.exists()  # a rerun downloads it again
    assert not (tmp_path / "extracted" / ".extracted.json").exists()


def test_a_corrupt_nifti_member_is_named(tmp_path):
    source = load_dataset("oasis2d")
    raw = tmp_path / "raw"
    raw.mkdir()
    oasis_tar(raw / "neurite-oasis.2d.v1.0.tar", 2, OASIS_NUMBERS, corrupt="OASIS_OAS1_0395_MR1")
    options = source.resolve_options({"base_url": "http://127.0.0.1:9/", "expected_subjects": len(OASIS_NUMBERS)})
    source.download(raw, options)  # the archive is there: nothing is downloaded
    with pytest.raises(InputError, match=r"OASIS_OAS1_0395_MR1/slice_norm\.nii\.gz: cannot read the volume"):
        source.prepare(raw, tmp_path / "prepared", options)
    assert not (tmp_path / "prepared" / "dataset.json").exists()


def test_a_release_that_differs_is_refused_with_what_differs(tmp_path):
    source = load_dataset("oasis2d")
    raw = tmp_path / "raw"
    raw.mkdir()
    oasis_tar(raw / "neurite-oasis.2d.v1.0.tar", 2, OASIS_NUMBERS)
    options = source.resolve_options({"base_url": "http://127.0.0.1:9/"})  # expects the real 414 subjects
    source.download(raw, options)
    with pytest.raises(InputError, match=r"subjects\.txt: 8 subjects, expected 414"):
        source.prepare(raw, tmp_path / "prepared", options)
    with tarfile.open(raw / "neurite-oasis.2d.v1.0.tar") as tar:
        assert "OASIS_OAS1_0001_MR1/slice_orig.nii.gz" in tar.getnames()


def test_lpba40_missing_says_where_to_get_it_and_where_to_put_it(tmp_path):
    source = load_dataset("lpba40")
    with pytest.raises(InputError) as error:
        source.download(tmp_path / "raw", source.resolve_options({}))
    message = str(error.value)
    assert "resource.loni.usc.edu" in message and "LPBA40_Subjects_Delineation_Space.zip" in message
    assert str((tmp_path / "raw" / "LPBA40_Subjects_Delineation_Space.zip").resolve()) in message


def test_ixi_puts_t1_and_t2_of_a_head_on_one_grid(mirror, ixi_labels, tmp_path):
    url, _, _ = mirror
    labels_dir, t1_md5 = ixi_labels
    source = load_dataset("ixi")
    options = source.resolve_options({"base_url": url, "t1_checksum": t1_md5, "labels_dir": str(labels_dir),
                                      "shape": [40, 48, 40], "spacing_mm": 4.0})
    source.download(tmp_path / "raw", options)
    source.prepare(tmp_path / "raw", tmp_path / "prepared", options)
    subjects = pd.read_csv(tmp_path / "prepared" / "subjects.csv")
    assert list(subjects["subject"]) == IXI_SUBJECTS
    assert subjects["split"].tolist() == ["train"] * 5 + ["val"] + ["test"] * 2
    from regbench.io import load_nifti

    for subject in IXI_SUBJECTS[:2]:
        seg, _ = load_nifti(tmp_path / "prepared" / "segs" / f"{subject}.nii.gz", kind="labels")
        t2, spacing = load_nifti(tmp_path / "prepared" / "images_t2" / f"{subject}.nii.gz")
        assert seg.shape == (40, 48, 40) and spacing == (4.0, 4.0, 4.0)
        # the T2 was made with label = 7 - intensity / 25 on its own (axial, 5 mm) grid: read back through
        # the affines, its parcels coincide with the T1-space label map's
        from_t2 = np.where(t2 > 0.05, np.clip(np.rint(7 - t2 * 6), 1, 6), 0)
        inside = (seg > 0) & (from_t2 > 0)
        assert (from_t2[inside] == seg[inside]).mean() > 0.8  # parcels blur at their borders
        assert ((seg > 0) == (from_t2 > 0)).mean() > 0.95


def test_ixi_without_labels_says_what_to_supply(tmp_path):
    source = load_dataset("ixi")
    with pytest.raises(InputError, match="labels_dir"):
        source.prepare(tmp_path / "raw", tmp_path / "prepared", source.resolve_options({}))


def test_a_complete_part_file_is_finished_without_downloading_it_again(mirror, tmp_path):
    """A ``.part`` holding every byte: the range request past the end gets 416 and the part becomes the file."""
    url, server, folder = mirror
    data = np.random.default_rng(1).bytes(50_000)
    (folder / "complete.tar").write_bytes(data)
    (tmp_path / "complete.tar.part").write_bytes(data)
    server.requests.clear()
    fetch(url + "complete.tar", tmp_path / "complete.tar", progress=False)
    assert server.requests == [("/complete.tar", "bytes=50000-")]
    assert (tmp_path / "complete.tar").read_bytes() == data and not (tmp_path / "complete.tar.part").exists()


def test_a_file_with_its_published_checksum_is_not_downloaded_again(mirror, tmp_path):
    url, server, folder = mirror
    (folder / "kept.tar").write_bytes(b"published bytes")
    import hashlib

    md5 = "md5:" + hashlib.md5(b"published bytes").hexdigest()
    fetch(url + "kept.tar", tmp_path / "kept.tar", known_hash=md5, progress=False)
    server.requests.clear()
    fetch(url + "kept.tar", tmp_path / "kept.tar", known_hash=md5, progress=False)
    assert server.requests == [] and (tmp_path / "kept.tar").read_bytes() == b"published bytes"


def test_extraction_writes_the_wanted_members_once_and_keeps_a_verified_corrupt_archive(tmp_path):
    """Only the members ``wanted`` accepts, with their bytes, names without ``./``; a second call with the same
    archive (size, time) trusts the stamp and writes nothing; a corrupt archive whose checksum matched is kept."""
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("./s1/norm.nii.gz", b"norm"), ("s1/orig.nii.gz", b"orig"), ("s2/norm.nii.gz", b"two")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "extracted"
    members = extract_members(archive, dest, lambda name: name.endswith("norm.nii.gz"))
    assert members == ["s1/norm.nii.gz", "s2/norm.nii.gz"]
    assert (dest / "s1" / "norm.nii.gz").read_bytes() == b"norm" and (dest / "s2" / "norm.nii.gz").read_bytes() == b"two"
    assert not (dest / "s1" / "orig.nii.gz").exists()
    (dest / "s2" / "norm.nii.gz").unlink()
    assert extract_members(archive, dest, lambda name: True) == members   # the stamp: not extracted again
    assert not (dest / "s2" / "norm.nii.gz").exists()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(archive.read_bytes()[:700])
    with pytest.raises(InputError, match="checksum matched"):
        extract_members(broken, tmp_path / "other", lambda name: True, verified=True)
    assert broken.exists()
