"""Source checksums (``pipeline.ingest.checksums``): a published ``sha256sum`` file catches a
JPEG whose middle bytes changed even when it still decodes; an unlisted image is not ingested
unchecked; the rest goes in as without the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jobs.ingest_fmow import main
from pipeline.ingest import checksums
from pipeline.store.manifest import read_manifest, read_rejects
from tests.pipeline.fmow_fixtures import make_sample, small_spec


def _sha256sum_file(root: Path, out: Path) -> list[Path]:
    """Write ``sha256sum``'s output for every file under ``root``; the image files."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    out.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                           f"{p.relative_to(root)}\n" for p in files))
    return [p for p in files if p.suffix == ".jpg"]


def test_the_format_of_sha256sum_is_read_and_a_bad_line_named(tmp_path):
    good = tmp_path / "SUMS"
    good.write_text(f"{'a' * 64}  train/x/x_0/x_0_0_rgb.jpg\n\n{'B' * 64} *./val/y.jpg\n")
    assert checksums.read_checksums(str(good)) == {
        "train/x/x_0/x_0_0_rgb.jpg": "a" * 64, "val/y.jpg": "b" * 64}
    bad = tmp_path / "BAD"
    bad.write_text(f"{'a' * 64}  ok.jpg\nnot a sum\n")
    with pytest.raises(ValueError, match=r"BAD line 2"):
        checksums.read_checksums(str(bad))


def test_a_changed_and_an_unlisted_image_are_rejected_the_rest_ingested(tmp_path, capsys):
    src, dst = tmp_path / "fmow", str(tmp_path / "pyr")
    make_sample(str(src), small_spec(train=3, val=2))
    sums = tmp_path / "SHA256SUMS"
    images = _sha256sum_file(src, sums)
    changed, unlisted = images[0], images[1]
    data = bytearray(changed.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 32] = bytes(32)  # what the fault bench does to a JPEG
    changed.write_bytes(bytes(data))
    sums.write_text("".join(line for line in sums.read_text().splitlines(keepends=True)
                            if not line.rstrip().endswith(str(unlisted.relative_to(src)))))
    assert main(["--src", str(src), "--dst", dst, "--checksums", str(sums)]) == 3
    rejects = read_rejects(f"{dst}/manifest.parquet").to_pylist()
    kinds = {Path(r["path"]).name: r["kind"] for r in rejects}
    assert kinds == {changed.name: "checksum_mismatch", unlisted.name: "checksum_missing"}
    assert read_manifest(f"{dst}/manifest.parquet").num_rows == len(images) - 2
    assert "checksum_mismatch" in capsys.readouterr().err


def test_an_unreadable_checksum_file_is_fatal_before_any_work(tmp_path, capsys):
    src = tmp_path / "fmow"
    make_sample(str(src), small_spec(train=1, val=1))
    (tmp_path / "SUMS").write_text("garbage\n")
    assert main(["--src", str(src), "--dst", str(tmp_path / "pyr"),
                 "--checksums", str(tmp_path / "SUMS")]) == 1
    assert "SUMS line 1" in capsys.readouterr().err
    assert not (tmp_path / "pyr").exists()
