"""``medsight`` command line: stages, the in-process chain, configs; platform and eval sub-apps."""

from __future__ import annotations

import contextlib
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
variants_app = typer.Typer(help="Ablation variants: named config overrides plus dropped stages.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(config_app, name="config")
app.add_typer(variants_app, name="variants")

PresetOpt = Annotated[str, typer.Option("--preset", help="tiny (CPU, minutes) | full (H100, paper scale) | full-qwen2.5")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config (e.g. a saved config.yaml) instead of a preset")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set perceiver_pretrain.epochs=2")]


def _version(value: bool) -> None:
    if value:
        import medsight
        from medsight.stages.lineage import git_commit

        typer.echo(f"medsight {medsight.__version__} (git {git_commit()[:12]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and the code's git commit, then exit")] = False,
) -> None:
    """MedSIGHT: train, evaluate and serve grounded medical VLMs."""


def resolve_config(preset: str, config_file: Path | None, overrides: list[str] | None):
    config = load_config(config_file) if config_file else get_preset(preset)
    return apply_overrides(config, overrides or [])


def _usage_config(preset: str, config_file: Path | None, overrides: list[str] | None):
    """The resolved config; a bad preset, config file, key or value is a usage error (exit 2)."""
    from medsight.cli_errors import error_message

    try:
        return resolve_config(preset, config_file, overrides)
    except (ConfigError, KeyError) as error:
        _fail(error_message(error), code=2)


