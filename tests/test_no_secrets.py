"""No credentials in the repository, compiled pipelines, images or manifests; the scanner works.

Planted secrets below are assembled at run time so that this file itself stays clean.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from medsight.platform.secret_scan import (
    REDACTED,
    main,
    redact,
    repo_files,
    scan_k8s_secrets,
    scan_paths,
    scan_repo,
    scan_text,
)

ROOT = Path(__file__).resolve().parents[1]

AWS_ID_LITERAL = "AKIA" + "Q7XZ3RTY5UIO2PLK"
AWS_KEY_LITERAL = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCYzzKEY42"
PW_LITERAL = "Tr0ub4dor" + "-and-3"
OPAQUE_LITERAL = "mF_9.B5f-4.1JqM" + "9x2LpQ7vW3kZ8rT"
JWT_LITERAL = "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiJtZWRzaWdodCJ9" + ".c2lnbmF0dXJlLXZhbHVl"
PEM_HEADER = "-----BEGIN " + "OPENSSH PRIVATE KEY-----"
GH_LITERAL = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"

PLANTED = {
    "config/aws.ini": f"[default]\naws_access_key_id = {AWS_ID_LITERAL}\naws_secret_access_key = {AWS_KEY_LITERAL}\n",
    "deploy/values.yaml": f"minio:\n  rootUser: admin\n  rootPassword: {PW_LITERAL}\n",
    "keys/id_ed25519": f"{PEM_HEADER}\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    "notes/run.log": f"GET /apis/v2beta1/runs Authorization: Bearer {OPAQUE_LITERAL}\n",
    "notes/kubeconfig": f"users:\n- name: ci\n  user:\n    token: {JWT_LITERAL}\n",
    "tool/settings.py": f'GITHUB = "{GH_LITERAL}"\nDB_URL = "postgresql://mlflow:{PW_LITERAL}@db:5432/mlflow"\n',
}
EXPECTED_RULES = {
    "config/aws.ini": {"aws-access-key-id", "secret-assignment"},
    "deploy/values.yaml": {"secret-assignment"},
    "keys/id_ed25519": {"private-key"},
    "notes/run.log": {"bearer-token"},
    "notes/kubeconfig": {"jwt"},
    "tool/settings.py": {"github-token", "url-credentials"},
}
PLACEHOLDERS = """\
AWS_SECRET_ACCESS_KEY=CHANGE_ME
MINIO_ROOT_PASSWORD=${MINIO_ROOT_PASSWORD}
export KFP_BEARER_TOKEN=$(kubectl create token medsight-pipeline-runner)
password: <your password>
secretKey: AWS_SECRET_ACCESS_KEY
secretName: medsight-s3-credentials
postgresql://USER:$(cat pw.txt)@HOST:5432/mlflow
pad_token: "[PAD]"
Authorization: Bearer $KFP_BEARER_TOKEN
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture()
def planted_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for rel, text in PLANTED.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    (repo / "clean.env.example").write_text(PLACEHOLDERS)
    # Ignored files are not part of what could be committed ...
    (repo / ".gitignore").write_text("/outputs/\n/pipelines/compiled/\n")
    (repo / "outputs").mkdir()
    (repo / "outputs" / "scratch.txt").write_text(f"password = {PW_LITERAL}\n")
    # ... except compiled pipelines, which are scanned even when ignored.
    (repo / "pipelines" / "compiled").mkdir(parents=True)
    (repo / "pipelines" / "compiled" / "medsight.yaml").write_text(f"env:\n  api_key: {PW_LITERAL}\n")
    return repo


def test_repository_has_no_secrets() -> None:
    findings = scan_repo(ROOT)
    assert findings == [], "secrets found (values redacted):\n" + "\n".join(map(str, findings))


def test_repository_scan_covers_images_manifests_and_compiled_pipelines() -> None:
    rel = {str(p.relative_to(ROOT)) for p in repo_files(ROOT)}
    for expected in (
        "images/Dockerfile",
        "images/Dockerfile.cpu",
        "manifests/base/minio.yaml",
        "manifests/overlays/dev/s3-credentials.env.example",
        "manifests/overlays/h100/gpu-pool.env",
        "medsight/platform/secret_scan.py",
    ):
        assert expected in rel
    compiled = ROOT / "pipelines" / "compiled"
    if compiled.is_dir():
        for path in compiled.rglob("*.y*ml"):
            assert str(path.relative_to(ROOT)) in rel


def test_scanner_catches_planted_secrets(planted_repo: Path) -> None:
    findings = scan_paths(repo_files(planted_repo), planted_repo.resolve())
    rules: dict[str, set[str]] = {}
    for finding in findings:
        rules.setdefault(finding.source, set()).add(finding.rule)
    for rel, expected in EXPECTED_RULES.items():
        assert expected <= rules.get(rel, set()), f"{rel}: found {rules.get(rel)}"
    assert "pipelines/compiled/medsight.yaml" in rules, "ignored compiled pipelines are still scanned"
    assert "outputs/scratch.txt" not in rules, "git-ignored run outputs are not scanned"
    assert "clean.env.example" not in rules, f"placeholders flagged: {findings}"
    for finding in findings:  # reports never repeat the secret
        for secret in (AWS_ID_LITERAL, AWS_KEY_LITERAL, PW_LITERAL, OPAQUE_LITERAL, JWT_LITERAL, GH_LITERAL):
            assert secret not in str(finding)
        assert REDACTED in finding.excerpt


def test_cli_exit_codes(planted_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--repo", str(planted_repo)]) == 1
    assert PW_LITERAL not in capsys.readouterr().out
    assert main([str(planted_repo / "clean.env.example")]) == 0


def test_python_sources_only_flag_quoted_literals() -> None:
    code = 'token = resolve_token()\npassword: str = field()\nkwargs["existing_token"] = token\n'
    assert scan_text(code, "x.py", quoted_only=True) == []
    assert scan_text(f'password = "{PW_LITERAL}"\n', "x.py", quoted_only=True)


def test_redact_logs() -> None:
    log = (
        f"step 10 loss 0.3\nconnecting with Authorization: Bearer {OPAQUE_LITERAL}\n"
        f"MINIO_ROOT_PASSWORD={PW_LITERAL} AWS_ACCESS_KEY_ID={AWS_ID_LITERAL}\nplaceholder password=CHANGE_ME\n"
    )
    clean = redact(log)
    for secret in (OPAQUE_LITERAL, PW_LITERAL, AWS_ID_LITERAL):
        assert secret not in clean
    assert "step 10 loss 0.3" in clean and "password=CHANGE_ME" in clean
    assert clean.count(REDACTED) == 3
    assert scan_text(clean) == []


def test_rendered_secret_objects() -> None:
    def secret(value: str) -> dict[str, object]:
        encoded = base64.b64encode(value.encode()).decode()
        return {"kind": "Secret", "metadata": {"name": "s"}, "data": {"AWS_SECRET_ACCESS_KEY": encoded}}

    assert scan_k8s_secrets([secret("CHANGE_ME")]) == []
    [finding] = scan_k8s_secrets([secret(PW_LITERAL)])
    assert finding.rule == "k8s-secret-value" and PW_LITERAL not in str(finding)
    string_data = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"password": PW_LITERAL}}
    assert scan_k8s_secrets([string_data])
    # The base64 form of a real value in rendered YAML text is caught too.
    encoded = base64.b64encode(PW_LITERAL.encode()).decode()
    assert scan_text(f"data:\n  AWS_SECRET_ACCESS_KEY: {encoded}\n")
