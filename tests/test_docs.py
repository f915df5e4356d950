"""The documentation: tools/build_docs.py builds the guide, the README and the API reference (pdoc)
without a warning, every link between its pages lands on an existing page and anchor, and every
public name of the documented modules has a docstring."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pdoc.doc as pdoc_doc  # the test extra installs pdoc: the docs build is part of the suite
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import build_docs  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr  # any pdoc warning fails
    assert proc.stdout == f"documentation written to {out}/index.html\n"
    return out


def test_site_has_the_guide_readme_and_reference(site: Path) -> None:
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    assert pages == {"index.html", "guide.html", "readme.html", "qcowdisk.html", "qcowdisk/ops.html",
                     "qcowdisk/pytest_plugin.html"}
    guide = (site / "guide.html").read_text()
    for heading in ("three-jobs", "file-objects", "untrusted-images", "the-command-line-and-qemu-img",
                    "serving-over-nbd", "the-pytest-plugin"):
        assert f'id="{heading}"' in guide
    assert 'href="readme.html#command-line"' in guide           # the README's table, not a copy
    assert 'href="qcowdisk.html#QcowFile.create"' in guide       # names link to the reference
    reference = (site / "qcowdisk.html").read_text()
    assert 'id="QcowFile.create_from_backing"' in reference and 'id="Extent.filename"' in reference
    plugin = (site / "qcowdisk" / "pytest_plugin.html").read_text()
    assert 'id="qcow_image"' in plugin and 'id="assert_image_sound"' in plugin


def test_links_between_pages_resolve(site: Path) -> None:
    broken = []
    for page in site.rglob("*.html"):
        html = page.read_text()
        for target, anchor in re.findall(r'href="([^"#:$]*)(?:#([^"]*))?"', html):
            path = (page.parent / target).resolve() if target else page
            if not path.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and f'id="{anchor}"' not in path.read_text():
                broken.append(f"{page.name}: {target}#{anchor}")
    assert broken == []


def test_every_public_name_has_a_docstring() -> None:
    missing: list[str] = []

    def visit(node: pdoc_doc.Module | pdoc_doc.Class) -> None:
        members = node.own_members if isinstance(node, pdoc_doc.Class) else list(node.members.values())
        for member in members:
            if member.name.startswith("_"):
                continue
            if not member.docstring.strip():
                missing.append(member.fullname)
            if isinstance(member, pdoc_doc.Class):
                visit(member)

    for name in build_docs.MODULES:
        module = pdoc_doc.Module(build_docs.load_module(name))
        if not module.docstring.strip():
            missing.append(name)
        visit(module)
    assert missing == []


def test_site_links_rewrites_only_links_to_the_pages() -> None:
    text = "[a](../README.md#command-line) [b](../README.md) [c](docs/guide.md) [d](other.md) `../README.md`"
    assert build_docs.site_links(text) == (
        "[a](readme.html#command-line) [b](readme.html) [c](guide.html) [d](other.md) `../README.md`")
