"""The pytest plugin (qcowdisk/pytest_plugin.py), run in inner pytest sessions with `pytester`.

Each inner session loads the plugin explicitly by module name and blocks the entry-point name
(`-p no:qcowdisk`), so it runs the same whether or not an installed qcowdisk registered the
plugin through its `pytest11` entry point (test_packaging.py checks that registration from a
wheel). The inner tests check their images with QEMU, the oracle, and with the helpers of this
directory (qemutools, imagepatch), which they import from the outer session's sys.path.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest

from qcowdisk import pytest_plugin

pytest_plugins = ["pytester"]

# The outer session imported the module already, so the inner one cannot assertion-rewrite it
# (it has no assert statements to rewrite): that warning is noise here.
PLUGIN_ARGS = ("-p", "no:qcowdisk", "-p", "qcowdisk.pytest_plugin", "-W", "ignore::pytest.PytestAssertRewriteWarning")
ROOT = Path(__file__).resolve().parent.parent

# Imported by the inner test modules: an image made broken on purpose, by patching bytes parsed
# with struct (imagepatch), independent of the code under test.
BREAKERS = '''
import imagepatch

def zero_data_refcount(path, guest_offset=0):
    """The data cluster at guest_offset keeps its L2 reference but gets refcount 0: a corruption."""
    cluster_size = 1 << imagepatch.read_header(str(path)).cluster_bits
    host = imagepatch.read_u64(str(path), imagepatch.l2_entry_offset(str(path), guest_offset)) & 0x00FFFFFFFFFFFE00
    block = imagepatch.read_u64(str(path), imagepatch.refcount_table_entry_offset(str(path), 0))
    imagepatch.patch_u16(str(path), block + 2 * (host // cluster_size), 0)

def leak_one_cluster(path):
    """A cluster appended to the file with refcount 1 and no reference: a leak."""
    cluster_size = 1 << imagepatch.read_header(str(path)).cluster_bits
    host = imagepatch.append_aligned(str(path), b"\\xaa" * cluster_size, cluster_size)
    block = imagepatch.read_u64(str(path), imagepatch.refcount_table_entry_offset(str(path), 0))
    imagepatch.patch_u16(str(path), block + 2 * (host // cluster_size), 1)
'''


def run_inner(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    """Write `source` as the inner session's test module (with `breakers.py` beside it) and run it."""
    pytester.makepyfile(breakers=BREAKERS)
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


def test_factory_defaults(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, """
        import pytest
        import qemutools
        from qcowdisk import QcowFile

        def test_defaults(qcow_image, tmp_path):
            first, second = qcow_image(), qcow_image()
            assert (first, second) == (tmp_path / "image1.qcow2", tmp_path / "image2.qcow2")
            info = qemutools.info(str(first))
            assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
            assert info["cluster-size"] == 65536 and "backing-filename" not in info
            assert info["format-specific"]["data"]["compat"] == "1.1"
            assert first.stat().st_size < 1 << 20          # sparse: metadata only
            qemutools.assert_clean(str(first))
            with QcowFile.open(first, readonly=True) as disk:
                assert disk.read_at(0, 4096) == bytes(4096)

        def test_name_and_no_overwrite(qcow_image, tmp_path):
            path = qcow_image(name="disk.qcow2")
            assert path == tmp_path / "disk.qcow2"
            with pytest.raises(FileExistsError):
                qcow_image(name="disk.qcow2")
            with pytest.raises(ValueError, match="plain file name"):
                qcow_image(name="../elsewhere.qcow2")
            (tmp_path / "image1.qcow2").write_bytes(b"someone else's file")
            assert qcow_image() == tmp_path / "image2.qcow2"  # an existing name is skipped
    """)
    result.assert_outcomes(passed=2)


def test_factory_sizes(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, """
        import pytest
        import qemutools

        @pytest.mark.parametrize("size, expected", [
            ("64M", 64 << 20), ("1.5G", 3 << 29), ("512k", 512 << 10), ("1T", 1 << 40), ("0x100000", 1 << 20),
            ("4096", 4096), (12345 * 512, 12345 * 512), ("2g", 2 << 30), (0, 0),
        ])
        def test_size(qcow_image, size, expected):
            assert qemutools.info(str(qcow_image(size)))["virtual-size"] == expected

        @pytest.mark.parametrize("size", ["12Q", "-1M", "", "1e3", "G"])
        def test_bad_size_text(qcow_image, tmp_path, size):
            with pytest.raises(ValueError, match="invalid image size"):
                qcow_image(size)
            assert list(tmp_path.iterdir()) == []

        def test_bad_size_type(qcow_image):
            with pytest.raises(ValueError, match="negative"):
                qcow_image(-512)
            with pytest.raises(TypeError, match="int or a size text"):
                qcow_image(1.5)
    """)
    result.assert_outcomes(passed=15)


