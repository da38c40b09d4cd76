"""Crash tests of stage checkpoints through the real CLI, in real processes killed with SIGKILL:

- kill -9 while a checkpoint is being written, then a rerun resumes from the previous one;
- a truncated latest checkpoint (torch engine and DeepSpeed ZeRO-3), then a rerun falls back to
  the one before, naming the bad file;
- every checkpoint unusable: one clear line naming the file, exit 1; ``--force`` starts clean.

The child process is the ``medsight`` CLI with one checkpoint function wrapped so that the
process SIGKILLs itself at a chosen moment; everything else is the code a user runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributed_fixtures import MINI, build_inputs, cli, sets

pytestmark = pytest.mark.slow

STAGE1 = [*MINI, "perceiver_pretrain.batch_size=4", "perceiver_pretrain.epochs=4", "perceiver_pretrain.max_steps=10",
          "perceiver_pretrain.checkpoint_every=3"]
STAGE3 = [*MINI, "v2t_align.batch_size=4", "v2t_align.epochs=4", "v2t_align.max_steps=8",
          "v2t_align.checkpoint_every=2", "v2t_align.deepspeed.zero_stage=3"]

# Runs the CLI with a checkpoint function that SIGKILLs the process; {when} picks the moment.
KILLER = textwrap.dedent('''
    import os, signal, sys
    import medsight.train.checkpoint as checkpoint

    saves, commits = {{"n": 0}}, {{"n": 0}}
    real_save, real_commit = checkpoint.save_file, checkpoint.CheckpointDir.commit

    def save_file(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):
            saves["n"] += 1
            if {when!r} == "during-save" and saves["n"] == 2:
                with open(path, "wb") as handle:
                    handle.write(b"half a checkpoint")  # the file being written when the kill lands
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, path, *args, **kwargs)

    def commit(self, *args, **kwargs):
        final = real_commit(self, *args, **kwargs)
        commits["n"] += 1
        if {when!r} == "after-second-commit" and commits["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    checkpoint.save_file = save_file
    checkpoint.CheckpointDir.commit = commit
    from medsight.cli import main
    sys.argv = ["medsight", *{args!r}]
    main()
''')


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("mini"), ("perceiver-pretrain",))


def _args(world, stage: str, out: Path, overrides: list[str]) -> list[str]:
    inputs = {"perceiver-pretrain": ("data", "base"), "v2t-align": ("data", "base", "perceiver")}[stage]
    return ["stage", "run", stage, "--out", str(out), *(f"--input={n}={world[n]}" for n in inputs), *sets(overrides)]


def _killed(args: list[str], when: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLER.format(when=when, args=args)], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, timeout=900)
    assert done.returncode == -9, done.stderr[-3000:]


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial/checkpoints/step-*"))


def _resumed_step(stderr: str) -> int:
    line = next(line for line in stderr.splitlines() if "resuming from step" in line)
    return int(line.split("resuming from step ")[1].split("/")[0])


def test_kill_during_checkpoint_save_then_rerun_resumes_from_the_previous_one(world, tmp_path):
    args = _args(world, "perceiver-pretrain", tmp_path / "out", STAGE1)
    _killed(args, "during-save")  # the second save (step 6) dies half-written
    assert [p.name for p in _checkpoints(tmp_path / "out")] == ["step-00000003"]
    rerun = cli(*args)
    assert _resumed_step(rerun.stderr) == 3
    assert (tmp_path / "out" / "stage.json").is_file() and not _checkpoints(tmp_path / "out")


@pytest.mark.parametrize("stage, overrides, bad_file, previous", [
    ("perceiver-pretrain", STAGE1, "trainable.safetensors", 3),
    ("v2t-align", STAGE3, "zero_pp_rank_0_mp_rank_00_optim_states.pt", 2),
])
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(world, tmp_path, stage, overrides, bad_file, previous):
    args = _args(world, stage, tmp_path / "out", overrides)
    _killed(args, "after-second-commit")
    latest = _checkpoints(tmp_path / "out")[-1]
    damaged = latest / bad_file
    damaged.write_bytes(damaged.read_bytes()[:100])
    rerun = cli(*args)
    assert str(damaged) in rerun.stderr and "truncated" in rerun.stderr
    assert _resumed_step(rerun.stderr) == previous
    assert (tmp_path / "out" / "stage.json").is_file()


def test_no_usable_checkpoint_fails_with_one_line_then_force_starts_clean(world, tmp_path):
    args = _args(world, "perceiver-pretrain", tmp_path / "out", STAGE1)
    _killed(args, "after-second-commit")
    for checkpoint in _checkpoints(tmp_path / "out"):
        (checkpoint / "trainable.safetensors").write_bytes(os.urandom(64))
    failed = cli(*args, check=False)
    assert failed.returncode == 1
    error = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "trainable.safetensors" in error[0] and "--force" in error[0]
    assert "Traceback" not in failed.stderr
    clean = cli(*args, "--force")
    assert "resuming" not in clean.stderr and (tmp_path / "out" / "stage.json").is_file()
