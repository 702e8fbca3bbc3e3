"""The README cannot rot: its Python snippet runs as written, its CPU smoke command runs and writes what it says,
every page and picture it points to exists, and it stays a front page."""
import os
import re
import subprocess
import sys

from conftest import ENV, HERE, decode_png

README = open(os.path.join(HERE, "README.md")).read()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_the_python_snippet_runs():
    """The one python block, executed as it stands (in a fresh interpreter, from the repository)."""
    (snippet,) = blocks("python")
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=HERE, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr


def test_the_smoke_command_runs(tmp_path):
    """The CPU quick start's one-line smoke test trains, checkpoints and samples (run in a scratch folder)."""
    line = next(b for b in blocks("") if "--out smoke" in b).strip()
    assert "\n" not in line  # one line, as promised
    for script in ("train.py", "sample.py"):
        line = line.replace(f"python {script}", f"{sys.executable} {os.path.join(HERE, script)}")
    r = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "smoke" / "ckpt.pt").exists() and decode_png(tmp_path / "smoke.png").shape[2] == 3
    assert r.stderr == ""  # no warning: the first thing a new user reads


def test_ci_runs_the_readme_set_up_as_written():
    """.ci/run runs the README's set-up lines, every one and in their order: the install line and the test command
    come before any extra."""
    (setup,) = [b for b in blocks("") if "pip install -r requirements.txt" in b]
    lines = [line.split("#")[0].strip() for line in setup.splitlines() if line.strip()]
    ci = [line.strip() for line in open(os.path.join(HERE, ".ci", "run")).read().splitlines()]
    assert [ci.index(line) for line in lines] == sorted(ci.index(line) for line in lines)


def test_links_pictures_and_length():
    """Every docs/ page is linked from the README, every linked file and picture exists, and the README is a front
    page (at most about 300 lines)."""
    links = set(re.findall(r"\]\(([^)#]+)\)", README)) | set(re.findall(r'src="([^"]+)"', README))
    local = {link for link in links if not link.startswith("http")}
    assert all(os.path.exists(os.path.join(HERE, link)) for link in local), sorted(local)
    pages = {f"docs/{f}" for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md")}
    assert pages <= local, sorted(pages - local)
    for page in pages:  # and the pictures the pages show
        text = open(os.path.join(HERE, page)).read()
        for src in re.findall(r'src="([^"]+)"', text) + re.findall(r"\]\(([^)#:]+)\)", text):
            assert os.path.exists(os.path.join(HERE, "docs", src)), (page, src)
    assert len(README.splitlines()) <= 300