def test_factory_data_read_back(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, """
        import qemutools
        from qcowdisk import QcowFile

        def test_data(qcow_image, tmp_path):
            payload = qemutools.pattern(200_000, seed=3)
            data = {5 << 20: payload, 0: b"boot sector", 511: b"xy", (64 << 20) - 3: b"end"}
            path = qcow_image("64M", data=data)
            guest = qemutools.to_raw(str(path), str(tmp_path / "guest.raw"))   # QEMU's view
            expected = bytearray(64 << 20)
            for offset, chunk in sorted(data.items()):
                expected[offset:offset + len(chunk)] = chunk
            assert guest == expected
            qemutools.assert_clean(str(path))
            with QcowFile.open(path, readonly=True) as disk:                 # and qcowdisk's
                assert disk.read_at(5 << 20, len(payload)) == payload
                assert disk.read_at(0, 13) == b"boot sector\\0\\0"

        def test_data_past_the_end_is_refused(qcow_image):
            import pytest
            with pytest.raises(ValueError, match="past the virtual size"):
                qcow_image("1M", data={(1 << 20) - 1: b"ab"})
    """)
    result.assert_outcomes(passed=2)


def test_factory_backing_chains(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, """
        import qemutools
        from qcowdisk import QcowFile

        def test_chain(qcow_image, tmp_path):
            base = qcow_image("8M", data={0: b"base" * 1024, 1 << 20: b"B" * 100})
            mid = qcow_image(backing=base, data={4096: b"mid!"})
            top = qcow_image(backing=mid, data={1 << 20: b"T"})
            chain = qemutools.info(str(top), "--backing-chain")
            assert [i["filename"] for i in chain] == [str(top), str(mid), str(base)]
            assert [i["virtual-size"] for i in chain] == [8 << 20] * 3  # overlays take the base's size
            assert chain[0]["backing-filename-format"] == "qcow2"
            guest = qemutools.to_raw(str(top), str(tmp_path / "guest.raw"))
            assert guest[:4096] == b"base" * 1024 and guest[4096:4100] == b"mid!"
            assert guest[1 << 20:(1 << 20) + 100] == b"T" + b"B" * 99
            for image in (base, mid, top):
                qemutools.assert_clean(str(image))

        def test_bigger_overlay_and_foreign_backing(qcow_image, tmp_path):
            raw = tmp_path / "disk.raw"
            raw.write_bytes(b"R" * 65536)
            top = qcow_image("1M", backing=raw)              # any image path, its format probed
            info = qemutools.info(str(top))
            assert info["virtual-size"] == 1 << 20 and info["backing-filename-format"] == "raw"
            with QcowFile.open(top, readonly=True) as disk:
                assert disk.read_at(65530, 12) == b"R" * 6 + bytes(6)

            made_by_qemu = qemutools.create(str(tmp_path / "q.qcow2"), "2M")
            over = qcow_image(backing=made_by_qemu, backing_format="qcow2", cluster_size=4096)
            info = qemutools.info(str(over))
            assert info["virtual-size"] == 2 << 20 and info["cluster-size"] == 4096
            assert info["backing-filename"] == made_by_qemu

        def test_missing_backing(qcow_image, tmp_path):
            import pytest
            with pytest.raises(FileNotFoundError):
                qcow_image(backing=tmp_path / "nowhere.qcow2")
    """)
    result.assert_outcomes(passed=3)


def test_factory_create_options(pytester: pytest.Pytester) -> None:
    result = run_inner(pytester, """
        import pytest
        import qemutools

        def test_options(qcow_image):
            path = qcow_image("16M", cluster_size=16384, refcount_bits=4, lazy_refcounts=True,
                              compression_type="zstd", extended_l2=True, data={0: b"x" * 5000})
            info = qemutools.info(str(path))
            spec = info["format-specific"]["data"]
            assert info["cluster-size"] == 16384
            assert (spec["refcount-bits"], spec["lazy-refcounts"], spec["compression-type"], spec["extended-l2"]) == (
                4, True, "zstd", True)
            qemutools.assert_clean(str(path))

        def test_v2_and_preallocation(qcow_image):
            path = qcow_image("4M", compat="0.10", preallocation="metadata")
            info = qemutools.info(str(path))
            assert info["format-specific"]["data"]["compat"] == "0.10"
            mapped = qemutools.qemu_img("map", "--output=json", str(path)).stdout
            assert '"offset"' in mapped                        # metadata preallocated: clusters mapped
            qemutools.assert_clean(str(path))

        def test_data_file(qcow_image, tmp_path):
            path = qcow_image("1M", data_file=str(tmp_path / "data.bin"), data_file_raw=True, data={0: b"ext"})
            assert (tmp_path / "data.bin").read_bytes()[:3] == b"ext"
            assert qemutools.info(str(path))["format-specific"]["data"]["data-file-raw"] is True

        def test_refused_options(qcow_image):
            with pytest.raises(ValueError):
                qcow_image(cluster_size=3000)
            with pytest.raises(TypeError):
                qcow_image(no_such_option=1)
    """)
    result.assert_outcomes(passed=4)


