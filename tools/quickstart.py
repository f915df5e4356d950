#!/usr/bin/env python3
"""qcowdisk quick start: build a base image and an overlay, read through the chain, let QEMU check.

Usage: python3 tools/quickstart.py [DEMO_DIR]     (default ./qcowdisk-demo, removed and recreated)

1. Create a sparse 1 GiB qcow2 base image and write guest data into it (a text banner at 0, a
   1 MiB byte pattern at 512 MiB, a marker in the last cluster).
2. Create an overlay backed by it and write different data over part of the base's pattern.
3. Print `qcowdisk info --backing-chain` for the overlay.
4. Read the overlay and show, offset by offset, which layer each read came from; every byte of
   the interesting regions is checked against what was written.
5. Export the overlay's whole guest view to a sparse raw file with qcowdisk and, when qemu-img is
   installed, run `qemu-img check` on both images and `qemu-img compare` against the export.

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from qcowdisk import QcowFile
from qcowdisk.cli import main as qcowdisk_main

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BASE_SIZE = 1 * GiB
BANNER = b"qcowdisk quick start: this sector was written into the BASE image.\n"
BASE_PATTERN_OFFSET = 512 * MiB
BASE_PATTERN = bytes([0xB5]) * MiB
TAIL_OFFSET = BASE_SIZE - 64 * KiB
TAIL = b"last cluster of the base image"
OVERLAY_OFFSET = BASE_PATTERN_OFFSET + 192 * KiB  # lands inside the base pattern
OVERLAY_DATA = (b"OVERLAY! " * (12 * KiB))[:100 * KiB]  # 100 KiB, not cluster aligned at the end
EXPORT_CHUNK = 4 * MiB
EXPORT_BLOCK = 64 * KiB  # granularity of the holes left in the export


def step(title: str) -> None:
    """Print a section heading."""
    print(f"\n=== {title}")


def expected_view() -> dict[int, bytes]:
    """Guest ranges that hold data in the overlay's view (everything else reads as zeros)."""
    pattern_end = BASE_PATTERN_OFFSET + len(BASE_PATTERN)
    overlay_end = OVERLAY_OFFSET + len(OVERLAY_DATA)
    return {
        0: BANNER,
        BASE_PATTERN_OFFSET: BASE_PATTERN[:OVERLAY_OFFSET - BASE_PATTERN_OFFSET],
        OVERLAY_OFFSET: OVERLAY_DATA,
        overlay_end: BASE_PATTERN[:pattern_end - overlay_end],
        TAIL_OFFSET: TAIL,
    }


def build_images(demo: Path) -> tuple[Path, Path]:
    """Create the base and the overlay and fill them; both are closed on return."""
    base = demo / "base.qcow2"
    overlay = demo / "overlay.qcow2"

    step(f"create {base} (1 GiB, sparse) and write guest data")
    with QcowFile.create(str(base), BASE_SIZE) as disk:
        disk.write_at(0, BANNER)
        disk.write_at(BASE_PATTERN_OFFSET, BASE_PATTERN)
        disk.write_at(TAIL_OFFSET, TAIL)
    print(f"wrote {len(BANNER)} bytes at 0, {len(BASE_PATTERN)} bytes of 0xb5 at {BASE_PATTERN_OFFSET:#x}, "
          f"{len(TAIL)} bytes at {TAIL_OFFSET:#x}")
    print(f"host file: {os.stat(base).st_blocks * 512 // KiB} KiB on disk for a {BASE_SIZE // GiB} GiB disk")

    step(f"create {overlay} backed by {base.name} and write over part of the base's data")
    # The backing name is stored as given and, as in QEMU, resolved against the overlay's directory.
    with QcowFile.create_from_backing(str(overlay), base.name, backing_format="qcow2") as disk:
        disk.write_at(OVERLAY_OFFSET, OVERLAY_DATA)
    print(f"wrote {len(OVERLAY_DATA)} bytes of 'OVERLAY! ' at {OVERLAY_OFFSET:#x} (inside the base's pattern)")
    return base, overlay