def _fail(message: str, hint: str = "", code: int = 1) -> None:
    """One clear line on stderr (and a hint); exit 1 for a failure, 2 for a usage error."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(code=code)


def make_tracker(stage: str, config):
    """MLflow when MLFLOW_TRACKING_URI is set, otherwise no tracking; only rank 0 of a
    multi-process stage tracks (one MLflow run per stage)."""
    if not os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("RANK", "0") != "0":
        from medsight.train.tracker import NullTracker

        return NullTracker()
    from medsight.platform.tracking import MLflowTracker

    return MLflowTracker.from_env(stage=stage, config=config)


def _parse_inputs(pairs: list[str] | None) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            _fail(f"--input {pair!r} must look like NAME=DIR (e.g. --input data=runs/synth-data)", code=2)
        name, value = pair.split("=", 1)
        inputs[name.strip()] = value.strip()
    return inputs


@stage_app.command("list")
def stage_list() -> None:
    """List stages in dependency order: inputs (and their upstream stage), resources, config view."""
    from medsight.stages.registry import STAGES

    for spec in STAGES:
        inputs = ", ".join(
            f"{name}<-{wanted.source}{'?' if wanted.optional else ''}" for name, wanted in spec.inputs.items()
        )
        flags = f"{spec.resources}{', droppable' if spec.droppable else ''}"
        typer.echo(f"{spec.name:20s} [{flags}] inputs: {inputs or '-'}")
        typer.echo(f"{'':20s} {spec.description}")
        typer.echo(f"{'':20s} reads: {', '.join(spec.reads)}")


@stage_app.command("run")
def stage_run(
    name: Annotated[str, typer.Argument(help="Stage name (see `medsight stage list`)")],
    out: Annotated[Path | None, typer.Option("--out", help="Output directory for this stage")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", help="NAME=DIR (or NAME=REF with --store)")] = None,
    preset: PresetOpt = "tiny",
    config_file: ConfigOpt = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Recompute even if the output is complete and current")] = False,
    store: Annotated[bool, typer.Option("--store", help="Inputs are DVC references; the output goes to the S3 store (restored from its run-cache when unchanged)")] = False,
    workdir: Annotated[Path | None, typer.Option(help="With --store: a local platform dir whose S3 server to start")] = None,
    use_existing: Annotated[str, typer.Option(help="With --store: a stored version to use as this stage's output")] = "",
    result: Annotated[Path | None, typer.Option(help="Write the outcome as JSON to this file (for the KFP component)")] = None,
    nproc_per_node: Annotated[str, typer.Option("--nproc-per-node", help="Ranks on this node through torchrun: a number, or auto (one per visible GPU)")] = "1",
) -> None:
    """Run one stage. Resumes from its last checkpoint if a previous attempt crashed
    (--force discards that and starts clean).

    With --nproc-per-node N the stage trains data-parallel on N ranks (DDP for stages 1-2,
    DeepSpeed ZeRO for 3-5); rank 0 writes the output. Status goes to stderr; the stage's
    metrics go to stdout as JSON.
    """
    from medsight.train.launch import LaunchError, needs_launcher, resolve_nproc, run_ranks, under_launcher

    if store and under_launcher():
        _fail("--store runs once per node: use --nproc-per-node instead of starting it under torchrun", code=2)
    parsed = _parse_inputs(inputs)
    if not store and out is None:
        _fail("give --out DIR (or --store to write to the S3 store)", code=2)
    _known_stage(name)
    config = _usage_config(preset, config_file, overrides)
    _known_inputs(name, parsed, required=not use_existing)
    if not store and not under_launcher() and nproc_per_node != "1":
        try:
            ranks = resolve_nproc(nproc_per_node)
        except ValueError as error:
            _fail(str(error), code=2)
        if needs_launcher(ranks):
            try:
                run_ranks(ranks, _rank_args(name, out, inputs, preset, config_file, overrides, force, result))
            except LaunchError as error:
                _fail(f"stage {name}: {error}", "Rerun the same command: it resumes from the last checkpoint.")
            return
    if result is not None:
        from medsight.platform.fast_exit import exit_without_teardown_once_written

        # Armed before the heavy imports: once the result is written, skip interpreter teardown.
        exit_without_teardown_once_written(result)
    if store:
        outcome = _run_stage_in_store(name, config, parsed, workdir, use_existing, nproc_per_node)
        if outcome is None:
            typer.echo(f"{name}: this node's ranks are done; the first node writes the output", err=True)
            return
        metrics, state = outcome["metrics"], "restored from the run-cache" if outcome["cached"] else "done"
        where = outcome["ref"]["md5"]
    else:
        from medsight.stages.runner import run_stage

        # Failures (bad input, unsafe --out, a failed step) reach main()'s handler: one line, exit 1.
        tracker = make_tracker(name, config)
        # stdout carries the metrics JSON only; libraries' prints (DeepSpeed's op builds) go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            run = run_stage(name, config, {k: Path(v) for k, v in parsed.items()}, out, tracker, reuse=not force,
                            restart=force)
        if os.environ.get("RANK", "0") != "0":
            return  # rank 0 reports and writes the result
        metrics, state, where = run.metrics, "up to date (reused)" if run.reused else "done", str(out)
        outcome = {"stage": name, "cached": run.reused, "metrics": metrics, "cache_key": run.key.key,
                   "output": str(out), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    typer.echo(f"{name}: {state} -> {where}", err=True)
    typer.echo(json.dumps(metrics, indent=2))
    if result is not None:
        from medsight.io_utils import atomic_write_json

        atomic_write_json(result, outcome)


def _known_stage(name: str) -> None:
    from medsight.stages.registry import STAGES

    names = [spec.name for spec in STAGES]
    if name not in names:
        _fail(f"unknown stage {name!r}; stages: {', '.join(names)} (see `medsight stage list`)", code=2)


def _known_inputs(name: str, inputs: dict[str, str], required: bool = True) -> None:
    """Input names the stage does not take, or required ones left out, are usage errors."""
    from medsight.stages.registry import get_stage

    spec = get_stage(name)
    unknown = sorted(set(inputs) - set(spec.input_names))
    if unknown:
        _fail(f"stage {name}: unknown input {unknown[0]!r}; it takes {', '.join(spec.input_names) or 'no inputs'}",
              code=2)
    missing = [input_name for input_name in spec.required_inputs if input_name not in inputs]
    if missing and required:
        _fail(f"stage {name}: missing input {missing[0]!r} (pass --input {missing[0]}=DIR)", code=2)


def _rank_args(name: str, out: Path | None, inputs: list[str] | None, preset: str, config_file: Path | None,
               overrides: list[str] | None, force: bool, result: Path | None) -> list[str]:
    """The same ``stage run`` for every rank, without --nproc-per-node."""
    args = ["stage", "run", name, "--out", str(out), "--preset", preset]
    for pair in inputs or []:
        args += ["--input", pair]
    if config_file is not None:
        args += ["--config", str(config_file)]
    for override in overrides or []:
        args += ["--set", override]
    if force:
        args.append("--force")
    if result is not None:
        args += ["--result", str(result)]
    return args


def _run_stage_in_store(name: str, config, inputs: dict[str, str], workdir: Path | None, use_existing: str,
                        nproc: str = "1") -> dict | None:
    from medsight.cli_errors import error_message
    from medsight.platform.artifacts import ArtifactStoreError
    from medsight.platform.cli import store_env
    from medsight.platform.component_runtime import execute_stage, outcome as result_of
    from medsight.platform.launched_stage import StageFailed
    from medsight.platform.storage import StorageError

    with store_env(workdir):
        try:
            outcome = execute_stage(name, inputs, config, use_existing=use_existing, nproc=nproc)
        except (ArtifactStoreError, StorageError, StageFailed, ValueError, OSError) as error:
            _fail(f"{name}: {error_message(error)}")
    return None if outcome is None else result_of(outcome)


@app.command("chain")
def chain(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where stage outputs go")] = Path("runs/chain"),
    preset: PresetOpt = "tiny",
    config_file: ConfigOpt = None,
    overrides: SetOpt = None,
    variant: Annotated[str, typer.Option("--variant", help="Ablation variant by name (`medsight variants list`)")] = "full",
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage")] = None,
) -> None:
    """Run every stage in-process (no orchestrator); unchanged stages are reused."""
    from medsight.cli_errors import error_message
    from medsight.stages.chain import run_chain
    from medsight.stages.registry import get_variant

    try:
        get_variant(variant)
    except KeyError as error:
        _fail(error_message(error), code=2)
    if until is not None:
        _known_stage(until)
    config = _usage_config(preset, config_file, overrides)

    def report(record) -> None:
        flag = "reused" if record.reused else f"{record.seconds:6.1f}s"
        shown = {k: round(v, 4) for k, v in list(record.metrics.items())[:4]}
        typer.echo(f"  {record.name:20s} {flag:>8s}  {shown}")

    # One run id and the variant for every stage of this chain: recorded in each output's lineage,
    # naming the report's row, and grouping the stages' MLflow runs under one parent run.
    import secrets
    import time

    from medsight.stages.lineage import CHAIN_RUN_ID_ENV, VARIANT_ENV

    os.environ.setdefault(CHAIN_RUN_ID_ENV, time.strftime("chain-%Y%m%d-%H%M%S-") + secrets.token_hex(2))
    os.environ[VARIANT_ENV] = variant
    result = run_chain(config, workdir, variant, lambda s: make_tracker(s, config), until, on_stage=report)
    last = list(result.stages.values())[-1]
    typer.echo(f"\nDone. Last output: {last.output}")
    if "evaluate" in result.stages:
        typer.echo(f"Report: {result.stages['evaluate'].output / 'report.html'}")


@variants_app.command("list")
def variants_list() -> None:
    """The registered ablation variants: overrides and dropped stages."""
    from medsight.stages.registry import VARIANTS

    for variant in VARIANTS:
        detail = ", ".join([*variant.overrides, *(f"drops {s}" for s in sorted(variant.drops))]) or "-"
        typer.echo(f"{variant.name:<22} {variant.description}  ({detail})")


@variants_app.command("compare")
def variants_compare(
    names: Annotated[str, typer.Argument(help="Comma-separated variant names, or 'all'")] = "full,no-region-embeddings,seg-token",
    workdir: Annotated[Path, typer.Option(help="Chain work folder (stage outputs are shared between variants)")] = Path("runs/ablations"),
    preset: PresetOpt = "tiny",
    overrides: SetOpt = None,
) -> None:
    """Train and evaluate several variants in-process; print them side by side."""
    from medsight.stages.ablations import compare_variants
    from medsight.stages.registry import VARIANTS

    chosen = [v.name for v in VARIANTS] if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    try:
        table = compare_variants(chosen, workdir, preset, tuple(overrides or ()),
                                 on_variant=lambda n: typer.echo(f"variant {n}", err=True))
    except KeyError as error:
        _fail(str(error.args[0]), "List them with `medsight variants list`.", code=2)
    typer.echo(table.to_text())
    typer.echo(f"also written: {workdir / 'ablations.md'}, {workdir / 'ablations.json'}", err=True)


@config_app.command("show")
def config_show(preset: PresetOpt = "tiny", config_file: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved config as YAML."""
    import yaml

    config = _usage_config(preset, config_file, overrides)
    typer.echo(yaml.safe_dump(to_dict(config), sort_keys=False))


def _mount_optional_apps() -> None:
    """Sub-apps whose modules pull in heavier dependencies."""
    from medsight.data.cli import data_app

    app.add_typer(data_app, name="data", help="Prepare dataset releases, build grounding sets, check data quality.")
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
    try:
        from medsight.serve.cli import serve_command

        app.command("serve")(serve_command)
    except ImportError:
        pass
    try:
        from medsight.platform.registry_cli import registry_app

        app.add_typer(registry_app, name="registry", help="MLflow model registry: package, register, list, show, promote, deploy.")
    except ImportError:
        pass


def main() -> None:
    """Every failure ends as one ``error:`` line and exit code 1 (runtime/data) or 2 (usage);
    ``MEDSIGHT_DEBUG=1`` shows the traceback (``medsight/cli_errors.py``)."""
    from medsight.cli_errors import main_for

    _mount_optional_apps()
    main_for(app, "medsight")


if __name__ == "__main__":
    main()