SOUNDNESS = """
    import pytest
    from breakers import leak_one_cluster, zero_data_refcount
    from qcowdisk.pytest_plugin import assert_image_sound as imported

    def test_sound(qcow_image, assert_image_sound):
        assert assert_image_sound is imported
        base = qcow_image("8M", data={0: b"a" * 70000})
        assert_image_sound(qcow_image(backing=base, data={65536: b"b"}))
        assert_image_sound(base, allow_leaks=True)

    def test_corrupt(qcow_image, assert_image_sound):
        path = qcow_image("8M", name="broken.qcow2", data={0: b"a" * 4096})
        zero_data_refcount(path)
        assert_image_sound(path)

    def test_leaky(qcow_image, assert_image_sound):
        path = qcow_image("8M", name="leaky.qcow2", data={0: b"a"})
        leak_one_cluster(path)
        assert_image_sound(path, allow_leaks=True)   # passes
        assert_image_sound(path)                     # fails

    def test_not_an_image(tmp_path, assert_image_sound):
        notes = tmp_path / "notes.txt"
        notes.write_text("not a disk image\\n")
        assert_image_sound(notes)
"""


def fake_qemu_img(directory: Path) -> Path:
    """A `qemu-img` that logs each call, then runs the real one: proof of which checker ran."""
    real = shutil.which("qemu-img")
    assert real is not None
    directory.mkdir()
    script = directory / "qemu-img"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{directory}/calls"\nexec {real} "$@"\n')
    script.chmod(0o755)
    return directory / "calls"


def test_soundness_with_qemu(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_qemu_img(pytester.path / "bin")
    monkeypatch.setenv("PATH", f"{pytester.path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = run_inner(pytester, SOUNDNESS)
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*broken.qcow2 is not sound: `qemu-img check` exited with status 2 (the image is corrupt):",
        "*ERROR cluster * refcount=0 reference=1*",
        "*leaky.qcow2 is not sound: `qemu-img check` exited with status 3 (the image leaks clusters):",
        "*Leaked cluster * refcount=1 reference=0*",
        "*notes.txt is not sound: `qemu-img check` exited with status 63 (the image's format cannot be checked*",
    ])
    assert "Traceback" not in out and "pytest_plugin.py" not in out  # pytrace=False: the message alone
    logged = calls.read_text().splitlines()
    assert len(logged) == 6 and all(line.startswith("check ") for line in logged), logged


def test_soundness_without_qemu(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = pytester.path / "no-qemu-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))           # the inner session finds no qemu-img
    result = run_inner(pytester, SOUNDNESS)
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*broken.qcow2 is not sound: qcowdisk's check (qemu-img is not installed) found * corruption(s), "
        "0 leaked cluster(s) and 0 check error(s)",
        "*ERROR cluster * refcount=0 reference=1*",
        "*leaky.qcow2 is not sound: qcowdisk's check (qemu-img is not installed) found 0 corruption(s), "
        "1 leaked cluster(s) and 0 check error(s)",
        "*notes.txt is not sound: qcowdisk's check (qemu-img is not installed) could not check it: "
        "InvalidImageError: *",
    ])


def test_use_qemu_switch(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_qemu_img(pytester.path / "bin")
    monkeypatch.setenv("PATH", str(pytester.path / "bin"))
    result = run_inner(pytester, """
        from breakers import zero_data_refcount
        from qcowdisk.pytest_plugin import assert_image_sound

        def test_forced_fallback(qcow_image):
            path = qcow_image("1M", name="broken.qcow2", data={0: b"a"})
            zero_data_refcount(path)
            assert_image_sound(path, use_qemu=False)

        def test_required_qemu(qcow_image, monkeypatch):
            monkeypatch.setenv("PATH", "/nonexistent")
            assert_image_sound(qcow_image(), use_qemu=True)
    """)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*qcowdisk's check (qemu-img is not installed) found * corruption(s)*",
                                 "*use_qemu=True): qemu-img is not on the PATH"])
    assert not calls.exists()


def test_plugin_is_registered_by_entry_point() -> None:
    """pyproject names the module that defines the fixtures (test_packaging installs it for real)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"qcowdisk": "qcowdisk.pytest_plugin"}
    assert callable(pytest_plugin.qcow_image) and callable(pytest_plugin.assert_image_sound_fixture)


def test_outer_session_registers_the_plugin_at_most_once(request: pytest.FixtureRequest) -> None:
    """The suite itself never loads the plugin explicitly, so an installed entry point cannot clash."""
    manager = request.config.pluginmanager
    names = [name for name, plugin in manager.list_name_plugin() if plugin is pytest_plugin]
    assert len(names) <= 1, names