def show_reads(overlay: Path) -> bool:
    """Read through the overlay, print where each probe's bytes came from, verify every byte."""
    step("read the overlay: its own data where written, the base's elsewhere")
    pattern_end = BASE_PATTERN_OFFSET + len(BASE_PATTERN)
    probes = [
        (0, len(BANNER), "base (banner)"),
        (BASE_PATTERN_OFFSET, 16, "base (pattern)"),
        (OVERLAY_OFFSET - 8, 16, "base | overlay boundary"),
        (OVERLAY_OFFSET, 16, "overlay"),
        (OVERLAY_OFFSET + len(OVERLAY_DATA) - 8, 16, "overlay | base boundary"),
        (pattern_end - 8, 16, "base pattern end | zeros"),
        (256 * MiB, 16, "unallocated everywhere: zeros"),
        (TAIL_OFFSET, len(TAIL), "base (last cluster)"),
    ]
    ok = True
    with QcowFile.open(str(overlay), readonly=True) as disk:
        for offset, length, what in probes:
            data = disk.read_at(offset, length)
            print(f"  {offset:#011x}  {what:<30} {data[:48]!r}")
        # Every byte of every interesting region, not only the printed ones.
        for offset, want in expected_view().items():
            got = disk.read_at(offset, len(want))
            if got != want:
                print(f"  MISMATCH at {offset:#x}: expected {want[:16]!r}..., read {got[:16]!r}...")
                ok = False
        zeros = disk.read_at(256 * MiB, MiB)
        if zeros != bytes(MiB):
            print("  MISMATCH: unallocated range at 256 MiB does not read as zeros")
            ok = False
    print("every byte checked: " + ("OK" if ok else "FAILED"))
    return ok


def export_raw(image: Path, out: Path) -> None:
    """Write the image's guest view to a sparse raw file (zero chunks become holes)."""
    zero = bytes(EXPORT_CHUNK)
    with QcowFile.open(str(image), readonly=True) as disk, open(out, "wb") as f:
        size = disk.virtual_size
        for offset in range(0, size, EXPORT_CHUNK):
            chunk = memoryview(disk.read_at(offset, EXPORT_CHUNK))
            if chunk == zero[:len(chunk)]:  # the common case, compared in C
                continue
            for pos in range(0, len(chunk), EXPORT_BLOCK):
                block = chunk[pos:pos + EXPORT_BLOCK]
                if block != zero[:len(block)]:
                    f.seek(offset + pos)
                    f.write(block)
        f.truncate(size)


def run_qemu(*args: str) -> bool:
    """Run a QEMU tool, echo the command and its output; True on exit status 0."""
    print(f"$ {' '.join(args)}")
    p = subprocess.run(list(args), capture_output=True, text=True, check=False)
    out = (p.stdout + p.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if p.returncode != 0:
        print(f"  (exit status {p.returncode})")
    return p.returncode == 0


def main(argv: list[str]) -> int:
    """Run the demo in argv[1] (default ./qcowdisk-demo); 0 when every check passes."""
    demo = Path(argv[1] if len(argv) > 1 else "qcowdisk-demo")
    if demo.exists():
        shutil.rmtree(demo)
    demo.mkdir(parents=True)

    base, overlay = build_images(demo)

    step(f"qcowdisk info --backing-chain {overlay}")
    sys.stdout.flush()
    ok = qcowdisk_main(["info", "--backing-chain", str(overlay)]) == 0
    sys.stdout.flush()

    ok = show_reads(overlay) and ok

    raw = demo / "overlay-guest-view.raw"
    step(f"export the overlay's guest view with qcowdisk to {raw.name} (sparse)")
    export_raw(overlay, raw)
    print(f"{raw}: {os.path.getsize(raw)} bytes, {os.stat(raw).st_blocks * 512 // KiB} KiB allocated")

    if shutil.which("qemu-img"):
        step("QEMU's opinion")
        ok = run_qemu("qemu-img", "check", str(base)) and ok
        ok = run_qemu("qemu-img", "check", str(overlay)) and ok
        ok = run_qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(overlay), str(raw)) and ok
    else:
        step("qemu-img not installed: skipping qemu-img check / compare")

    step("result: " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
