"""component_runtime: restore-or-run through the run-cache, with a stand-in stage function."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsight.config.access import covered
from medsight.platform.artifacts import ArtifactRef, ArtifactStore, ArtifactStoreError
from medsight.config import ConfigError
from medsight.platform.component_runtime import WORK_DIR_ENV, execute_stage, resolve_config
from medsight.platform.kfp_component import artifact_ref, run_component
from medsight.stages.registry import StageSpec
from platform_fixtures import s3_server, store_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stage becomes a quick function that writes a result derived from its config + inputs."""
    calls: list[str] = []

    def load(spec: StageSpec) -> Any:
        def run(config: Any, inputs: dict[str, Path], output: Path, tracker: Any) -> dict[str, float]:
            calls.append(spec.name)
            seen = {name: sorted(p.name for p in path.rglob("*")) for name, path in inputs.items()}
            # Like a real stage, it reads only config fields inside its view.
            codes = config.model.codebook.codes_per_modality if covered("model.codebook", spec.reads) else None
            two_way = config.model.perceiver.two_way if covered("model.perceiver.two_way", spec.reads) else None
            (output / "weights.json").write_text(json.dumps({"inputs": seen, "codes": codes, "two_way": two_way}))
            return {"val_dice": 0.25}

        return run

    monkeypatch.setattr(StageSpec, "load", load)
    return calls


