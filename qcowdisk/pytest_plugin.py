"""pytest plugin: qcow2 images as test fixtures (installed with the package, entry point `pytest11`).

Installing qcowdisk makes two fixtures available in every pytest run, with no import or
`conftest.py` line needed:

- `qcow_image`: a factory, `qcow_image(size="1G", *, backing=None, data={offset: bytes},
  name=None, **create_options) -> Path`, that creates a qcow2 image in the test's `tmp_path`.
- `assert_image_sound`: `assert_image_sound(path, *, allow_leaks=False, use_qemu=None)`, which
  fails the test unless the image checks clean: `qemu-img check` when `qemu-img` is on the
  PATH, qcowdisk's own check (`QcowFile.check`) otherwise. The same function can be imported
  from this module.

```python
def test_guest_tool_writes_its_marker(qcow_image, assert_image_sound):
    base = qcow_image("64M", data={0: b"boot sector", 1 << 20: b"x" * 4096})
    top = qcow_image(backing=base, cluster_size=4096)   # an overlay, as big as its base
    run_tool_under_test(top)
    assert_image_sound(top)
```

The plugin needs only pytest and qcowdisk; QEMU is optional. To turn it off in a run, use
`pytest -p no:qcowdisk`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from .errors import QcowError
from .ops.qemuopts import strtosz
from .qcow2.file import QcowFile

__all__ = ["QcowImageFactory", "assert_image_sound", "assert_image_sound_fixture", "make_qcow_image",
           "parse_size", "qcow_image"]

DEFAULT_SIZE = "1G"
"""The virtual size of an image the factory makes without `size` or `backing`."""


class QcowImageFactory(Protocol):
    """The type of the `qcow_image` fixture (for annotating a test's parameter)."""

    def __call__(self, size: int | str | None = None, *, backing: str | os.PathLike[str] | None = None,
                 data: Mapping[int, bytes] | None = None, name: str | None = None,
                 **create_options: Any) -> Path:
        """Create an image in the test's `tmp_path` and return its path (see `make_qcow_image`)."""


def parse_size(size: int | str) -> int:
    """A size in bytes from an int or a qemu-img size text (`"1G"`, `"512k"`, `"1.5M"`, `"0x1000"`).

    Suffixes are qemu-img's: `b`, `k`, `M`, `G`, `T`, `P`, `E`, binary, either case. Raises
    ValueError for anything qemu-img would refuse, and for a negative int.
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"image size must be an int or a size text such as '1G', not {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"image size {size} is negative")
        return size
    try:
        return strtosz(size.strip())[0]
    except (ValueError, OverflowError):
        raise ValueError(f"invalid image size {size!r}: expected a number with an optional "
                         "k, M, G, T, P or E suffix (qemu-img's size syntax)") from None


def make_qcow_image(directory: str | os.PathLike[str], size: int | str | None = None, *,
                    backing: str | os.PathLike[str] | None = None, data: Mapping[int, bytes] | None = None,
                    name: str | None = None, **create_options: Any) -> Path:
    """Create a qcow2 image in `directory` and return its absolute path (what `qcow_image` does).

    - `size`: bytes, or a qemu-img size text (`"1G"`, `"64M"`, `"1.5G"`); by default 1 GiB, or
      the backing image's size for an overlay.
    - `backing`: a backing image (one this factory made, or any image path: qcow2, qcow, raw);
      the new image is an overlay on it, with the backing name stored as given and its format
      probed unless `backing_format=` is passed.
    - `data`: `{guest_offset: bytes}` written into the new image (in offset order) before it is
      flushed and closed.
    - `name`: the file name inside `directory`; by default `image1.qcow2`, `image2.qcow2`, ...
      An existing file is never overwritten (FileExistsError).
    - `create_options`: what `QcowFile.create` takes, the options of `qemu-img create -f qcow2
      -o ...`: `cluster_size`, `refcount_bits`, `compat`, `lazy_refcounts`, `extended_l2`,
      `compression_type`, `preallocation`, `data_file`, `data_file_raw`, `backing_format`.
    """
    directory = Path(directory).absolute()
    if name is None:
        path = next(p for p in (directory / f"image{n}.qcow2" for n in itertools.count(1)) if not os.path.lexists(p))
    else:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"image name {name!r} must be a plain file name (no directory part)")
        path = directory / name
    nbytes = None if size is None else parse_size(size)
    if backing is None:
        disk = QcowFile.create(path, parse_size(DEFAULT_SIZE) if nbytes is None else nbytes, **create_options)
    else:
        options = dict(create_options)
        backing_format = options.pop("backing_format", None)
        disk = QcowFile.create_from_backing(path, os.fspath(backing), backing_format=backing_format, size=nbytes,
                                            **options)
    with disk:
        for offset, payload in sorted((data or {}).items()):
            disk.write_at(offset, payload)
        disk.flush()
    return path


def _qemu_img_check(path: str, allow_leaks: bool, qemu_img: str) -> None:
    proc = subprocess.run([qemu_img, "check", path], capture_output=True, text=True, check=False)
    if proc.returncode == 0 or (allow_leaks and proc.returncode == 3):
        return
    meaning = {1: "the check could not be completed", 2: "the image is corrupt", 3: "the image leaks clusters",
               63: "the image's format cannot be checked (not qcow2?)"}.get(proc.returncode, "unexpected status")
    output = "\n".join(s for s in (proc.stdout.strip(), proc.stderr.strip()) if s)
    pytest.fail(f"image {path} is not sound: `qemu-img check` exited with status {proc.returncode} "
                f"({meaning}):\n{output}", pytrace=False)


def _qcowdisk_check(path: str, allow_leaks: bool) -> None:
    lines: list[str] = []
    try:
        with QcowFile.open_for_check(path) as disk:
            result = disk.check(report=lines.append)
    except QcowError as e:
        pytest.fail(f"image {path} is not sound: qcowdisk's check (qemu-img is not installed) could not "
                    f"check it: {type(e).__name__}: {e}", pytrace=False)
    if result.exit_status == 0 or (allow_leaks and result.exit_status == 3):
        return
    details = "".join(f"\n{line.rstrip()}" for line in lines[:50])
    if len(lines) > 50:
        details += f"\n... ({len(lines) - 50} more lines)"
    pytest.fail(f"image {path} is not sound: qcowdisk's check (qemu-img is not installed) found "
                f"{result.corruptions} corruption(s), {result.leaks} leaked cluster(s) and "
                f"{result.check_errors} check error(s){details}", pytrace=False)


def assert_image_sound(path: str | os.PathLike[str], *, allow_leaks: bool = False, use_qemu: bool | None = None) -> None:
    """Fail the running test unless the image at `path` (with its backing chain) checks clean.

    With `qemu-img` on the PATH (or `use_qemu=True`, which fails if it is missing) this runs
    `qemu-img check`; otherwise (or with `use_qemu=False`) qcowdisk's own check, which reports
    what `qemu-img check` reports. Corruptions, check errors and an image that cannot be opened
    or is not qcow2 fail the test; leaked clusters too, unless `allow_leaks` (a leak wastes
    space but loses nothing: it is what a crash may leave). The failure message names the
    image, the checker and what it found. The image must not be open for writing elsewhere
    (qemu-img would find it locked).
    """
    spath = os.fspath(path)
    qemu_img = shutil.which("qemu-img") if use_qemu is not False else None
    if use_qemu and qemu_img is None:
        pytest.fail("assert_image_sound(use_qemu=True): qemu-img is not on the PATH", pytrace=False)
    if qemu_img is not None:
        _qemu_img_check(spath, allow_leaks, qemu_img)
    else:
        _qcowdisk_check(spath, allow_leaks)


@pytest.fixture
def qcow_image(tmp_path: Path) -> QcowImageFactory:
    """A factory creating qcow2 images in the test's `tmp_path`: see `make_qcow_image`.

    `qcow_image(size="1G", *, backing=None, data={offset: bytes}, name=None, **create_options)`
    returns the new image's `Path`; the image is flushed and closed, ready for any tool.
    """
    def factory(size: int | str | None = None, *, backing: str | os.PathLike[str] | None = None,
                data: Mapping[int, bytes] | None = None, name: str | None = None, **create_options: Any) -> Path:
        return make_qcow_image(tmp_path, size, backing=backing, data=data, name=name, **create_options)
    return factory


@pytest.fixture(name="assert_image_sound")
def assert_image_sound_fixture() -> Callable[..., None]:
    """The `assert_image_sound` function as a fixture, for tests that would rather not import it."""
    return assert_image_sound
