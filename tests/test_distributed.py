"""Data-parallel training through the real launcher (torchrun, gloo, DS_ACCELERATOR=cpu) at world
size 2: stage 1 under DDP and stage 3 under DeepSpeed ZeRO-3, fp32 and bf16.

What is shown, on the MINI world (tests/distributed_fixtures.py):
- the loss of every step at 2 ranks x batch B equals the loss at 1 rank x batch 2B (same global
  batch, same samples). Tolerance 1e-5 relative in fp32: the ranks' losses are normalised by
  the global batch's counts (criterion / language_training), so the only differences left are
  float32 summation order (gloo's all-reduce, half-size matmuls), measured at ~1e-7; 2e-2 in
  bf16, whose 8-bit mantissa turns the same reordering into ~1e-3 relative steps;
- outputs and tracking are written once (rank 0): one history line per step, stage.json
  records world size 2, the same files as the 1-rank run;
- kill -9 of one rank: the job fails with a line naming the rank; the same command resumes
  from the last checkpoint and ends with the uninterrupted run's metrics.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from distributed_fixtures import MINI, build_inputs, cli, sets
from platform_fixtures import s3_server, store_env  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.slow

STAGE1 = [*MINI, "perceiver_pretrain.max_steps=6", "perceiver_pretrain.log_every=1",
          "perceiver_pretrain.checkpoint_every=3"]
STAGE3 = [*MINI, "v2t_align.epochs=2", "v2t_align.max_steps=6", "v2t_align.log_every=1", "v2t_align.checkpoint_every=2",
          "v2t_align.lr=0.02", "v2t_align.deepspeed.zero_stage=3", "v2t_align.visual_cache_mb=0"]


STAGE5 = [*MINI, "model.codebook.codes_per_modality=4", "instruct_tune.epochs=1", "instruct_tune.max_steps=4",
          "instruct_tune.log_every=1", "instruct_tune.checkpoint_every=2", "instruct_tune.lr=0.01",
          "instruct_tune.deepspeed.zero_stage=3", "instruct_tune.visual_cache_mb=0"]
INPUTS = {"perceiver-pretrain": ("data", "base"), "v2t-align": ("data", "base", "perceiver"),
          "instruct-tune": ("data", "base", "codebook", "grounding"),
          "evaluate": ("data", "base", "model", "grounding")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("mini"), ("perceiver-pretrain", "grounding-data"))


def _run(world, stage: str, out: Path, overrides: list[str], ranks: int, check: bool = True):
    inputs = INPUTS[stage]
    args = ["stage", "run", stage, "--out", str(out), *(f"--input={n}={world[n]}" for n in inputs), *sets(overrides)]
    return cli(*args, "--nproc-per-node", str(ranks), check=check)


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _losses(out: Path, key: str) -> list[float]:
    return [point[key] for point in _history(out)]


def _assert_close(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= rtol * abs(x), f"step {step}: {x} vs {y} (rtol {rtol})"


@pytest.mark.parametrize("bf16, rtol", [(False, 1e-5), (True, 2e-2)])
def test_stage1_ddp_two_ranks_match_one_rank_at_the_same_global_batch(world, tmp_path, bf16, rtol):
    precision = [f"perceiver_pretrain.bf16={str(bf16).lower()}"]
    one = _run(world, "perceiver-pretrain", tmp_path / "one", [*STAGE1, *precision, "perceiver_pretrain.batch_size=4"], 1)
    two = _run(world, "perceiver-pretrain", tmp_path / "two", [*STAGE1, *precision, "perceiver_pretrain.batch_size=2"], 2)
    _assert_close(_losses(tmp_path / "one", "perceiver-pretrain/loss"), _losses(tmp_path / "two", "perceiver-pretrain/loss"), rtol)
    m1, m2 = json.loads(one.stdout), json.loads(two.stdout)
    assert abs(m1["val_dice"] - m2["val_dice"]) <= max(rtol, 1e-4) * 10
    # Written once: one history line per step, the same files as one process, world size recorded.
    assert [p["step"] for p in _history(tmp_path / "two")] == list(range(1, 7))
    record_one = json.loads((tmp_path / "one" / "stage.json").read_text())
    record_two = json.loads((tmp_path / "two" / "stage.json").read_text())
    assert record_two["world_size"] == 2 and record_one["world_size"] == 1
    assert record_two["files"] == record_one["files"]
    assert not list(tmp_path.glob(".*.partial"))  # checkpoints went with the working folder


@pytest.mark.parametrize("bf16, rtol", [(False, 1e-5), (True, 2e-2)])
def test_stage3_zero3_two_ranks_match_one_rank_at_the_same_global_batch(world, tmp_path, bf16, rtol):
    # Four steps of 4 captions: the prepared alignment split holds 17, so a fifth step would be
    # a partial batch, which one rank and two ranks (padded to even shares) fill differently.
    precision = [f"v2t_align.deepspeed.bf16={str(bf16).lower()}", "v2t_align.max_steps=4"]
    _run(world, "v2t-align", tmp_path / "one", [*STAGE3, *precision, "v2t_align.batch_size=4"], 1)
    _run(world, "v2t-align", tmp_path / "two", [*STAGE3, *precision, "v2t_align.batch_size=2"], 2)
    _assert_close(_losses(tmp_path / "one", "v2t-align/loss"), _losses(tmp_path / "two", "v2t-align/loss"), rtol)
    # The consolidated projector (float32 master weights, gathered from both ZeRO-3 partitions).
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "modules" / "v2t.safetensors"))
    two = load_file(str(tmp_path / "two" / "modules" / "v2t.safetensors"))
    assert one.keys() == two.keys() and all(t.numel() for t in two.values())
    for name in one:
        assert (one[name] - two[name]).abs().max() <= (1e-4 if not bf16 else 5e-2), name
    assert [p["step"] for p in _history(tmp_path / "two")] == list(range(1, 5))


@pytest.mark.parametrize("bf16, rtol", [(False, 1e-5), (True, 2e-2)])
def test_stage5_zero3_two_ranks_match_one_rank_then_evaluation_matches_too(world, tmp_path, bf16, rtol):
    """Stage 5 trains the LLM itself (ZeRO-3 shards its 8.2B parameters at full scale) with the
    LM + seg loss; its consolidated LLM and modules are written once. Then evaluation sharded
    over 2 ranks scores that model as one process does."""
    precision = [f"instruct_tune.deepspeed.bf16={str(bf16).lower()}"]
    _run(world, "instruct-tune", tmp_path / "one", [*STAGE5, *precision, "instruct_tune.batch_size=4"], 1)
    _run(world, "instruct-tune", tmp_path / "two", [*STAGE5, *precision, "instruct_tune.batch_size=2"], 2)
    _assert_close(_losses(tmp_path / "one", "instruct-tune/loss"), _losses(tmp_path / "two", "instruct-tune/loss"), rtol)
    _assert_close(_losses(tmp_path / "one", "instruct-tune/seg"), _losses(tmp_path / "two", "instruct-tune/seg"), rtol * 10)
    assert (tmp_path / "two" / "llm" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "two" / "stage.json").read_text())["world_size"] == 2
    if bf16:
        return
    model = {**world, "model": tmp_path / "two"}
    alone = json.loads(_run(model, "evaluate", tmp_path / "eval-one", [*MINI], 1).stdout)
    sharded = json.loads(_run(model, "evaluate", tmp_path / "eval-two", [*MINI], 2).stdout)
    for key in ("closed_accuracy", "open_recall", "seg_dice"):
        both = (alone[key], sharded[key])
        assert both[0] == pytest.approx(both[1], abs=1e-6) or all(v != v for v in both), key  # NaN when absent
    assert (tmp_path / "eval-two" / "report.html").is_file()


def _rank_process(parent: psutil.Popen | psutil.Process, rank: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "medsight.cli" in " ".join(child.cmdline()) and child.environ().get("RANK") == rank:
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_rank_after_checkpoint(args: list[str], root: Path, pattern: str, rank: str = "1") -> tuple[int, str]:
    """Start ``medsight ARGS``, SIGKILL one rank once a checkpoint is committed; (status, stderr)."""
    import subprocess
    import sys

    process = psutil.Popen([sys.executable, "-m", "medsight.cli", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and process.poll() is None:
        if list(root.glob(pattern)):
            victim = _rank_process(process, rank)
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=600)
    assert killed, f"the run ended before a checkpoint could be awaited:\n{stderr[-3000:]}"
    return process.returncode, stderr


@pytest.mark.parametrize("stage, overrides, metric", [
    ("v2t-align", [*STAGE3, "v2t_align.batch_size=2", "v2t_align.epochs=3", "v2t_align.max_steps=12"], "val_lm_loss"),
    ("perceiver-pretrain", [*STAGE1, "perceiver_pretrain.batch_size=2", "perceiver_pretrain.epochs=4",
                            "perceiver_pretrain.max_steps=16"], "val_dice"),
])
def test_kill_one_rank_then_rerun_resumes_and_matches_an_uninterrupted_run(world, tmp_path, stage, overrides, metric):
    reference = json.loads(_run(world, stage, tmp_path / "reference", overrides, 2).stdout)
    out = tmp_path / "killed"
    args = ["stage", "run", stage, "--out", str(out), *(f"--input={n}={world[n]}" for n in INPUTS[stage]),
            *sets(overrides), "--nproc-per-node", "2"]
    status, stderr = _kill_rank_after_checkpoint(args, tmp_path, ".killed.*.partial/checkpoints/step-*/manifest.json")
    assert status == 1
    assert "error: stage " + stage + ": rank 1 was killed (SIGKILL)" in stderr
    assert "Traceback" not in stderr.split("error:")[-1]
    assert not (out / "stage.json").exists()
    rerun = cli(*args)
    resumed = [line for line in rerun.stderr.splitlines() if "resuming from step" in line]
    assert resumed, rerun.stderr[-2000:]
    step = int(resumed[0].split("resuming from step ")[1].split("/")[0])
    assert 0 < step < int(overrides[-1].split("=")[1])
    metrics = json.loads(rerun.stdout)
    assert abs(metrics[metric] - reference[metric]) <= 1e-4 * max(1.0, abs(reference[metric]))
    assert metrics["train_steps"] == reference["train_steps"]
    # The steps redone after the checkpoint are in the curve once.
    assert [p["step"] for p in _history(out)] == list(range(1, int(reference["train_steps"]) + 1))


def _probe(mode: str, data: Path, out: Path) -> None:
    import subprocess
    import sys

    probe = Path(__file__).parent / "dist_probe.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(probe), mode, str(data), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_each_rank_reads_a_disjoint_share_and_together_every_sample(world, tmp_path):
    _probe("samples", world["data"], tmp_path)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    from medsight.data.llava import read_conversations
    from medsight.data.prepared_index import read_split
    from medsight.data.taxonomy import resolve_taxonomy

    records = read_split(world["data"], "train", resolve_taxonomy(world["data"], ""))
    everything = {str(record.image_path) for record in records}
    for epoch in ("images-epoch0", "images-epoch1"):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert not set(first) & set(second)
        assert set(first) | set(second) == everything and len(first) == len(second) == len(everything) // 2
    assert ranks[0]["images-epoch0"] != ranks[0]["images-epoch1"]  # reshuffled each epoch
    for share in ranks:  # a resumed epoch skips exactly the batches already read (3 per batch)
        assert share["images-epoch1-from-batch1"] == share["images-epoch1"][3:]
    first, second = ranks[0]["conversations-epoch0"], ranks[1]["conversations-epoch0"]
    captions = read_conversations(world["data"] / "pubmedvision" / "alignment_train.jsonl", world["data"])
    # An odd count is padded with one repeat so both ranks take as many steps.
    assert set(first) | set(second) == {c.id for c in captions}
    assert len(first) == len(second) and len(set(first) & set(second)) == len(captions) % 2


def test_evaluation_sharded_over_two_ranks_gathers_what_one_process_computes(world, tmp_path):
    from eval_fakes import FakeModel

    from medsight.eval.benchmarks.manifest import load_manifest
    from medsight.eval.runner import GenerationSettings, evaluate_benchmark

    _probe("eval", world["data"], tmp_path)
    gathered = json.loads((tmp_path / "0.json").read_text())
    benchmark = {d.name: d for d in load_manifest(Path(gathered["manifest"]))}["mecovqa_g"]
    alone = evaluate_benchmark(FakeModel(), benchmark, GenerationSettings(batch_size=3), keep_examples=2, progress=False)
    assert gathered["ids"] == [r.sample.sample_id for r in alone.results]
    assert gathered["scores"] == [r.scores for r in alone.results]
    assert gathered["examples"] == 2 and gathered["skipped"] == [s.sample_id for s in alone.skipped]
    assert gathered["dice"] == pytest.approx(alone.metrics["dice"].micro)
    calls = [json.loads((tmp_path / f"calls-{r}.json").read_text()) for r in (0, 1)]
    assert sum(calls[0]) + sum(calls[1]) == len(benchmark.samples) and calls[0] and calls[1]


def test_store_mode_runs_ranks_pushes_rank0_output_and_tracks_one_run(store_env, tmp_path):
    """What a KFP component of a 2-GPU stage runs: inputs pulled once, 2 ranks through torchrun,
    rank 0's output pushed, one MLflow run holding every step; a rerun restores it."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MEDSIGHT_WORK_DIR": str(tmp_path / "work")}

    def stage(name: str, inputs: dict[str, str], *extra: str) -> dict:
        result = tmp_path / f"{name}.json"
        cli("stage", "run", name, "--store", "--result", str(result), *sets([*STAGE1, "perceiver_pretrain.batch_size=2"]),
            *(f"--input={k}={v}" for k, v in inputs.items()), *extra, env=env)
        return json.loads(result.read_text())

    data = stage("synth-data", {})
    base = stage("base-models", {"data": json.dumps(data["ref"])})
    refs = {"data": json.dumps(data["ref"]), "base": json.dumps(base["ref"])}
    first = stage("perceiver-pretrain", refs, "--nproc-per-node", "2")
    assert first["cached"] is False and first["metrics"]["train_steps"] == 6
    again = stage("perceiver-pretrain", refs, "--nproc-per-node", "2")
    assert again["cached"] is True and again["ref"] == first["ref"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("medsight.stage") == "perceiver-pretrain"]
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "perceiver-pretrain/loss")
    assert sorted(point.step for point in history) == list(range(1, 7))
