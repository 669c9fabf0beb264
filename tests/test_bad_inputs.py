"""Every file a user supplies is checked: one row per kind of bad input, the step that reads it, and the one error
it gets. Each error must name the file and the problem, and the failed step must leave nothing behind that a
rerun could take as done, nor touch what was computed before.

Entry points, as the workflow calls them: a dataset plugin preparing a release (OASIS 2D, neurite's layout) or
unpacking its archive; a prepared dataset folder (any plugin's output, or one a user made); the `external` method
scoring a folder of Learn2Reg displacement files; the config, checked before any job starts.
"""
import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from archives import parcellation
from regbench.workflow.config import ConfigError, check_config
from regbench.data.prepared import PreparedDataset
from regbench.dataset import write_arrays, write_prepared
from regbench.data.download import extract_members
from regbench.evaluation.scoring import evaluate_method
from regbench.io import InputError, save_nifti
from regbench.learn2reg import write_displacement
from regbench.plugins import load_dataset, load_method

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "schema.yaml"

# ------------------------------------------------------------------ what the rows start from: valid inputs

OASIS_SUBJECTS = ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0415_MR1", "OASIS_OAS1_0416_MR1"]
FIRST = OASIS_SUBJECTS[0]  # subjects are prepared in order: a bad file here fails before anything else is read
SHAPE_2D = (160, 192)


def nifti(path: Path, array, zooms=None, affine=None) -> Path:
    """Write a NIfTI as a release would (the test's own writer: it may write what the benchmark never would)."""
    image = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    if zooms is not None:
        image.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def oasis_release(raw: Path) -> Path:
    """A neurite-oasis 2D release (slices stored X x Y x 1) with two training subjects and the test pair
    0415 -> 0416: its archive and its ``extracted/`` folder, as ``download`` leaves them for ``prepare``."""
    extracted = raw / "extracted"
    extracted.mkdir(parents=True)
    (extracted / "subjects.txt").write_text("\n".join(OASIS_SUBJECTS) + "\n")
    (extracted / "seg24_labels.txt").write_text("0 Unknown\n" + "".join(f"{v} Structure-{v}\n" for v in range(1, 25)))
    for index, subject in enumerate(OASIS_SUBJECTS):
        seg = parcellation(SHAPE_2D, range(1, 25), seed=index)
        image = ((seg > 0) * (0.3 + 0.02 * seg)).astype(np.float32)
        nifti(extracted / subject / "slice_norm.nii.gz", image[..., None])
        nifti(extracted / subject / "slice_seg24.nii.gz", seg[..., None])
    with tarfile.open(raw / "neurite-oasis.2d.v1.0.tar", "w") as tar:
        for path in sorted(extracted.rglob("*.*")):
            tar.add(path, arcname=str(path.relative_to(extracted)))
    return raw


def prepared_dataset(root: Path) -> Path:
    """A small prepared dataset: five 16 x 16 subjects (three train, two test), two labels, one test pair."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        image = rng.random((16, 16)).astype(np.float32)
        seg = (image > 0.4).astype(np.int16) + (image > 0.7)
        save_nifti(root / "images" / f"n{i}.nii.gz", image, (1, 1))
        save_nifti(root / "segs" / f"n{i}.nii.gz", seg, (1, 1))
        rows.append({"subject": f"n{i}", "split": "train" if i < 3 else "test", "image": f"images/n{i}.nii.gz",
                     "seg": f"segs/n{i}.nii.gz"})
    write_prepared(root, name="tiny", ndim=2, shape=(16, 16), spacing=(1, 1), subjects=pd.DataFrame(rows),
                   labels=pd.DataFrame({"label": [1, 2], "name": ["grey", "bright"]}),
                   pairs=pd.DataFrame({"split": ["test"], "fixed": ["n3"], "moving": ["n4"]}))
    return root


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Valid inputs, built once; every row works on its own copy."""
    base = tmp_path_factory.mktemp("valid")
    oasis_release(base / "oasis_raw")
    prepared_dataset(base / "prepared")
    return base


# ------------------------------------------------------------------ the steps that read them

def prepare_oasis(raw: Path) -> Callable[[], None]:
    def step():
        source = load_dataset("oasis2d")
        source.prepare(raw, raw.parent / "oasis_prepared", source.resolve_options({"expected_subjects": 4}))
    return step


def evaluate_external(work: Path, folder: Path) -> Callable[[], None]:
    def step():
        external = load_method("external")
        evaluate_method(external, external.recipe("quick", {"folder": str(folder)}),
                        PreparedDataset(work / "prepared"), work / "results", runtime_repeats=1)
    return step