def test_rerun_restores_and_only_relevant_changes_recompute(store_env: dict, fake_stages: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve_config("tiny", [])
    data = execute_stage("synth-data", {}, config, run_id="r1")
    assert not data.cached and fake_stages == ["synth-data"]
    assert ArtifactStore().in_remote(data.ref)
    base = execute_stage("base-models", {"data": data.ref.to_json()}, config, run_id="r1")
    inputs = {"data": data.ref.to_json(), "base": base.ref.to_json()}
    first = execute_stage("perceiver-pretrain", inputs, config, run_id="r1")
    assert not first.cached and first.metrics == {"val_dice": 0.25}

    again = execute_stage("perceiver-pretrain", inputs, config, run_id="r2")
    assert again.cached and again.ref == first.ref and fake_stages.count("perceiver-pretrain") == 1
    # A section the stage does not read (the codebook) leaves it cached...
    other = resolve_config("tiny", ["model.codebook.codes_per_modality=8"])
    assert execute_stage("perceiver-pretrain", inputs, other, run_id="r3").cached
    # ...one it reads recomputes it.
    assert not execute_stage("perceiver-pretrain", inputs, resolve_config("tiny", ["model.perceiver.two_way=false"])).cached
    monkeypatch.setenv("MEDSIGHT_FORCE_RERUN", "perceiver-pretrain")
    assert not execute_stage("perceiver-pretrain", inputs, config).cached
    store = ArtifactStore()
    assert {r["stage"] for r in store.load_lineage("r1")} == {"synth-data", "base-models", "perceiver-pretrain"}
    assert store.resolve("run:r2/perceiver-pretrain") == ArtifactRef.parse(first.ref.to_json())


def test_missing_required_input_names_its_source(store_env: dict, fake_stages: list[str]) -> None:
    with pytest.raises(ArtifactStoreError, match="needs input 'model' \\(the output of instruct-tune\\)"):
        execute_stage("evaluate", {"data": "0" * 32 + ".dir", "base": "1" * 32 + ".dir", "model": "",
                                   "grounding": "2" * 32 + ".dir"}, resolve_config("tiny", []))
    with pytest.raises(ArtifactStoreError, match="unknown input 'nope'"):
        execute_stage("synth-data", {"nope": ""}, resolve_config("tiny", []))


class _FakeArtifact:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.metadata: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


def test_run_component_writes_kfp_outputs(store_env: dict, tmp_path: Path, monkeypatch) -> None:
    """The component body runs the stage CLI in a child process, then fills its KFP outputs."""
    output, metrics = _FakeArtifact(tmp_path / "out" / "output"), _FakeArtifact(tmp_path / "out" / "metrics")
    card = _FakeArtifact(tmp_path / "out" / "card")
    small = ["data.train_images=2", "data.val_images=1", "data.test_images=1", "data.seed=3"]
    run_component("synth-data", preset="tiny", overrides=small, inputs={}, output=output, metrics=metrics, card=card)
    ref = ArtifactRef.parse(artifact_ref(output))
    assert ref is not None and not output.metadata["cached"]
    assert f"md5: {ref.md5}" in Path(output.path).read_text()  # a .dvc pointer: `dvc pull` can use it
    pointer = yaml.safe_load(Path(output.path).read_text())
    # What a KFP UI reader sees in the artifact: where the bytes are and how to fetch them.
    assert pointer["meta"]["store_uri"] == output.metadata["store_uri"]
    assert pointer["meta"]["dvc_remote"].endswith("/store/dvc") and "medsight platform pull --md5" in pointer["meta"]["pull"][0]
    assert output.metadata["dvc_md5"] == ref.md5 and metrics.metrics["cached"] == 0.0
    assert output.metadata["store_uri"].endswith(ref.md5[2:]) and metrics.metrics["train_images"] == 2.0
    assert "synth-data" in Path(card.path).read_text() and ref.md5 in Path(card.path).read_text()
    # The same call again is a hit; a registered data revision stands in for the stage.
    again = _FakeArtifact(tmp_path / "again" / "output")
    run_component("synth-data", preset="tiny", overrides=small, inputs={}, output=again,
                  metrics=_FakeArtifact(tmp_path / "m2"), card=_FakeArtifact(tmp_path / "c2"))
    assert again.metadata["cached"] is True and again.metadata["dvc_md5"] == ref.md5
    # A hit in a fresh executor process (as kfp.local and a cluster pod start it) restores the
    # stage without importing torch, DVC, MLflow or the Kubernetes client.
    probe = textwrap.dedent(f"""
        import json, os, sys
        os.environ["_KFP_RUNTIME"] = "true"
        import kfp.dsl.executor_main
        from medsight.platform.kfp_component import run_component
        class Artifact:
            def __init__(self, path):
                self.path, self.metadata = path, {{}}
            def log_metric(self, name, value):
                pass
        out = Artifact({str(tmp_path / "probe" / "output")!r})
        run_component("synth-data", preset="tiny", overrides={small!r}, inputs={{}}, output=out,
                      metrics=Artifact({str(tmp_path / "probe" / "m")!r}), card=Artifact({str(tmp_path / "probe" / "c")!r}))
        heavy = [m for m in ("torch", "dvc", "mlflow", "kubernetes", "deepspeed") if m in sys.modules]
        print("PROBE=" + json.dumps({{"cached": out.metadata["cached"], "heavy": heavy}}))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("PROBE="))[6:])
    assert report == {"cached": True, "heavy": []}, report
    used = _FakeArtifact(tmp_path / "used" / "output")
    run_component("synth-data", preset="tiny", overrides=[*small, "data.seed=4"], inputs={}, output=used,
                  metrics=_FakeArtifact(tmp_path / "m3"), card=_FakeArtifact(tmp_path / "c3"), use_existing=ref.md5)
    assert used.metadata["dvc_md5"] == ref.md5
    # A bad setting is refused in the component's own process, naming the key.
    with pytest.raises(ConfigError, match="data.train_images"):
        run_component("synth-data", preset="tiny", overrides=["data.train_images=-1"], inputs={},
                      output=_FakeArtifact(tmp_path / "f"), metrics=_FakeArtifact(tmp_path / "m4"),
                      card=_FakeArtifact(tmp_path / "c4"))
    # A stage process that fails (here: its work folder is a file) fails the component, naming it.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(WORK_DIR_ENV, str(blocker))
    with pytest.raises(RuntimeError, match="stage synth-data failed"):
        run_component("synth-data", preset="tiny", overrides=[*small, "data.seed=5"], inputs={},
                      output=_FakeArtifact(tmp_path / "f"), metrics=_FakeArtifact(tmp_path / "m5"),
                      card=_FakeArtifact(tmp_path / "c5"))


def test_input_artifacts_carry_dvc_references(tmp_path: Path) -> None:
    artifact = _FakeArtifact(tmp_path / "a")
    artifact.metadata = {"dvc_md5": "ab" * 16 + ".dir", "size": 12.0, "nfiles": 3.0, "stage": "synth-data"}
    ref = ArtifactRef.parse(artifact_ref(artifact))
    # KFP returns metadata numbers as floats; the reference keeps DVC's integers.
    assert ref == ArtifactRef(md5="ab" * 16 + ".dir", size=12, nfiles=3, stage="synth-data")
    assert artifact_ref(None) == "" and artifact_ref("cd" * 16 + ".dir") == "cd" * 16 + ".dir"
    pointer = tmp_path / "pointer"
    pointer.write_text(ref.pointer("x"))
    imported = _FakeArtifact(pointer)  # an artifact from elsewhere: only its .dvc pointer
    assert ArtifactRef.parse(artifact_ref(imported)).md5 == ref.md5


_FAST_EXIT_SCRIPT = """
import atexit, json, sys
from pathlib import Path
out, marks, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
atexit.register(lambda: (marks / "registered-before").write_text("ran"))
from medsight.platform.fast_exit import install_for_kfp_executor
armed = install_for_kfp_executor(["executor_main", "--executor_input", json.dumps({"outputs": {"outputFile": str(out)}})])
atexit.register(lambda: (marks / "registered-after").write_text("ran"))
print("armed" if armed else "not armed", flush=False)  # unflushed: the fast exit must flush it
if mode == "fail":
    raise RuntimeError("component failed before writing its outputs")
out.write_text("{}")
"""


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_fast_exit_only_after_the_executor_output_is_written(tmp_path: Path, mode: str) -> None:
    import subprocess
    import sys

    out, marks = tmp_path / "executor_output.json", tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FAST_EXIT_SCRIPT, str(out), str(marks), mode],
                          capture_output=True, text=True)
    assert "armed" in proc.stdout
    # Handlers registered after arming (the stage's libraries) always run.
    assert (marks / "registered-after").is_file()
    if mode == "ok":
        assert proc.returncode == 0, proc.stderr
        # Teardown (and handlers registered before arming) skipped: the process ended right away.
        assert not (marks / "registered-before").exists()
    else:
        assert proc.returncode == 1 and "component failed" in proc.stderr
        assert (marks / "registered-before").is_file()  # normal exit path


def test_executor_output_file_is_read_from_the_executor_arguments() -> None:
    from medsight.platform.fast_exit import executor_output_file

    argv = ["x", "--executor_input", '{"outputs": {"outputFile": "/tmp/a/executor_output.json"}}', "--function_to_execute", "f"]
    assert executor_output_file(argv) == Path("/tmp/a/executor_output.json")
    assert executor_output_file(["x", "--executor_input", "not json"]) is None
    assert executor_output_file(["pytest", "-q"]) is None


def test_a_component_starts_one_rank_per_gpu_it_sees(monkeypatch) -> None:
    """The compiled DAG asks for N GPUs per LLM stage; run where fewer (or none) are visible, as
    kfp.local on a laptop does, the component does not start N CPU ranks on a few cores."""
    from medsight.train.launch import pod_ranks

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pod_ranks("8") == "1" and pod_ranks("1") == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert pod_ranks("8") == "4" and pod_ranks("2") == "2"
    with pytest.raises(ValueError, match="positive number"):
        pod_ranks("zero")
