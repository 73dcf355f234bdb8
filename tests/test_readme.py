"""The README holds: its examples marked runnable run as written, its bt-ctl table
names every command bt-ctl has (and no other), and it speaks to users only."""
import os
import re
import subprocess
import sys

import pytest

from blocktable_daemon.ctl import subcommands
from blocktable_daemon.testing import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- runnable -->"


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def runnable_blocks(text):
    """The ```python blocks right after a <!-- runnable --> line."""
    return re.findall(re.escape(MARK) + r"\n```python\n(.*?)\n```", text, re.S)


def test_readme_has_runnable_examples():
    blocks = runnable_blocks(readme())
    assert len(blocks) >= 2 and text_count(readme(), MARK) == len(blocks)
    assert any("step_plan" in b and "plan.run" in b for b in blocks)


def text_count(text, word):
    return text.count(word)


@pytest.mark.parametrize("i", range(len(runnable_blocks(readme()))))
def test_readme_example_runs(i, tmp_path):
    code = runnable_blocks(readme())[i]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"README example {i} failed:\n{code}\n{r.stderr}"


def test_readme_lists_every_bt_ctl_command():
    text = readme()
    section = text[text.index("## bt-ctl"):]
    section = section[:section.index("\n## ", 1)]
    listed = re.findall(r"^\| `bt-ctl ([a-z-]+)", section, re.M)
    assert sorted(listed) == sorted(subcommands())
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("word", [r"\bthe seed\b", r"\bseed's\b", r"\bthe brief\b",
                                  r"device machine", r"\bissue \d", r"/work/", r"\bshared/",
                                  r"\bdev VM\b", r"\bhelper\b", r"\bcoordinator\b"])
def test_readme_speaks_to_users(word):
    found = re.findall(r".{0,40}" + word + r".{0,40}", readme(), re.I)
    assert not found, found


def test_paths_named_in_the_readme_exist():
    """Every repository path the README names (in backticks or as a link) exists: no
    stale pointers, no links to files outside the repository."""
    text = readme()
    tops = ("libbt/", "bindings/", "daemon/", "tests/", "bench/", "examples/", "systemd/",
            "docs/make_api.py")
    named = [p for p in re.findall(r"`([A-Za-z0-9_.-]+/[A-Za-z0-9_./-]*)`", text)
             if p.startswith(tops)]
    named += [p for p in re.findall(r"\]\(([^)]+)\)", text) if not p.startswith("http")]
    named += [w for w in ("LICENSE", "CHANGELOG.md", "SECURITY.md") if f"`{w}`" in text]
    assert named
    missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing
