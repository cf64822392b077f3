"""The README is a short front page whose links resolve and whose quick start runs; the docs site builds strictly."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q tests'
LINK = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """Python-Markdown's default toc slug (what mkdocs and these links use)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s-]+", "-", text).strip("-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # '#' comments in code are not headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)}


def code_block(md: Path, heading: str, language: str = "python") -> str:
    """The first ```<language> block after `heading`."""
    text = md.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no {language} block after {heading!r} in {md.name}"
    return match.group(1)


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move long text to a docs/ page"


def test_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in README.read_text(encoding="utf-8")
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [a or b for a, b in LINK.findall(text)]
    assert targets, "the README links nothing"
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue  # external URL: not checked offline
        path, _, anchor = target.partition("#")
        file = README if not path else (ROOT / path)
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"README links that do not resolve: {broken}"


def test_readme_quick_start_runs(capsys, monkeypatch, tmp_path):
    # as on a user's CPU: conftest's TRITON_INTERPRET=1 would route the compressed cache through the slow interpreter
    monkeypatch.setenv("VAR_KERNELS", "torch")
    monkeypatch.chdir(tmp_path)  # it writes var_grid.png
    code = code_block(README, "## Quick start")
    exec(compile(code, "README.md quick start", "exec"), {"__name__": "readme_quick_start"})
    out = capsys.readouterr().out
    assert out.count("torch.Size([4, 3, 32, 32])") == 2, out
    assert (tmp_path / "var_grid.png").stat().st_size > 0


def test_training_quick_start_commands_run(tmp_path, monkeypatch):
    """docs/training.md's 3-minute quick start, shortened to 3 steps on 64 images (later flags override)."""
    import shlex

    from var.cli.eval import main as eval_main
    from var.cli.sample import main as sample_main
    from var.cli.train import main as train_main
    monkeypatch.chdir(ROOT)  # the commands name var/assets/... from the repository root
    lines = [line for line in code_block(ROOT / "docs" / "training.md", "### Quick start", "bash").splitlines() if line]
    mains = {"var-train": train_main, "var-eval": eval_main, "var-sample": sample_main}
    short = {"var-train": ["--steps", "3", "--num-images", "64", "--no-progress"], "var-eval": ["--per-class", "1"],
             "var-sample": []}
    for line in lines:
        argv = [a.replace("runs/quick", str(tmp_path / "quick")).replace("quick.png", str(tmp_path / "q.png"))
                for a in shlex.split(line)]
        assert mains[argv[0]]([*argv[1:], *short[argv[0]], "--device", "cpu"]) == 0, line
    assert (tmp_path / "q.png").exists()


def test_install_page_python_example_runs():
    namespace = {"__name__": "docs_install_example"}
    exec(compile(code_block(ROOT / "docs" / "install.md", "## Sample from Python"), "docs/install.md", "exec"),
         namespace)
    images = namespace["out"].images
    assert tuple(images.shape) == (4, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_docs_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail('mkdocs/mkdocstrings missing in CI: they belong to the "dev" extra of setup.py')
        pytest.skip('mkdocs not installed (pip install -e ".[dev]")')
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARNING" not in log, log
    assert (tmp_path / "site" / "api" / "index.html").exists()
