"""Init container: download a model archive (.tar, .tar.gz, .tgz, .zip) and unpack it.

Usage: python fetch_model.py URL DEST_DIR

A single top-level directory in the archive is stripped, so DEST_DIR holds
config.json and the weights directly (what from_pretrained wants).
"""

import pathlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile


def download(url: str, into: pathlib.Path) -> pathlib.Path:
    """Stream `url` to a file under `into`; returns its path."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "model.archive"
    path = into / name
    with urllib.request.urlopen(url) as response, open(path, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    return path


def unpack(archive: pathlib.Path, dest: pathlib.Path) -> None:
    """Unpack a tar or zip archive into dest, stripping one shared top-level directory."""
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(staging)
    else:
        with tarfile.open(archive) as t:
            t.extractall(staging, filter="data")
    entries = list(staging.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
    shutil.rmtree(dest, ignore_errors=True)
    root.rename(dest)
    shutil.rmtree(staging, ignore_errors=True)


def main(url: str, dest: str) -> None:
    target = pathlib.Path(dest)
    if (target / "config.json").exists():
        print(f"{target}: already there")
        return
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        print(f"fetching {url}")
        unpack(download(url, pathlib.Path(scratch)), target)
    print(f"{target}: {sorted(p.name for p in target.iterdir())}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
