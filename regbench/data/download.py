"""Getting public archives: resumable checksummed downloads (pooch) and streamed extraction.

- :func:`fetch` downloads with pooch through :class:`ResumableDownloader`: the bytes go to
  ``<file>.part`` first, so an interrupted download goes on where it stopped (HTTP ``Range``), with
  a progress bar. pooch then checks the checksum: a published one, else the one this machine recorded
  after the first download passed the dataset's structural validation (:func:`record_checksum`,
  ``<file>.sha256``). A mismatch deletes the download and stops with an error.
- :func:`extract_members` streams a tar (or zip) once and writes only the members a dataset uses,
  each atomically; a stamp written last says the extraction is complete. A corrupt archive is
  deleted (unless its checksum was verified) so that a rerun downloads it again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable

from regbench.io import InputError, atomic_path, read_json, write_json, write_text

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class ResumableDownloader:
    """A pooch downloader that keeps partial bytes in ``<target>.part`` and resumes them.

    pooch hands it a temporary output file; the bytes are appended to the ``.part`` file (asking the
    server for the remaining range when a part exists) and moved onto pooch's file when complete.
    """

    def __init__(self, part_path: Path, progress: bool = True, timeout: float = 60.0):
        self.part_path = Path(part_path)
        self.progress = progress
        self.timeout = timeout

    def __call__(self, url: str, output_file, pooch=None, check_only: bool = False) -> None:
        import requests

        have = self.part_path.stat().st_size if self.part_path.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:  # the part already holds every byte
                response.close()
            else:
                response.raise_for_status()
                if have and response.status_code != 206:  # the server ignored the range: start over
                    have = 0
                total = response.headers.get("Content-Length")
                total = int(total) + have if total is not None else None
                mode = "ab" if have else "wb"
                bar = _bar(total, have, self.part_path.name.removesuffix(".part"), self.progress)
                with open(self.part_path, mode) as part:
                    for chunk in response.iter_content(CHUNK):
                        part.write(chunk)
                        bar.update(len(chunk))
                bar.close()
                if total is not None and self.part_path.stat().st_size != total:
                    raise InputError(f"{url}: the download ended after {self.part_path.stat().st_size} of {total} "
                                     "bytes; rerun to resume it")
        os.replace(self.part_path, output_file)


def fetch(url: str, target: Path, known_hash: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``target`` unless it is there with the right checksum; return ``target``.

    ``known_hash``: ``"md5:..."`` or ``"sha256:..."`` as published; None uses the checksum recorded by
    :func:`record_checksum` on an earlier run, if any.
    """
    import pooch

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = known_hash or recorded_checksum(target)
    downloader = ResumableDownloader(target.with_name(target.name + ".part"), progress=progress)
    try:
        pooch.retrieve(url, known_hash=expected, fname=target.name, path=target.parent,
                       downloader=downloader, progressbar=False)
    except ValueError as err:
        if "hash" not in str(err).lower():
            raise
        target.unlink(missing_ok=True)
        raise InputError(f"{target}: checksum mismatch for {url} (expected {expected}); the download was "
                         "deleted. The file on the server differs from the one this benchmark expects: check the "
                         "URL (a mirror set as base_url?), or delete the recorded checksum if the dataset "
                         "was updated on purpose.") from None
    except OSError as err:
        raise InputError(f"{url}: download failed ({type(err).__name__}: {err}); rerun to resume it") from None
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_path(target: Path) -> Path:
    return Path(target).with_name(Path(target).name + ".sha256")


def recorded_checksum(target: Path) -> str | None:
    path = _checksum_path(target)
    if not path.exists():
        return None
    return "sha256:" + path.read_text().split()[0]


def record_checksum(target: Path) -> None:
    """Record ``target``'s SHA-256 beside it (once it passed validation); later runs verify it."""
    if not _checksum_path(target).exists():
        write_text(_checksum_path(target), f"{sha256(target)}  {Path(target).name}\n")


def extract_members(archive: Path, dest: Path, wanted: Callable[[str], bool], verified: bool = False) -> list[str]:
    """Extract the members whose normalised name satisfies ``wanted``; return their names.

    The archive is read once as a stream. Names are normalised (no leading ``./``) and must stay
    inside ``dest``. Extraction is skipped when ``dest/.extracted.json`` records this archive (same
    size and time). A corrupt archive stops with an :class:`InputError`; it is deleted unless
    ``verified`` (its checksum matched a published or recorded one), so that a rerun fetches it again.
    """
    archive, dest = Path(archive), Path(dest)
    stamp = dest / ".extracted.json"
    identity = {"archive": archive.name, "size": archive.stat().st_size, "mtime": int(archive.stat().st_mtime)}
    if stamp.exists():
        done = read_json(stamp)
        if {k: done.get(k) for k in identity} == identity:
            return done["members"]
    members = []
    try:
        for name, read in _stream(archive):
            name = _normalise(name, archive)
            if not wanted(name):
                continue
            with atomic_path(dest / name) as tmp, open(tmp, "wb") as out:
                while block := read(CHUNK):
                    out.write(block)
            members.append(name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        if isinstance(err, InputError):
            raise
        if not verified:
            archive.unlink(missing_ok=True)
        raise InputError(f"{archive}: the archive is corrupt or truncated ({type(err).__name__}: {err}); "
                         + ("it was deleted: rerun to download it again" if not verified else
                            "its checksum matched, so the disk copy may be damaged: delete it and rerun")) from None
    write_json(stamp, {**identity, "members": members})
    return members


def _stream(archive: Path):
    """(name, read) for every regular file of a tar (any compression) or zip, in archive order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                if not info.is_dir():
                    with bundle.open(info) as handle:
                        yield info.filename, handle.read
        return
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                yield member.name, handle.read


def _normalise(name: str, archive: Path) -> str:
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p not in (".", "")]
    if path.is_absolute() or ".." in parts:
        raise InputError(f"{archive}: member {name!r} points outside the extraction folder; refusing it")
    return "/".join(parts)


def _bar(total, initial, name, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=f"download {name}", mininterval=5.0)


class _NoBar:
    def update(self, _):
        pass

    def close(self):
        pass
