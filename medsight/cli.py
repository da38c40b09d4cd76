"""``medsight`` command line: stages, the in-process chain, configs; platform and eval sub-apps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from medsight.config import ConfigError, apply_overrides, get_preset, load_config, to_dict

app = typer.Typer(help="MedSIGHT: train, evaluate and serve grounded medical VLMs.", no_args_is_help=True)
stage_app = typer.Typer(help="Run or list single training stages.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect resolved configs.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(config_app, name="config")

PresetOpt = Annotated[str, typer.Option("--preset", help="tiny (CPU, minutes) | full (H100, paper scale) | full-qwen2.5")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config (e.g. a saved config.yaml) instead of a preset")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set perceiver_pretrain.epochs=2")]


def resolve_config(preset: str, config_file: Path | None, overrides: list[str] | None):
    config = load_config(config_file) if config_file else get_preset(preset)
    return apply_overrides(config, overrides or [])


def _fail(message: str, hint: str = "") -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(code=2)


def make_tracker(stage: str, config):
    """MLflow when MLFLOW_TRACKING_URI is set, otherwise no tracking."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from medsight.train.tracker import NullTracker

        return NullTracker()
    from medsight.platform.tracking import MLflowTracker

    return MLflowTracker.from_env(stage=stage, config=config)


def _parse_inputs(pairs: list[str] | None) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for pair in pairs or []:
        if "=" not in pair:
            _fail(f"--input {pair!r} must look like NAME=DIR (e.g. --input data=runs/synth-data)")
        name, path = pair.split("=", 1)
        inputs[name.strip()] = Path(path)
    return inputs


@stage_app.command("list")
def stage_list() -> None:
    """List stages in dependency order with their inputs."""
    from medsight.stages.registry import STAGES

    for spec in STAGES:
        optional = f" (optional: {', '.join(spec.optional_inputs)})" if spec.optional_inputs else ""
        typer.echo(f"{spec.name:20s} inputs: {', '.join(spec.required_inputs) or '-'}{optional}")
        typer.echo(f"{'':20s} {spec.description}")


@stage_app.command("run")
def stage_run(
    name: Annotated[str, typer.Argument(help="Stage name (see `medsight stage list`)")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for this stage")],
    inputs: Annotated[list[str] | None, typer.Option("--input", help="NAME=DIR, one per stage input")] = None,
    preset: PresetOpt = "tiny",
    config_file: ConfigOpt = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Recompute even if the output is complete and current")] = False,
) -> None:
    """Run one stage. Resumes from its last checkpoint if a previous attempt crashed."""
    from medsight.stages.runner import run_stage

    try:
        config = resolve_config(preset, config_file, overrides)
        tracker = make_tracker(name, config)
        metrics, reused = run_stage(name, config, _parse_inputs(inputs), out, tracker, reuse=not force)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as error:
        _fail(str(error).strip("'\""), "Fix the input above and rerun; completed work is kept.")
    state = "up to date (reused)" if reused else "done"
    typer.echo(f"{name}: {state} -> {out}")
    typer.echo(json.dumps(metrics, indent=2))


@app.command("chain")
def chain(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where stage outputs go")] = Path("runs/chain"),
    preset: PresetOpt = "tiny",
    config_file: ConfigOpt = None,
    overrides: SetOpt = None,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Ablation: skip v2t-align / t2v-align / instruct-tune")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage")] = None,
) -> None:
    """Run every stage in-process (no orchestrator); unchanged stages are reused."""
    from medsight.stages.chain import run_chain

    try:
        config = resolve_config(preset, config_file, overrides)

        def report(record) -> None:
            flag = "reused" if record.reused else f"{record.seconds:6.1f}s"
            shown = {k: round(v, 4) for k, v in list(record.metrics.items())[:4]}
            typer.echo(f"  {record.name:20s} {flag:>8s}  {shown}")

        result = run_chain(
            config, workdir, frozenset(skip or ()), lambda s: make_tracker(s, config), until, on_stage=report
        )
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as error:
        _fail(str(error).strip("'\""))
    last = list(result.stages.values())[-1]
    typer.echo(f"\nDone. Last output: {last.output}")
    if "evaluate" in result.stages:
        typer.echo(f"Report: {result.stages['evaluate'].output / 'report.html'}")


@config_app.command("show")
def config_show(preset: PresetOpt = "tiny", config_file: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved config as YAML."""
    import yaml

    try:
        config = resolve_config(preset, config_file, overrides)
    except (ConfigError, KeyError) as error:
        _fail(str(error).strip("'\""))
    typer.echo(yaml.safe_dump(to_dict(config), sort_keys=False))


def _mount_optional_apps() -> None:
    """Sub-apps whose modules pull in heavier dependencies."""
    try:
        from medsight.platform.cli import platform_app

        app.add_typer(platform_app, name="platform", help="Pipelines, storage, tracking.")
    except ImportError:
        pass
    try:
        from medsight.importers.cli import import_app

        app.add_typer(import_app, name="import", help="Import checkpoints trained elsewhere (the authors' weights).")
    except ImportError:
        pass
    try:
        from medsight.eval.cli import eval_app, predict_command

        app.add_typer(eval_app, name="eval", help="Evaluation, reports, ablations, data generation.")
        app.command("predict")(predict_command)
    except ImportError:
        pass


def main() -> None:
    _mount_optional_apps()
    app(prog_name="medsight")


if __name__ == "__main__":
    sys.exit(main())
