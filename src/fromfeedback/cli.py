"""The `fromfeedback` command: one subcommand per stage, each a thin shell over a function of its config.

Every stage takes `--preset NAME` (a TOML file in configs/) and any config field as `--field value`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional

import typer

from fromfeedback.config import build_config, describe_fields
from fromfeedback.files import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Validate and describe data files.")
app.add_typer(data_app, name="data")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def stage_command(parent: typer.Typer, name: str, config_cls: type, section: str, runner: Callable[[Any], Any], summary: str) -> None:
    """Registers `fromfeedback NAME --preset P --field value ...` running `runner(config)`."""

    def command(ctx: typer.Context, preset: Optional[str] = typer.Option(None, "--preset", help="Preset name in configs/ or a .toml path.")) -> None:
        runner(build_config(config_cls, preset, section, ctx.args))

    parent.command(name, context_settings=OVERRIDES, help=f"{summary}\n\nFields (any can be given as --field value):\n\n{describe_fields(config_cls)}")(command)


def _register_stages() -> None:
    from fromfeedback.sampling import SampleConfig, run_sample
    from fromfeedback.sft import SFTConfig, run_sft

    stage_command(app, "sft", SFTConfig, "sft", run_sft, "Supervised fine-tuning on post → reference TL;DR.")
    stage_command(app, "sample", SampleConfig, "sample", run_sample, "Summarize posts of a split with a policy; writes a samples file.")
    from fromfeedback.label.cli import label_app

    app.add_typer(label_app, name="label")
    from fromfeedback.evaluate.cli import eval_app, report_command

    app.add_typer(eval_app, name="eval")
    app.command("report")(report_command)

    from fromfeedback.reward import register_cli as register_rm

    register_rm(app, stage_command)

    from fromfeedback.best_of_n import BestOfNConfig, run_best_of_n
    from fromfeedback.ppo import PPOConfig, run_ppo

    stage_command(app, "ppo", PPOConfig, "ppo", run_ppo, "PPO against a reward model with a KL penalty to the SFT policy.")
    stage_command(app, "best-of-n", BestOfNConfig, "best_of_n", run_best_of_n, "Best of N samples per post by reward-model score.")


@app.command("run", context_settings=OVERRIDES)
def run_command(
    ctx: typer.Context,
    preset: str = typer.Option("demo", "--preset", help="Preset name in configs/ or a .toml path."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default: runs/<preset>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Carry on a run directory made by an earlier `fromfeedback run`."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build and validate every stage's configuration; run nothing."),
) -> None:
    """The whole loop in one run directory, each finished stage skipped; extra `--field value` options set fields of the preset's run table."""
    from fromfeedback.pipeline import resume_pipeline, run_pipeline, split_run_overrides

    if resume:
        if ctx.args:
            raise UserError("--resume takes no other options: the run keeps its preset and overrides")
        resume_pipeline(resume)
    else:
        run_pipeline(preset, out or f"runs/{Path(preset).stem}", split_run_overrides(ctx.args), dry_run=dry_run)


@data_app.command("validate")
def data_validate(paths: list[str] = typer.Argument(..., help="posts.jsonl, comparison, samples, rankings or CNN/DM files.")) -> None:
    """Checks every line of each file against its format; exits 2 at the first bad line."""
    from fromfeedback.data.inspect import validate_file

    for path in paths:
        kind, count = validate_file(path)
        print(f"{path}: OK ({count} {kind})")


@data_app.command("stats")
def data_stats(
    path: str = typer.Argument(..., help="A posts.jsonl file."),
    model: str = typer.Option("smollm2-135m", help="Tokenizer to count tokens with."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Posts per split and token-length percentiles of queries and references."""
    from fromfeedback.data.inspect import posts_stats, print_stats

    stats = posts_stats(path, model)
    if json_output:
        import json

        print(json.dumps(stats, indent=2))
    else:
        print_stats(stats)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit with code 2, never a traceback."""
    _register_stages()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
