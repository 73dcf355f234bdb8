"""What a wheel carries: the license and full metadata, and the PEP 561 marker
(py.typed) of both packages, so that type checkers read their annotations."""
import email
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from this tree, as pip builds it (the extension included)."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), ROOT], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "No module named" in r.stderr and "setuptools" in r.stderr:
        pytest.skip("setuptools is not installed here")
    assert r.returncode == 0, r.stderr[-3000:]
    [whl] = [p for p in out.iterdir() if p.name.endswith(".whl")]
    with zipfile.ZipFile(whl) as z:
        yield {n: z.read(n) for n in z.namelist() if not n.endswith((".so", ".c"))}


def test_wheel_has_py_typed(wheel):
    assert "blocktable/py.typed" in wheel
    assert "blocktable_daemon/py.typed" in wheel


def test_wheel_metadata(wheel):
    [meta_name] = [n for n in wheel if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(wheel[meta_name])
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel)
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "bt-ctl" in meta.get_payload()                   # the README is the description
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Operating System :: POSIX :: Linux" in classifiers
    assert meta["Requires-Python"] == ">=3.11"
    assert "shtab>=1.7; extra == \"daemon\"" in meta.get_all("Requires-Dist")
    # URLs only where the project has a public one (none yet): never a placeholder.
    for url in meta.get_all("Project-URL") or []:
        assert "example" not in url and "TODO" not in url, url


def test_license_file():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
