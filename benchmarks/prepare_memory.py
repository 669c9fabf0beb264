"""Peak memory of preparing OASIS 3D: it must not grow with the number of subjects (target: < 2 GB).

Builds neurite-oasis.v1.0.tar with the real layout and volume size (160 x 192 x 224) for N subjects
(synthetic content), serves it on 127.0.0.1, and runs download -> extraction -> preparation in a child
process per N, printing its peak resident set (ru_maxrss).

    python benchmarks/prepare_memory.py            # N = 10 and 100
    python benchmarks/prepare_memory.py --subjects 20
    python benchmarks/prepare_memory.py --readme README.md   # the figures between its <!-- prepare-memory --> markers
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import resource, sys, time
from pathlib import Path
from regbench.plugins import load_dataset
source = load_dataset("oasis")
options = source.resolve_options({"base_url": sys.argv[1], "expected_subjects": int(sys.argv[2])})
start = time.perf_counter()
source.download(Path(sys.argv[3]) / "raw", options)
source.prepare(Path(sys.argv[3]) / "raw", Path(sys.argv[3]) / "prepared", options)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build_archive(path: Path, numbers: list[int]) -> None:
    """One subject's volumes (built once), repeated under every subject name of the release."""
    from archives import add, nifti_bytes, parcellation

    seg = parcellation((160, 192, 224), range(1, 36), seed=0)
    volumes = {"aligned_norm.nii.gz": nifti_bytes(((seg > 0) * (0.3 + 0.02 * (seg % 30))).astype("float32")),
               "aligned_seg35.nii.gz": nifti_bytes(seg),
               "aligned_seg4.nii.gz": nifti_bytes((seg % 5).astype("int16"))}
    names = [f"OASIS_OAS1_{n:04d}_MR1" for n in numbers]
    with tarfile.open(path, "w") as tar:
        add(tar, "subjects.txt", ("\n".join(names) + "\n").encode())
        add(tar, "seg35_labels.txt", ("0 Unknown\n" + "".join(f"{v} S{v}\n" for v in range(1, 36))).encode())
        add(tar, "seg4_labels.txt", "0 Unknown\n1 A\n2 B\n3 C\n4 D\n".encode())
        for name in names:
            for file, data in volumes.items():
                add(tar, f"{name}/{file}", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--readme", type=Path, help="write the figures into this README")
    args = parser.parse_args()
    from archives import serve
    from readme_figures import write_between_markers

    from regbench.runtime import git_commit

    figures = []

    for count in args.subjects:
        # Learn2Reg's test subjects first, then its validation subjects, then training subjects
        pool = list(range(415, 454)) + list(range(395, 415)) + list(range(1, 395))
        numbers = sorted(pool[:count])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "mirror").mkdir()
            started = time.perf_counter()
            build_archive(tmp / "mirror" / "neurite-oasis.v1.0.tar", numbers)
            size_mb = (tmp / "mirror" / "neurite-oasis.v1.0.tar").stat().st_size / 2**20
            url, server = serve(tmp / "mirror")
            out = subprocess.run([sys.executable, "-c", CHILD, url, str(len(numbers)), str(tmp / "work")],
                                 capture_output=True, text=True, check=True)
            server.shutdown()
            seconds, peak_mb = (float(v) for v in out.stdout.split()[-2:])
            print(f"{len(numbers):4d} subjects (archive {size_mb:.0f} MB, built in {time.perf_counter() - started - seconds:.0f} s): "
                  f"download + prepare {seconds:.0f} s, peak memory {peak_mb:.0f} MB")
            figures.append(f"{len(numbers)} subjects: {peak_mb:.0f} MB ({seconds:.0f} s)")
    if args.readme:
        commit = git_commit(Path(__file__).resolve().parents[1])
        write_between_markers(args.readme, "prepare-memory", "; ".join(figures) + f" (commit `{commit[:12]}`)",
                              inline=True)
        print(f"wrote the figures into {args.readme}")


if __name__ == "__main__":
    main()
