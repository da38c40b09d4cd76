"""A git + DVC repository that records pipeline runs, so anyone can ``git clone`` + ``dvc pull``.

Layout (one commit and one tag per run)::

    .dvc/config              remote "store": S3 URL + endpoint (committed; never credentials)
    outputs/<stage>.dvc      pointer to the stage output of the latest recorded run
    runs/<run_id>.json       lineage: stage -> md5, cached?, seconds, metrics, inputs

``git checkout <run_id> && dvc pull outputs/<stage>.dvc`` gives that run's bytes on any machine
that can reach the S3 endpoint (override it with ``dvc remote modify --local store endpointurl``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medsight.io_utils import atomic_write_json, atomic_write_text
from medsight.platform.artifacts import ArtifactRef, ArtifactStoreError, StoreConfig, configure_dvc_repo, quiet

_GIT_IDENTITY = ["-c", "user.name=medsight", "-c", "user.email=medsight@localhost", "-c", "commit.gpgsign=false"]


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *_GIT_IDENTITY, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ArtifactStoreError(f"git {' '.join(args)} in {repo} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


class RunRepo:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    def ensure(self, store: StoreConfig) -> None:
        """Create (or update the endpoint of) the repo; committing the remote definition."""
        from dvc.repo import Repo

        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / ".git").is_dir():
            _git(self.path, "init", "-q", "-b", "main")
        if not (self.path / ".dvc").is_dir():
            with quiet():
                Repo.init(str(self.path)).close()
        repo = Repo(str(self.path))
        try:
            configure_dvc_repo(repo, store)
        finally:
            repo.close()
        (self.path / "outputs").mkdir(exist_ok=True)
        (self.path / "runs").mkdir(exist_ok=True)
        self._commit_if_changed("medsight: DVC remote definition")

    def _commit_if_changed(self, message: str) -> bool:
        _git(self.path, "add", "-A")
        if not _git(self.path, "status", "--porcelain"):
            return False
        _git(self.path, "commit", "-q", "-m", message)
        return True

    def record_run(self, run_id: str, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
        """Write pointers + lineage for ``run_id``, commit, tag; returns the commit id.

        A stage with one output gets ``outputs/<stage>.dvc``; an ablation's several outputs of
        one stage get ``outputs/<stage>-<md5[:8]>.dvc`` each.
        """
        by_stage: dict[str, list[Mapping[str, Any]]] = {}
        for record in records:
            by_stage.setdefault(record["stage"], []).append(record)
        # HEAD shows this run only; earlier runs stay reachable through their tags.
        for old in (self.path / "outputs").glob("*.dvc"):
            old.unlink()
        ignore = []
        for stage, mine in by_stage.items():
            distinct = {r["ref"]["md5"]: r for r in mine}
            for md5, record in distinct.items():
                ref = ArtifactRef.parse(json.dumps(record["ref"]))
                if ref is None:
                    continue
                name = stage if len(distinct) == 1 else f"{stage}-{md5[:8]}"
                atomic_write_text(self.path / "outputs" / f"{name}.dvc", ref.pointer(name))
                ignore += [f"/{name}", f"/.{name}.md5"]
        gitignore = self.path / "outputs" / ".gitignore"
        known = set(gitignore.read_text().split()) if gitignore.is_file() else set()
        atomic_write_text(gitignore, "\n".join(sorted(known | set(ignore))) + "\n")
        atomic_write_json(self.path / "runs" / f"{run_id}.json", {"run_id": run_id, **summary, "stages": list(records)})
        self._commit_if_changed(f"run {run_id}")
        _git(self.path, "tag", "-f", run_id)
        return _git(self.path, "rev-parse", "HEAD")

    def pull(self, stage: str) -> Path:
        """``dvc pull outputs/<stage>.dvc`` into the repo's workspace (uses the repo's own cache)."""
        from dvc.repo import Repo

        pointer = self.path / "outputs" / f"{stage}.dvc"
        if not pointer.is_file():
            raise ArtifactStoreError(f"{pointer} does not exist; stages recorded: {', '.join(self.stages()) or 'none'}")
        repo = Repo(str(self.path))
        try:
            with quiet():
                repo.pull(targets=[str(pointer)])
        except Exception as error:
            raise ArtifactStoreError(f"dvc pull {pointer} failed: {error}; is the S3 server up?") from error
        finally:
            repo.close()
        md5 = yaml.safe_load(pointer.read_text())["outs"][0]["md5"]
        atomic_write_text(self.path / "outputs" / f".{stage}.md5", md5 + "\n")
        return self.path / "outputs" / stage

    def checkout_dir(self, stage: str, md5: str) -> Path | None:
        """The workspace copy of ``stage`` if it already holds ``md5`` (saves a pull), else None."""
        marker = self.path / "outputs" / f".{stage}.md5"
        target = self.path / "outputs" / stage
        if target.is_dir() and marker.is_file() and marker.read_text().strip() == md5:
            return target
        return None

    def stages(self) -> list[str]:
        return sorted(p.name.removesuffix(".dvc") for p in (self.path / "outputs").glob("*.dvc"))

    def runs(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "runs").glob("*.json"))


def client_env_file(s3_dir: Path, env: Mapping[str, str]) -> Path:
    """``export`` lines for S3 clients (dvc, aws, mlflow), written 0600 so only the owner reads it."""
    path = Path(s3_dir) / "client.env"
    lines = [f"export {key}={value}" for key, value in env.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path
