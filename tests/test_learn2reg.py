"""Learn2Reg interop: displacement files in and out, the `external` method, `regbench evaluate`."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from regbench import plugins
from regbench.data.prepared import PreparedDataset
from regbench.evaluation.scoring import evaluate_method
from regbench.io import InputError, save_nifti
from regbench.learn2reg import read_displacement, write_displacement


@pytest.mark.parametrize("shape", [(12, 10), (6, 7, 8)])
@pytest.mark.parametrize("suffix", [".nii.gz", ".npz"])
def test_displacement_files_round_trip_in_learn2reg_layout(tmp_path, shape, suffix):
    u = np.random.default_rng(0).normal(size=(len(shape), *shape))
    path = tmp_path / f"disp_a_b{suffix}"
    write_displacement(path, u)
    if suffix == ".npz":
        with np.load(path) as npz:
            stored = npz["disp"]
    else:
        import nibabel as nib

        stored = np.asanyarray(nib.load(str(path)).dataobj)
    assert stored.shape == (*shape, len(shape))  # the fixed grid, then the vector, as Learn2Reg stores it
    voxel = (1, 2, 3)[:len(shape)]
    for k in range(len(shape)):  # component k of the vector at voxel x is u[k][x]
        assert stored[(*voxel, k)] == pytest.approx(u[(k, *voxel)], abs=1e-6)
    np.testing.assert_allclose(read_displacement(path, shape), u, atol=1e-6)


def test_learn2reg_files_written_by_other_tools_are_read(tmp_path):
    """What other tools write: an .npz whose one array has any key (np.savez's arr_0), an integer array, and a NIfTI
    vector image stored X x Y x Z x 1 x 3; each reads as ``ndim x *shape`` float64 with the same values."""
    import nibabel as nib

    shape = (4, 5, 6)
    field = np.arange(4 * 5 * 6 * 3).reshape(*shape, 3)      # vector last; component k at x: field[x][k]
    expected = np.stack([field[..., k] for k in range(3)]).astype(np.float64)
    np.savez(tmp_path / "disp_any_key.npz", field)
    np.testing.assert_array_equal(read_displacement(tmp_path / "disp_any_key.npz", shape), expected)
    integer = read_displacement(tmp_path / "disp_any_key.npz", shape)
    assert integer.dtype == np.float64 and integer[2, 1, 2, 3] == field[1, 2, 3, 2]
    nib.save(nib.Nifti1Image(field[:, :, :, None, :].astype(np.float32), np.eye(4)), str(tmp_path / "disp_5d.nii.gz"))
    np.testing.assert_array_equal(read_displacement(tmp_path / "disp_5d.nii.gz", shape), expected)


def test_bad_displacement_files_get_one_clear_error(tmp_path):
    shape = (8, 9, 10)
    wrong = tmp_path / "disp_wrong.npz"
    np.savez(wrong, disp=np.zeros((8, 9, 10, 2)))
    with pytest.raises(InputError, match=r"disp_wrong.npz: displacement of shape \(8, 9, 10, 2\), expected \(8, 9, 10, 3\)"):
        read_displacement(wrong, shape)
    nan = tmp_path / "disp_nan.npz"
    field = np.zeros((8, 9, 10, 3))
    field[1, 2, 3, 0] = np.nan
    np.savez(nan, disp=field)
    with pytest.raises(InputError, match="disp_nan.npz: the displacement contains NaN"):
        read_displacement(nan, shape)
    truncated = tmp_path / "disp_cut.nii.gz"
    write_displacement(truncated, np.random.default_rng(0).normal(size=(3, *shape)))
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(InputError, match="disp_cut.nii.gz: cannot read"):
        read_displacement(truncated, shape)
    with pytest.raises(InputError, match="disp_missing.npz: file not found"):
        read_displacement(tmp_path / "disp_missing.npz", shape)
    text = tmp_path / "disp_text.npz"
    np.savez(text, disp=np.full((8, 9, 10, 3), "a"))
    with pytest.raises(InputError, match="dtype"):
        read_displacement(text, shape)


def run_evaluate(*args):
    return subprocess.run([sys.executable, "-m", "regbench", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_evaluate_command_scores_a_translated_cube(tmp_path):
    fixed = np.zeros((20, 20, 20), np.int16)
    fixed[5:15, 5:15, 5:15] = 1
    fixed[2:4, 2:4, 2:4] = 7  # a second label, left out by --labels 1
    moving = np.roll(fixed, 2, axis=0)  # the cube moved by 2 voxels along axis 0
    save_nifti(tmp_path / "fixed.nii.gz", fixed, (1, 1, 1))
    save_nifti(tmp_path / "moving.nii.gz", moving, (1, 1, 1))
    write_displacement(tmp_path / "disp_zero.nii.gz", np.zeros((3, 20, 20, 20)))
    result = run_evaluate("--fixed-seg", tmp_path / "fixed.nii.gz", "--moving-seg", tmp_path / "moving.nii.gz",
                          "--disp", tmp_path / "disp_zero.nii.gz", "--labels", "1", "--spacing", "2,1,1")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["dice"] == pytest.approx(2 * 8 / 20)  # overlap 8 of 10 slices
    assert scores["hd95"] == pytest.approx(4.0)  # 2 voxels of 2 mm
    assert scores["hd95_vox"] == pytest.approx(2.0)
    assert scores["fold_pct"] == 0 and [row["label"] for row in scores["labels"]] == [1]
    # the true displacement recovers the cube exactly
    u = np.zeros((20, 20, 20, 3))   # written as Learn2Reg's own tools do: the vector last
    u[..., 0] = 2.0
    np.savez(tmp_path / "disp_true.npz", disp=u)
    out = tmp_path / "scores.json"
    result = run_evaluate("--fixed-seg", tmp_path / "fixed.nii.gz", "--moving-seg", tmp_path / "moving.nii.gz",
                          "--disp", tmp_path / "disp_true.npz", "--labels", "1-3", "--json", out)
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    assert scores["dice"] == pytest.approx(1.0)
    assert [row["label"] for row in scores["labels"]] == [1, 2, 3]


def test_evaluate_command_names_the_bad_file(tmp_path):
    save_nifti(tmp_path / "fixed.nii.gz", np.ones((8, 8, 8), np.int16), (1, 1, 1))
    save_nifti(tmp_path / "moving.nii.gz", np.ones((8, 8, 9), np.int16), (1, 1, 1))
    save_nifti(tmp_path / "float.nii.gz", np.full((8, 8, 8), 0.5, np.float32), (1, 1, 1))
    write_displacement(tmp_path / "disp.npz", np.zeros((3, 8, 8, 8)))
    result = run_evaluate("--fixed-seg", tmp_path / "fixed.nii.gz", "--moving-seg", tmp_path / "moving.nii.gz",
                          "--disp", tmp_path / "disp.npz")
    assert result.returncode == 2 and "moving.nii.gz: shape (8, 8, 9) differs" in result.stderr
    result = run_evaluate("--fixed-seg", tmp_path / "float.nii.gz", "--moving-seg", tmp_path / "fixed.nii.gz",
                          "--disp", tmp_path / "disp.npz")
    assert result.returncode == 2 and "float.nii.gz: a label map must hold integer values" in result.stderr


def test_external_method_scores_exported_displacements_like_the_method_itself(tmp_path):
    source = plugins.load_dataset("embedded2d")
    source.prepare(tmp_path / "raw", tmp_path / "prepared", source.resolve_options({"n_train": 2}))
    dataset = PreparedDataset(tmp_path / "prepared")

    class Shift(plugins.RegistrationMethod):
        """A stand-in registration: a constant shift, so the scores are not identity's."""
        name = "shift"
        trainable = False

        def register(self, net, fixed, moving, recipe):
            import torch

            return torch.full((1, 2, *fixed.shape[2:]), 0.7)

    direct = evaluate_method(Shift(), {}, dataset, tmp_path / "shift", runtime_repeats=1,
                             export_dir=tmp_path / "exported")
    external = plugins.load_method("external")
    scored = evaluate_method(external, external.recipe("quick", {"folder": str(tmp_path / "exported")}), dataset,
                             tmp_path / "external")
    columns = ["dice", "hd95", "fold_pct", "sdlogj", "epe"]
    pd.testing.assert_frame_equal(direct[columns], scored[columns], atol=1e-5)
    assert scored["runtime_s"].isna().all()
    with pytest.raises(InputError, match="needs the folder"):
        evaluate_method(external, external.recipe("quick"), dataset, tmp_path / "none")