def read_prepared(work: Path) -> Callable[[], None]:
    def step():
        dataset = PreparedDataset(work / "prepared")
        dataset.pair("n3", "n4")  # the volumes are read and checked when a pair is first used
    return step


def check_config_file(path: Path) -> Callable[[], None]:
    def step():
        check_config(yaml.safe_load(path.read_text()), source=str(path), schema=SCHEMA)
    return step


# ------------------------------------------------------------------ one row per kind of bad input

class Case(NamedTuple):
    kind: str
    make: Callable[[Path], tuple[Callable[[], None], Path]]  # work folder -> (step, the bad file)
    problem: str  # regular expression of the problem, after the file's name


def oasis_file(name: str, change: Callable[[Path], object]):
    """A release whose ``FIRST/name`` (``slice_norm.nii.gz`` or ``slice_seg24.nii.gz``) is replaced by ``change``."""
    def make(work):
        raw = work / "oasis_raw"
        path = raw / "extracted" / FIRST / name
        change(path)
        return prepare_oasis(raw), path
    return make


def oasis_volume(name: str, array=None, **header):
    def change(path):
        good = np.asanyarray(nib.load(str(path)).dataobj)
        nifti(path, good if array is None else array(good), **header)
    return oasis_file(name, change)


def damage_voxel_size(path: Path) -> None:
    """The header's second voxel size (pixdim[2], bytes 84-87 of a NIfTI-1 header) becomes NaN."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", data, 84, float("nan"))
    path.write_bytes(gzip.compress(bytes(data)))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def layout_one(info: Path) -> None:
    """The folder as preparation wrote it before the arrays: no arrays/, no layout in dataset.json."""
    shutil.rmtree(info.parent / "arrays")
    record = json.loads(info.read_text())
    del record["layout"]
    info.write_text(json.dumps(record))


def release_listing(work):
    raw = work / "oasis_raw"
    shutil.rmtree(raw / "extracted" / FIRST)
    return prepare_oasis(raw), raw / "extracted" / FIRST / "slice_norm.nii.gz"


def corrupt_archive(work):
    archive = work / "oasis_raw" / "neurite-oasis.2d.v1.0.tar"
    truncate(archive)
    return (lambda: extract_members(archive, work / "extracted", lambda name: True)), archive


def escaping_archive(work):
    archive = work / "LPBA40_Subjects_Delineation_Space.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("LPBA40/../../outside.hdr", b"x")
    return (lambda: extract_members(archive, work / "extracted", lambda name: True)), archive


def prepared_file(relative: str, change: Callable[[Path], object]):
    def make(work):
        path = work / "prepared" / relative
        change(path)
        return read_prepared(work), path
    return make


def prepared_volume(relative: str, change: Callable[[Path], object]):
    """A volume of the prepared folder changed, then the folder's arrays written again (preparation's last step)."""
    def make(work):
        path = work / "prepared" / relative
        change(path)
        root = work / "prepared"
        return (lambda: write_arrays(root, pd.read_csv(root / "subjects.csv", dtype={"subject": str}), 2)), path
    return make


def rewrite_table(column: str, values):
    def change(path):
        table = pd.read_csv(path)
        table[column] = values
        table.to_csv(path, index=False)
    return change


def external_file(name: str, write: Callable[[Path], object], expected: str | None = None):
    """A folder of displacements for the test pair n3 -> n4 (16 x 16, 2D) with the file ``name`` written by
    ``write``; the error names ``expected`` (default: that file)."""
    def make(work):
        folder = work / "external"
        folder.mkdir()
        write(folder / name)
        return evaluate_external(work, folder), folder / (expected or name)
    return make


def npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def bad_config(text: str):
    def make(work):
        path = work / "bad.yaml"
        path.write_text(text)
        return check_config_file(path), path
    return make


GOOD_U = np.zeros((16, 16, 2), np.float32)  # Learn2Reg layout: the fixed grid, then the vector
BASE = "datasets: {embedded2d: {}}\nmethods: {identity: {}, voxelmorph: {}}\n"

CASES = [
    # dataset releases: archives and volumes
    Case("truncated gzip volume", oasis_file("slice_norm.nii.gz", truncate),
         r"cannot read the volume \(EOFError.*the file is truncated or not NIfTI"),
    Case("not a NIfTI file (an HTML error page)", oasis_file("slice_seg24.nii.gz",
                                                             lambda p: p.write_text("<html>404 Not Found</html>")),
         r"cannot read the volume .*not NIfTI"),
    Case("wrong dimensions (3 slices where the release has 1)",
         oasis_volume("slice_norm.nii.gz", lambda a: np.repeat(a, 3, axis=-1)),
         r"expected a 2D volume, got shape \(160, 192, 3\)"),
    Case("NaN in an image", oasis_volume("slice_norm.nii.gz", lambda a: np.where(a > 0.5, np.nan, a)),
         r"the image contains NaN or infinite values"),
    Case("blank image (every voxel 0)", oasis_volume("slice_norm.nii.gz", lambda a: np.zeros_like(a)),
         r"the image is blank \(every voxel is 0"),
    Case("complex voxels", oasis_volume("slice_norm.nii.gz", lambda a: a.astype(np.complex64)),
         r"voxels of type complex64; expected one real number per voxel"),
    Case("voxel size NaN in the header", oasis_file("slice_norm.nii.gz", damage_voxel_size),
         r"voxel size \(1\.0, nan\) in the header; every voxel size must be a positive number"),
    Case("intensities outside the release's range", oasis_volume("slice_norm.nii.gz", lambda a: a * 255),
         r"intensities in \[0, \d+\], expected \[0, 1\]"),
    Case("non-integer labels", oasis_volume("slice_seg24.nii.gz", lambda a: a.astype(np.float32) + 0.5),
         r"a label map must hold integer values only"),
    Case("negative labels", oasis_volume("slice_seg24.nii.gz", lambda a: -a.astype(np.int16)),
         r"negative label values \(down to -\d+\)"),
    Case("empty label map", oasis_volume("slice_seg24.nii.gz", lambda a: np.zeros_like(a)),
         r"the label map is empty \(every voxel is 0"),
    Case("label values missing from the label table", oasis_volume("slice_seg24.nii.gz", lambda a: np.where(a == 3, 99, a)),
         r"label values \[99\] are not in the label table"),
    Case("a listed subject missing from the release", release_listing,
         r"listed in subjects\.txt but not in the archive"),
    Case("truncated archive", corrupt_archive, r"the archive is corrupt or truncated"),
    Case("archive member outside the extraction folder", escaping_archive,
         r"member 'LPBA40/\.\./\.\./outside\.hdr' points outside the extraction folder"),
    # a prepared dataset folder
    Case("label map and image on different grids (affines differ)",
         prepared_volume("segs/n3.nii.gz", lambda p: save_nifti(p, nib.load(p).get_fdata().astype(np.int16), (1, 1),
                                                                affine=np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3) * 2)),
         r"affine \(voxel to world\) differs from .* by up to 2 mm; they must share one grid"),
    Case("volume shape differs from dataset.json",
         prepared_file("arrays/n3.image.npy", lambda p: np.save(p, np.random.default_rng(1).random((16, 15)))),
         r"shape \(16, 15\), but dataset\.json says \(16, 16\)"),
    Case("truncated prepared array", prepared_file("arrays/n4.seg.npy", truncate),
         r"cannot read the array .*prepare the dataset again"),
    Case("a folder prepared before the uncompressed arrays",
         prepared_file("dataset.json", layout_one),
         r"prepared in layout 1, without the uncompressed arrays of layout 2"),
    Case("pairs naming an unknown subject", prepared_file("pairs.csv", rewrite_table("moving", ["n9"])),
         r"subjects \['n9'\] are not in subjects\.csv"),
    Case("label 0 or a fraction in labels.csv", prepared_file("labels.csv", rewrite_table("label", [0, 1.5])),
         r"label values \[0\.0, 1\.5\] are not positive integers"),
    Case("dataset.json without spacing",
         prepared_file("dataset.json", lambda p: p.write_text('{"id": "tiny", "ndim": 2, "shape": [16, 16]}')),
         r"missing keys \['spacing'\]"),
    # external displacements (Learn2Reg format), scored by the `external` method
    Case("external displacement missing for a test pair (fixed and moving swapped)",
         external_file("disp_n4_n3.npz", npz(disp=GOOD_U), expected="disp_n3_n4.nii.gz"),
         r"file not found \(also looked for \.nii and \.npz\)"),
    Case("external displacement with the vector first",
         external_file("disp_n3_n4.npz", npz(disp=np.moveaxis(GOOD_U, -1, 0))),
         r"displacement of shape \(2, 16, 16\), expected \(16, 16, 2\)"),
    Case("3D displacement for a 2D dataset", external_file("disp_n3_n4.npz", npz(disp=np.zeros((16, 16, 3)))),
         r"displacement of shape \(16, 16, 3\), expected \(16, 16, 2\)"),
    Case("NaN in an external displacement",
         external_file("disp_n3_n4.npz", npz(disp=np.where(np.eye(16)[..., None] > 0, np.nan, GOOD_U))),
         r"the displacement contains NaN or infinite values"),
    Case("truncated external .nii.gz",
         external_file("disp_n3_n4.nii.gz", lambda p: (write_displacement(p, np.zeros((2, 16, 16))), truncate(p))),
         r"cannot read the displacement \(.*the file is truncated or not NIfTI"),
    Case("truncated external .npz",
         external_file("disp_n3_n4.npz", lambda p: (npz(disp=GOOD_U)(p), truncate(p))),
         r"cannot read the \.npz \(BadZipFile.*the file is truncated or not an \.npz"),
    Case("external .npz holding two arrays", external_file("disp_n3_n4.npz", npz(disp=GOOD_U, extra=GOOD_U)),
         r"npz: expected one array in the \.npz, found 2 \(disp, extra\)$"),
    # configs
    Case("unknown config key", bad_config(BASE + "threads: 2\n"),
         r"at the top level: Additional properties are not allowed \('threads' was unexpected\)"),
    Case("wrong type of a config value", bad_config(BASE + "seed: zero\n"), r"at seed: 'zero' is not of type 'integer'"),
    Case("unknown method", bad_config(BASE.replace("voxelmorph", "voxelmorf")), r"unknown method 'voxelmorf'"),
    Case("unknown recipe key", bad_config(BASE.replace("voxelmorph: {}", "voxelmorph: {overrides: {iteratons: 5}}")),
         r"unknown recipe key 'iteratons'"),
    Case("wrong type of a recipe value",
         bad_config(BASE.replace("voxelmorph: {}", "voxelmorph: {overrides: {iterations: many}}")),
         r"recipe key 'iterations' must be int, got str 'many'"),
    Case("training-loop key out of range",
         bad_config(BASE.replace("voxelmorph: {}", "voxelmorph: {overrides: {checkpoint_every: 0}}")),
         r"recipe key 'checkpoint_every' must be >= 1, got 0"),
    Case("unknown dataset option", bad_config(BASE.replace("embedded2d: {}", "embedded2d: {n_trian: 4}")),
         r"dataset 'embedded2d': unknown option 'n_trian'"),
    Case("wrong type of a dataset option", bad_config(BASE.replace("embedded2d: {}", "embedded2d: {n_train: four}")),
         r"dataset 'embedded2d': option 'n_train' must be int .*got str 'four'"),
]


def test_the_table_covers_at_least_twenty_kinds():
    assert len({case.kind for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[case.kind for case in CASES])
def test_a_bad_input_gets_one_error_naming_the_file_and_the_problem(case, originals, tmp_path):
    shutil.copytree(originals, tmp_path, dirs_exist_ok=True)
    results = tmp_path / "results"
    results.mkdir()
    (results / "pairs.csv").write_text("fixed,moving,dice\nn3,n4,0.9\n")  # computed by an earlier run
    step, bad_file = case.make(tmp_path)
    with pytest.raises((InputError, ConfigError)) as error:
        step()
    message = str(error.value)
    assert str(bad_file) in message and re.search(case.problem, message), message
    # the failed step wrote nothing a rerun could take as done, and kept what was there
    assert not (tmp_path / "oasis_prepared" / "dataset.json").exists()
    assert not (tmp_path / "extracted" / ".extracted.json").exists()
    assert sorted(p.name for p in results.iterdir()) == ["pairs.csv"]
    assert (results / "pairs.csv").read_text() == "fixed,moving,dice\nn3,n4,0.9\n"


def test_the_valid_inputs_pass(originals, tmp_path):
    """The rows break one thing each in inputs that are otherwise accepted."""
    shutil.copytree(originals, tmp_path, dirs_exist_ok=True)
    prepare_oasis(tmp_path / "oasis_raw")()
    assert len(pd.read_csv(tmp_path / "oasis_prepared" / "pairs.csv")) == 1
    read_prepared(tmp_path)()
    (tmp_path / "external").mkdir()
    np.savez(tmp_path / "external" / "disp_n3_n4.npz", disp=GOOD_U)
    evaluate_external(tmp_path, tmp_path / "external")()
    assert len(pd.read_csv(tmp_path / "results" / "pairs.csv")) == 1
    (tmp_path / "good.yaml").write_text(BASE)
    check_config_file(tmp_path / "good.yaml")()


def test_snakemake_names_the_config_file_of_a_bad_dataset_option(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(BASE.replace("embedded2d: {}", "embedded2d: {n_train: four}"))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{config}: dataset 'embedded2d': option 'n_train' must be int" in result.stdout + result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()
