"""The ``clipeval`` command: a thin click layer, one library call per command.

Heavy modules are imported inside the commands, so ``clipeval --help`` starts instantly.
User errors (``ClipevalError``) print one line on stderr and exit 2; Ctrl-C exits 130 and SIGTERM
143, and the same command resumes; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from clipeval.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, ClipevalError, Terminated

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14-336"  # clipeval.score's, without importing it (--help stays instant)

DEMO_WARNING = "DEMO MODELS: tiny random weights; these scores mean nothing."


def _not_rank_0(command: str) -> bool:
    """Under torchrun or accelerate launch, the commands that write one folder or file (score,
    compare, report) run on rank 0 alone: every rank doing it would race for the same output, and
    the first one refused would bring the whole launch down. True on the other ranks."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and rank == 0:
        click.echo(f"note: {command} runs in one process: rank 0 does it, the other {world - 1} rank(s) have nothing to do",
                   err=True)
    return world > 1 and rank != 0


def _terminate(signum, frame) -> None:
    raise Terminated()


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        import signal
        import threading

        installed = threading.current_thread() is threading.main_thread()
        if installed:  # a CLI command only: a training loop that imports clipeval keeps its own handler
            previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except ClipevalError as err:
            if os.environ.get("CLIPEVAL_DEBUG"):
                raise
            click.echo(f"clipeval: error: {err}", err=True)
            sys.exit(EXIT_ERROR)
        except Terminated:
            click.echo("\nclipeval: terminated (SIGTERM); what was finished is kept: run the same command again to "
                       "resume", err=True)
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("\nclipeval: interrupted; run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clipeval")
def main() -> None:
    """Evaluate text-to-image checkpoints by CLIP score: generate, score, summarise.

    \b
    Exit codes: 0 success, 1 a quality gate failed, 2 bad input or error,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM): the same command resumes.
    """


# Python's first-generation collection threshold in the executable (the default is 700).
GC_THRESHOLD = 100_000


def entry() -> None:
    """The ``clipeval`` executable and ``python -m clipeval``: rarer garbage collection, the
    command, then a quick exit.

    Importing torch and transformers creates millions of objects, and at Python's default
    threshold the collector ran ~1,000 times over them while they were imported: 0.7 s of the
    3.6 s a bf16 CLIP scorer took to become ready, and 0.2 s of the 0.6 s pandas and scipy take
    (measured: 2.9-3.25 s and 0.4 s at this threshold). The collector still runs, so a long
    run's reference cycles are still freed. Only in the executable: a training loop that imports
    the library keeps its own settings."""
    import gc

    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        main()
    except SystemExit as done:
        _leave(done.code)


def _leave(code) -> None:
    """Exits without tearing the interpreter down once torch is loaded: Python's module-by-module
    finalisation of torch and transformers takes ~1 s (measured: 1.0-1.1 s) after every result is
    written. What a normal exit owes others still happens: atexit handlers run (trackers, process
    groups, logging) and the standard streams are flushed; with a non-daemon thread still alive
    (a caller's), the normal shutdown waits for it instead."""
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if "torch" not in sys.modules or others:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


class Finite(click.FloatRange):
    """A float that is a number: click's float takes nan and inf, which no threshold or scale can
    mean (nan makes every comparison false, so a gate could never fail)."""

    def convert(self, value, param, ctx):
        import math

        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = True  # not a number at all: click's own message says so
        if not finite:
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(value, param, ctx)


class BatchSize(click.ParamType):
    """A positive integer or ``auto``."""

    name = "N|auto"

    def get_metavar(self, param, ctx=None) -> str:  # click would print N|AUTO, which reads as a constant
        return self.name

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)
        return number


def _evaluation_options(fn):
    """The options that define an evaluation, shared by run and sweep."""
    options = [
        click.option("--prompt-library", "prompt_library", help="Built-in name (see 'clipeval libraries') or a .tsv/.csv/.jsonl/.json/.txt file.  [required, or from --config]"),
        click.option("--clip-model", default=DEFAULT_CLIP_MODEL, show_default=True, help="Scorer: a short name ('clipeval scorers'), a transformers CLIP/SigLIP model id or folder, or 'demo'."),
        click.option("--scorer", "scorers", multiple=True, help="Another scorer, repeatable, each its own column in scores.csv and block in summary.json: a short name ('clipeval scorers'), a CLIP/SigLIP or vision-language (VQAScore) model id or folder. Without --clip-model, the first --scorer is the run's primary one."),
        click.option("--metric", help="The scorer the gates and the history decide on: a label from summary.json's scorers, a model or a short name  [default: the primary scorer]."),
        click.option("--clip-processor", help="Take the scorer's tokenizer and image processor from this folder or hub id (for models that ship none, e.g. PickScore)."),
        click.option("--base-model", help="Diffusers folder or hub id the checkpoint builds on: for single files, LoRA and LyCORIS weights and fine-tuned unet/transformer folders."),
        click.option("--lora-scale", type=Finite(), help="Strength of LoRA or LyCORIS weights (0 = the base model).  [default: 1]"),
        click.option("--ema/--no-ema", "ema", default=None, help="Where a checkpoint holds EMA and raw weights (unet_ema/, transformer_ema/, ema/), evaluate the EMA (what trainers ship as the final model) or the raw ones.  [default: --ema]"),
        click.option("--images-per-prompt", type=click.IntRange(1, 4096), default=1, show_default=True, help="Images per prompt, each from its own seed (a function of --seed, prompt_id and sample)."),
        click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Base seed; each image's seed derives from it, its prompt_id and sample."),
        click.option("--batch-size", type=BatchSize(), default="auto", show_default=True, help="Images per generation call. auto: 4 on a CPU; on CUDA from 8, doubled while images/s rises by 5% and memory allows."),
        click.option("--steps", type=click.IntRange(1), help="Denoising steps [default: the pipeline's]."),
        click.option("--guidance-scale", type=Finite(0), help="Classifier-free guidance [default: the pipeline's]."),
        click.option("--height", type=click.IntRange(8), help="Image height in pixels [default: the pipeline's]."),
        click.option("--width", type=click.IntRange(8), help="Image width in pixels [default: the pipeline's]."),
        click.option("--negative-prompt", help="One negative prompt for every image."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True, help="Generation precision; auto: float32 on CPU, half on GPU."),
        click.option("--clip-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True, help="CLIP precision (embeddings are always compared in float32)."),
        click.option("--preprocess", type=click.Choice(["fast", "exact"]), default="fast", show_default=True, help="CLIP image preprocessing: batched tensors on the device, or the model's own PIL processor."),
        click.option("--scheduler", help="Noise scheduler, built from the pipeline's own config: ddim, ddpm, euler, euler-a, unipc, dpm++, flow_matching  [default: the pipeline's]."),
        click.option("--attention", help="The denoiser's attention backend: sdpa, eager, xformers; flash, sage, ... for dispatcher-based denoisers (Flux, ...). CLIP keeps PyTorch's SDPA."),
        click.option("--limit", type=click.IntRange(1), help="Only the first N prompts of the library."),
        click.option("--revision", help="Pin the hub checkpoint to a branch, tag or commit."),
        click.option("--clip-revision", help="Pin the hub CLIP model to a branch, tag or commit."),
        click.option("--allow-pickle", is_flag=True, help="Also read .ckpt/.bin/.pt weights (with torch.load(weights_only=True))."),
        click.option("--no-save-images", "save_images", is_flag=True, flag_value=False, default=True, help="Score without writing PNGs."),
        click.option("--compile", "compile", is_flag=True, help="torch.compile the denoiser (minutes up front; pays on long GPU runs)."),
        click.option("--report-to", default="none", show_default=True, help="Log the summary at the checkpoint's training step: tensorboard, wandb, both (tensorboard,wandb), all (those installed) or none."),
        click.option("--logging-dir", type=click.Path(path_type=Path), help="Where trackers write [default: OUT/logs, or RESULTS_DIR/logs for sweep]."),
        click.option("--project", default="clipeval", show_default=True, help="Tracker project (wandb)."),
        click.option("--run-name", help="Tracker run name [default: clipeval]."),
        click.option("--scale", type=click.Choice(["cosine", "percent"]), default="cosine", show_default=True, help="Scale of tracked and printed scores; percent = 100 x cosine, logged with SimpleTuner's own statistics. Files stay in cosine."),
        click.option("--config", "config_file", type=click.Path(path_type=Path), help="A SimpleTuner training config; options given here win over it."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _from_config(ctx: click.Context, options: dict) -> tuple[dict, list[str]]:
    """Fill the options not given on the command line from a SimpleTuner config."""
    path = options.pop("config_file")
    if path is None:
        return options, []
    from click.core import ParameterSource

    from clipeval import simpletuner

    given = {k for k in options if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    values, notes = simpletuner.load(path, given_options=given)
    for key, value in values.items():
        if key in options and ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, None):
            options[key] = value
        elif key not in options:
            options[key] = value
    return options, notes


def _tracking(options: dict, default_dir: Path, step: int | None):
    from clipeval.trackers import Tracking, parse_report_to

    report_to, logging_dir = parse_report_to(options.pop("report_to")), options.pop("logging_dir")
    project, run_name, scale = options.pop("project"), options.pop("run_name"), options.pop("scale")
    if report_to == "none" and scale == "cosine":
        return None, scale
    return Tracking(report_to, Path(logging_dir or default_dir), project, run_name, step, scale), scale


def _primary_scorer(ctx: click.Context, options: dict) -> None:
    """``--scorer A --scorer B`` without --clip-model (nor a config's model): A is the primary."""
    from click.core import ParameterSource

    scorers = list(options.get("scorers") or ())
    default = ctx.get_parameter_source("clip_model") in (ParameterSource.DEFAULT, None)
    if scorers and default and options["clip_model"] == DEFAULT_CLIP_MODEL:
        options["clip_model"] = scorers.pop(0)
    options["scorers"] = tuple(scorers)


def _run_config(options: dict, **extra):
    from clipeval.runner import RunConfig

    quiet = options.pop("quiet")
    return RunConfig(**options, progress=not quiet, command=["clipeval", *sys.argv[1:]], **extra)


@main.command()
@click.option("--checkpoint", help="Diffusers folder, hub id, single .safetensors file, LoRA or fine-tuned folder, or 'demo'.  [required, or output_dir of --config]")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder; rerunning the same command resumes it.  [required]")
@_evaluation_options
@click.option("--step", type=click.IntRange(0), help="Training step to log at [default: from the checkpoint's name or state file].")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out made with other settings.")
@click.option("--fail-below", type=Finite(), help="Exit 1 (after writing every file) when clip/mean is below this, in the scale printed (--scale: cosine, or percent = 100 x cosine).")
@click.option("--report", "with_report", is_flag=True, help="Also write OUT/report.html.")
@click.option("--junit-xml", "junit_xml", type=click.Path(path_type=Path), help="Also write the gate's result as JUnit XML (one test case per gate), for CI systems.")
@click.option("--baseline", type=click.Path(path_type=Path), help="With --until-decided: the run folder (same library, seed and scorer) this checkpoint is decided against.")
@click.option("--until-decided", "until_decided", is_flag=True, help="Generate the library in one seeded order and stop as soon as an anytime-valid confidence sequence for the mean paired delta against --baseline lies wholly below -MARGIN (worse), above +MARGIN (better) or inside them; the folder stays resumable and extendable.")
@click.option("--margin", "margin", type=Finite(0), default=0.005, show_default=True, help="With --until-decided: the difference of clip/mean that matters, in the scale printed.")
@click.option("--sequence", type=click.Choice(["betting", "asymptotic"]), default="betting", show_default=True, help="With --until-decided: betting (exact: wrong at most 5% of the time on every library whose deltas lie within --delta-bound, checked on each one) or asymptotic (faster, its error rate holds only for large libraries of normal-looking deltas: up to 18% on skewed or sparse ones).")
@click.option("--delta-bound", "delta_bound", type=Finite(0), help="With --until-decided: the largest |paired delta| of a prompt the betting sequence assumes, in the scale printed; from the first delta beyond it, it decides on the whole range [-2, 2] (no assumption) and says so  [default: 0.5 for a cosine, 1 (the whole range) for a VQAScore probability].")
@click.pass_context
def run(ctx: click.Context, step: int | None, fail_below: float | None, with_report: bool, junit_xml: Path | None,
        **options) -> None:
    """Generate images for every prompt, score them with CLIP, write tables and a summary."""
    from clipeval.runner import run as run_evaluation

    options, notes = _from_config(ctx, options)
    for name in ("checkpoint", "prompt_library", "out"):
        if not options.get(name):
            raise ClipevalError(f"--{name.replace('_', '-')} is required" + (" (or --config)" if name != "out" else ""))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    _primary_scorer(ctx, options)
    trackers, scale = _tracking(options, Path(options["out"]) / "logs", step)
    threshold = _in_cosine(fail_below, scale, "--fail-below", bound=1.0)  # before any model loads
    options["margin"] = _in_cosine(options["margin"], scale, "--margin", bound=2.0)
    options["delta_bound"] = _in_cosine(options["delta_bound"], scale, "--delta-bound", bound=2.0)
    demo = "demo" in (options["checkpoint"], options["clip_model"])
    if demo:
        click.secho(DEMO_WARNING, fg="yellow", err=True)
    result = run_evaluation(_run_config(options, trackers=trackers))
    if result is None:  # another rank of a multi-process run: rank 0 reports
        return
    from clipeval import metrics

    for line in _closing_lines(result, scale):
        click.echo(line)
    metric, s = metrics.view(result.summary, result.manifest.get("settings", {}), options["metric"], result.out)
    if "sequential" in s:
        click.echo(sequential_line(s["sequential"], scale, images_per_prompt=options["images_per_prompt"]))
    _warn_flagged(s)
    if s["few_prompts"]:
        click.echo(f"note: only {s['prompts']} prompts; the interval says little below {s['few_prompts_threshold']}", err=True)
    if s["truncated_prompts"]:
        click.echo(f"note: {s['truncated_prompts']} prompt(s) longer than the CLIP text limit were truncated", err=True)
    for message in result.notes.get("tracking", []):
        click.echo(message, err=True)
    if with_report:
        from clipeval import report as reporting

        click.echo(f"report → {reporting.write([result.out], result.out / 'report.html', metric=options['metric'])}")
    if demo:
        click.secho(DEMO_WARNING, fg="yellow", err=True)
    from clipeval import gates

    ci = s["clip/mean_ci"]
    k, digits = _printed(scale)
    what = "clip/mean" if options["metric"] is None else f"{metric}/mean"
    measured = f"{what} {k * s['clip/mean']:.{digits}f}" + (
        f" [95% CI {k * ci[0]:.{digits}f}, {k * ci[1]:.{digits}f}]" if ci else "")
    checks = [] if threshold is None else [gates.Gate(
        f"{what} >= {fail_below:g}", s["clip/mean"] >= threshold,
        measured + (" is below " if s["clip/mean"] < threshold else " is at least ") + f"{fail_below:g}",
        f"{measured} over {s['images']} images of {s['prompts']} prompts; run folder {result.out}")]
    if junit_xml is not None:
        gates.write_junit(junit_xml, "run", checks)
    gates.step_summary(
        f"| run | {what} | 95% CI | images | prompts | gate |\n|---|---|---|---|---|---|\n"
        f"| {gates.cell(result.out)} | {s['clip/mean']:.4f} | " + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "") +
        f" | {s['images']} | {s['prompts']} | " + ("" if not checks else "passed" if checks[0].passed else "**failed**") + " |")
    if checks and not checks[0].passed:
        click.echo(f"clipeval: gate failed: {what} {k * s['clip/mean']:.{digits}f} < --fail-below {fail_below:g}"
                   + (" (100 x cosine)" if scale == "percent" else ""), err=True)
        sys.exit(EXIT_GATE_FAILED)


@main.command()
@click.argument("training_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="RESULTS_DIR: one run folder per checkpoint, and history.csv.")
@_evaluation_options
@click.option("--settle", type=Finite(0), default=60.0, show_default=True, help="Seconds a checkpoint must be left untouched before it counts as saved.")
@click.option("--junit-xml", "junit_xml", type=click.Path(path_type=Path), help="Also write the gate's result as JUnit XML (one test case per gate), for CI systems.")
@click.option("--alert-if-worse", "alert_margin", type=Finite(0), help="Exit 1 (after writing every file), with an 'alert:' line, when the newest checkpoint is worse than the best earlier one by more than this: the whole CI of the paired delta below -MARGIN.")
@click.option("--until-decided", "until_decided", is_flag=True, help="Generate each checkpoint in the seeded order only until a confidence sequence decides it against the best earlier one (worse, better, or within --alert-if-worse), extending that one as needed; history.csv says the prompts used and the verdict.")
@click.option("--sequence", type=click.Choice(["betting", "asymptotic"]), default="betting", show_default=True, help="With --until-decided: betting (exact: wrong at most 5% of the time on every library whose deltas lie within --delta-bound, checked on each one) or asymptotic (faster, its error rate holds only for large libraries of normal-looking deltas: up to 18% on skewed or sparse ones).")
@click.option("--delta-bound", "delta_bound", type=Finite(0), help="With --until-decided: as run --delta-bound.")
@click.pass_context
def sweep(ctx: click.Context, training_dir: Path | None, out: Path, *, settle: float, alert_margin: float | None,
          junit_xml: Path | None, until_decided: bool, sequence: str, delta_bound: float | None, **options) -> None:
    """Evaluate every checkpoint of TRAINING_DIR not evaluated yet, oldest step first (for cron).

    \b
    Checkpoints, in TRAINING_DIR and two levels below: checkpoint-N/ folders (diffusers, SimpleTuner: LoRA,
    LyCORIS, unet/ or transformer/ with their _ema/ copies), kohya's NAME-stepNNNNNNNN,
    NAME-NNNNNN and NAME .safetensors, ai-toolkit's NAME_000000250 files and folders,
    OneTrainer's save/…-save-STEP-E-S.safetensors and backup/…-backup-STEP-E-S/, and the
    final model (TRAINING_DIR's own pipeline or LoRA, SimpleTuner's pipeline/), last.
    Never unet/, vae/, text_encoder/... or kohya's -state/ folders on their own.

    \b
    Exit codes: 0 when nothing failed (also when another sweep is busy with --out),
    1 when --alert-if-worse is given and the newest checkpoint is significantly worse than the best
    earlier one, 2 when a checkpoint could not be evaluated (the others still are; 2 wins over 1)
    or when TRAINING_DIR holds no checkpoint at all.
    """
    from clipeval import sweep as sweeping

    options, notes = _from_config(ctx, options)
    folder = training_dir or (Path(options.pop("checkpoint")) if options.get("checkpoint") else None)
    options.pop("checkpoint", None)
    if folder is None:
        raise ClipevalError("give TRAINING_DIR (or --config with output_dir)")
    if not options.get("prompt_library"):
        raise ClipevalError("--prompt-library is required (or --config)")
    for note in notes:
        click.echo(f"note: {note}", err=True)
    _primary_scorer(ctx, options)
    trackers, scale = _tracking(options, out / "logs", None)
    margin = _in_cosine(alert_margin, scale, "--alert-if-worse", bound=2.0)  # deltas of cosines lie in [-2, 2]
    if until_decided and margin is None:
        raise ClipevalError("--until-decided needs --alert-if-worse MARGIN: the difference each decision is about")
    bound = _in_cosine(delta_bound, scale, "--delta-bound", bound=2.0)
    base = _run_config(options, checkpoint="", out=out, trackers=trackers, sequence=sequence, delta_bound=bound)
    result = sweeping.sweep(folder, out, base, settle_s=settle, margin=margin or 0.0, until_decided=until_decided,
                            log=lambda m: click.echo(m, err=True))
    if result is None:  # another rank of a multi-process sweep: rank 0 reports
        return
    if result.busy:
        click.echo(result.busy)
        return
    for line in _evaluated_lines(result, scale, by_metric=options["metric"] is not None):
        click.echo(line)
    click.echo(
        f"{len(result.evaluated)} evaluated, {len(result.up_to_date)} up to date, {len(result.skipped)} still being "
        f"written, {len(result.failed)} failed → {result.history}"
    )
    newest = result.newest
    alert = margin is not None and newest is not None and newest["alert"] == "true"
    if alert:
        k = _printed(scale)[0]
        click.echo(
            f"alert: step {newest['step']} is worse than the best earlier checkpoint (step {newest['best_step']}): delta "
            f"{k * newest['delta_best']:+.4f} [{k * newest['delta_best_ci_low']:+.4f}, {k * newest['delta_best_ci_high']:+.4f}]"
            f"{' (100 x cosine)' if k != 1 else ''}, p {newest['p_best']:.3g}, margin {alert_margin:g}", err=True)
    _sweep_gates(result, margin, junit_xml)
    if result.failed:
        sys.exit(EXIT_ERROR)
    if alert:
        sys.exit(EXIT_GATE_FAILED)


def _evaluated_lines(result, scale: str, by_metric: bool = False) -> list[str]:
    """One line per checkpoint this sweep evaluated, for a cron log: its step, mean with CI, and
    the paired delta to the best earlier checkpoint with its CI. ``by_metric``: the mean is named by
    the history's scorer (--metric), not as clip/mean."""
    if result.history is None or not result.history.is_file() or not result.evaluated:
        return []
    import pandas as pd

    k, digits = _printed(scale)
    rows = pd.read_csv(result.history, keep_default_na=False)
    lines = []
    for _, row in rows[rows["run"].isin(result.evaluated)].iterrows():
        v = {c: k * float(row[c]) for c in ("clip_mean", "clip_mean_ci_low", "clip_mean_ci_high", "delta_best",
                                            "delta_best_ci_low", "delta_best_ci_high") if row[c] != ""}
        where = f"step {row['step']}" if row["step"] != "" else f"{row['run']} (no step)"
        line = f"{where}: {row['metric'] + '/mean' if by_metric else 'clip/mean'} {v['clip_mean']:.{digits}f}"
        if "clip_mean_ci_low" in v:
            line += f" [{v['clip_mean_ci_low']:.{digits}f}, {v['clip_mean_ci_high']:.{digits}f}]"
        if row["alert"] != "" and "delta_best" in v:
            line += f", delta {v['delta_best']:+.{digits}f}"
            if "delta_best_ci_low" in v:
                line += f" [{v['delta_best_ci_low']:+.{digits}f}, {v['delta_best_ci_high']:+.{digits}f}]"
            line += f" to the best earlier (step {row['best_step']})"
        else:
            line += ", the first checkpoint"
        if row.get("verdict", ""):  # sweep --until-decided
            line += f"; sequential: {row['verdict']} after {row['prompts_used']} prompts"
        lines.append(line + (" (100 x cosine)" if k != 1 else ""))
    return lines


def _sweep_gates(result, margin: float | None, junit_xml: Path | None) -> None:
    from clipeval import gates

    newest, checks = result.newest, []
    if margin is not None and newest is not None and newest["alert"] != "":
        measured = (f"step {newest['step']}: delta {newest['delta_best']:+.4f} [{newest['delta_best_ci_low']:+.4f}, "
                    f"{newest['delta_best_ci_high']:+.4f}] against step {newest['best_step']}")
        checks.append(gates.Gate(f"newest checkpoint not worse than the best earlier one by more than {margin:g}",
                                 newest["alert"] != "true", measured, f"{measured}, p {newest['p_best']:.3g}"))
    if junit_xml is not None:
        gates.write_junit(junit_xml, "sweep", checks)
    if result.history is not None and result.history.is_file():
        import pandas as pd

        rows = pd.read_csv(result.history, keep_default_na=False).tail(10)
        columns = ["step", "clip_mean", "clip_mean_ci_low", "clip_mean_ci_high", "best_step", "delta_best", "alert"]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(gates.cell(row[c]) for c in columns) + " |" for _, row in rows.iterrows()]
        gates.step_summary("\n".join(lines))


def _in_cosine(value: float | None, scale: str, option: str, *, bound: float, scales: bool = True) -> float | None:
    """A threshold typed in the scale the command prints, as a cosine. One outside the possible
    range of the score (``bound`` in cosine) is refused, naming the other scale (``scales``: the
    command has --scale)."""
    if value is None:
        return None
    k = _printed(scale)[0]
    if abs(value) > bound * k:
        if scale == "cosine" and not scales:
            hint = f"it reads cosines, not 100 x cosine (torchmetrics' and SimpleTuner's scale): did you mean {value / 100:g}?"
        elif scale == "cosine":
            hint = (f"did you mean {value / 100:g}, or --scale percent (100 x cosine, the scale of torchmetrics and "
                    "SimpleTuner)?")
        else:
            hint = "--scale percent reads it as 100 x cosine"
        what = "score" if bound == 1.0 else "difference of two scores"
        raise ClipevalError(f"{option} {value:g} is outside the possible range [{-bound * k:g}, {bound * k:g}] of a "
                            f"{what} in {scale}: {hint}")
    return value / k


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _warn_flagged(s: dict) -> None:
    flagged = s.get("flagged_images") or {}
    if flagged:
        counts = ", ".join(f"{n} {kind}" for kind, n in flagged.items())
        click.echo(f"warning: {sum(flagged.values())} image(s) flagged ({counts}) and left out of the statistics; "
                   "see the flag column of scores.csv", err=True)


def _printed(scale: str) -> tuple[float, int]:
    """The factor and the digits a score is printed with: percent is 100 x cosine, to 2 decimals."""
    return (100.0, 2) if scale == "percent" else (1.0, 4)


def sequential_line(q: dict, scale: str = "cosine", images_per_prompt: int | None = None) -> str:
    """What a sequential run decided, after how many prompts, and what it generated and saved."""
    k, digits = _printed(scale)
    unit = " (100 x cosine)" if k != 1 else ""
    low, high = q["mean_delta_ci"]
    share = q["prompts_used"] / q["library_prompts"]
    scorer = f" of {q['scorer']}" if q.get("scorer") else ""
    sequence = (f"mean paired delta{scorer} {k * q['mean_delta']:+.{digits}f}, {int(round(100 * (1 - q['alpha'])))}% "
                f"sequence [{k * low:+.{digits}f}, {k * high:+.{digits}f}]{unit}") if q["mean_delta"] is not None else "no prompt paired"
    images = f" ({images_per_prompt} image{'s' if images_per_prompt != 1 else ''} each)" if images_per_prompt else ""
    generated = q.get("prompts_generated", q["prompts_seen"])
    cost = f"{generated} generated, {q['library_prompts'] - generated} of the library saved"
    bound = (q.get("rule") or {}).get("delta_bound")
    if q.get("bound_exceeded_at"):
        cost += (f"; prompt {q['bound_exceeded_at']}'s delta left the declared bound ±{k * bound:g}{unit}, so from "
                 f"there it decided on the whole range ±{k * 2:g}")
    if q["decided"]:
        return (f"sequential: {q['verdict']} (margin {k * q['margin']:g}{unit}) after {q['prompts_used']} of "
                f"{q['library_prompts']} prompts ({share:.0%}){images}: {sequence} against {q['baseline']}; {cost}")
    return (f"sequential: undecided after {q['prompts_used']} of {q['library_prompts']} prompts: {sequence} against "
            f"{q['baseline']}; {cost}; compare the two runs for the fixed-size answer")


def _closing_lines(result, scale: str) -> list[str]:
    """The closing line of each scorer of a run or score (one scorer: "clip/mean ...")."""
    from clipeval import metrics

    settings = result.manifest.get("settings", {})
    blocks = metrics.names(result.summary, settings)
    return [_closing_line(metrics.view(result.summary, settings, name, result.out)[1], result.out,
                          f"{name}: mean" if len(blocks) > 1 else "clip/mean", scale=scale) for name in blocks]


def _closing_line(s: dict, out: Path, label: str = "clip/mean", scale: str = "cosine") -> str:
    ci = s["clip/mean_ci"]
    level = int(round(s["ci"]["level"] * 100))
    k, digits = _printed(scale)

    def f(x):
        return "n/a" if x is None else f"{x * k:.{digits}f}"

    return (
        f"{label} {f(s['clip/mean'])}" + (" (100 x cosine)" if scale == "percent" else "")
        + (f" [{level}% CI {f(ci[0])}, {f(ci[1])}]" if ci else "")
        + f" (std {f(s['clip/std'])}, min {f(s['clip/min'])}, max {f(s['clip/max'])})"
        f" over {s['images']} images of {s['prompts']} prompts → {out}/summary.json"
    )


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for scores.csv, prompts.csv, summary.json, manifest.json.")
@click.option("--prompts", "prompts_spec", help="For an image folder: a table with image and prompt columns, or a prompt library whose prompt_ids name the images (00012.png, 00012_01.png).")
@click.option("--clip-model", "clip_models", multiple=True, default=[DEFAULT_CLIP_MODEL], show_default=True, help="Repeat for several models: one score column each.")
@click.option("--scorer", "scorers", multiple=True, help="As --clip-model, for any scorer ('clipeval scorers': CLIP-family or VQAScore); without --clip-model, these alone.")
@click.option("--clip-processor", help="Tokenizer and image processor for the first --clip-model, from this folder or hub id.")
@click.option("--device", default="auto", show_default=True)
@click.option("--clip-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--preprocess", type=click.Choice(["fast", "exact"]), default="fast", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="[default: a run's own batches, else 16]")
@click.option("--allow-pickle", is_flag=True, help="Also read CLIP models with only .bin weights (torch.load(weights_only=True)).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier score in --out made with other settings.")
@click.option("--scale", type=click.Choice(["cosine", "percent"]), default="cosine", show_default=True, help="Scale of the printed scores; percent = 100 x cosine. Files stay in cosine.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def score(ctx: click.Context, *, source, out, prompts_spec, clip_models, scorers, clip_processor, device, clip_dtype,
          preprocess, batch_size, allow_pickle, overwrite, scale, quiet) -> None:
    """Score existing images: a run folder (re-score), or an image folder with --prompts."""
    if _not_rank_0("score"):
        return
    from click.core import ParameterSource

    if scorers and ctx.get_parameter_source("clip_models") in (ParameterSource.DEFAULT, None):
        clip_models = ()
    clip_models = tuple(clip_models) + tuple(scorers)
    from clipeval.rescore import ScoreConfig, score as score_images

    config = ScoreConfig(
        source=source, out=out, prompts=prompts_spec, clip_models=tuple(clip_models), clip_processor=clip_processor, device=device,
        clip_dtype=clip_dtype, preprocess=preprocess, batch_size=batch_size, allow_pickle=allow_pickle, overwrite=overwrite,
        progress=not quiet, command=["clipeval", *sys.argv[1:]],
    )
    result = score_images(config)
    for kind, names in result.notes.items():
        if names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            click.echo(f"warning: {len(names)} {kind}: {shown} (all listed in manifest.json)", err=True)
    _warn_flagged(result.summary)
    for line in _closing_lines(result, scale):
        click.echo(line)


@main.command()
def scorers() -> None:
    """Short names for well-known scorers (--scorer NAME or --clip-model NAME), their models and what their scale means.

    \b
    clip: the cosine of a dual encoder's normalised image and text embeddings.
    vqa:  VQAScore, P("Yes") of a vision-language model asked whether the image shows the prompt."""
    from clipeval.scorers import known

    for entry in known().values():
        click.echo(f"{entry.name}\t{entry.kind}\t{entry.model}" + (f" (processor: {entry.processor})" if entry.processor else ""))
        click.echo(f"\t{entry.scale}")


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), help="The run the others are compared with [default: the first].")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "json"]), default="text", show_default=True)
@click.option("--allow-mismatch", is_flag=True, help="Compare runs with another library, seed or CLIP model on what they share.")
@click.option("--fail-if-worse", is_flag=True, help="Exit 1 when a run is significantly worse than the baseline by more than --margin.")
@click.option("--margin", type=Finite(0), default=0.0, show_default=True, help="Tolerated drop of clip/mean, in cosine.")
@click.option("--confidence", type=Finite(0.5, 0.999), default=0.95, show_default=True)
@click.option("--resamples", type=click.IntRange(100), default=10_000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Bootstrap seed.")
@click.option("--top", type=click.IntRange(0), default=5, show_default=True, help="Groups listed as moving most (text, markdown).")
@click.option("--junit-xml", "junit_xml", type=click.Path(path_type=Path), help="Also write the gate's result as JUnit XML (one test case per gate), for CI systems.")
@click.option("--sequential", "sequence", flag_value="betting", help="Also say after how many prompts of the seeded order (that of run --until-decided) the betting sequence would have decided, with --margin.")
@click.option("--sequence", "sequence", type=click.Choice(["betting", "asymptotic"]), help="As --sequential, with this sequence (run --help says what each guarantees).")
@click.option("--delta-bound", "delta_bound", type=Finite(0), help="With --sequential: as run --delta-bound, in cosine.")
@click.option("--metric", help="The scorer compared, in every run: a label from summary.json's scorers, a model or a short name  [default: each run's primary scorer, which must be the same].")
def compare(*, runs, baseline, fmt, allow_mismatch, fail_if_worse, margin, confidence, resamples, seed, top,
            junit_xml, sequence, delta_bound, metric) -> None:
    """Is a run better than the baseline, or is it noise? Paired by prompt and seed.

    A run is worse by more than --margin when the whole confidence interval of its paired delta
    lies below -margin; --fail-if-worse then exits 1.
    """
    if _not_rank_0("compare"):
        return
    from clipeval import compare as comparing
    from clipeval.stats import Bootstrap

    paths = list(runs)
    if baseline is not None and baseline not in paths:
        paths.insert(0, baseline)
    if len(paths) < 2:
        raise ClipevalError("compare needs at least two runs (RUN_A RUN_B ..., or one run and --baseline)")
    _in_cosine(margin, "cosine", "--margin", bound=2.0, scales=False)  # a paired delta of cosines lies in [-2, 2]
    _in_cosine(delta_bound, "cosine", "--delta-bound", bound=2.0, scales=False)
    loaded = [comparing.load_run(p, metric) for p in paths]
    result = comparing.compare(
        loaded,
        baseline=paths.index(baseline) if baseline is not None else 0,
        allow_mismatch=allow_mismatch,
        margin=margin,
        boot=Bootstrap(confidence=confidence, resamples=resamples, seed=seed),
        sequence=sequence,
        delta_bound=delta_bound,
    )
    click.echo(comparing.render(result, fmt, top=top), nl=False)
    from clipeval import gates

    checks = []
    for run in result.runs if fail_if_worse else []:
        o = run.overall
        interval = f"[{o.delta_ci[0]:+.4f}, {o.delta_ci[1]:+.4f}]" if o.delta_ci else "(no interval)"
        checks.append(gates.Gate(
            f"{run.name} not worse than {result.baseline} by more than {margin:g}", not run.worse,
            f"delta {o.delta:+.4f} {interval}" + (f" lies wholly below -{margin:g}" if run.worse else ""),
            f"{run.name} against {result.baseline}: delta {o.delta:+.4f} {interval}, p {comparing.format_p(o.p_value)}, "
            f"{run.paired_images} paired images"))
    if junit_xml is not None:
        gates.write_junit(junit_xml, "compare", checks)
    gates.step_summary(comparing.render(result, "markdown", top=top))
    if fail_if_worse and result.failed:
        for run in result.failed:
            o = run.overall
            click.echo(
                f"clipeval: gate failed: {run.name} is worse than {result.baseline} by more than {margin:g} "
                f"(delta {o.delta:+.4f}, CI [{o.delta_ci[0]:+.4f}, {o.delta_ci[1]:+.4f}])",
                err=True,
            )
        sys.exit(EXIT_GATE_FAILED)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .html file to write.")
@click.option("--baseline", type=click.Path(path_type=Path), help="The run the others are compared with [default: the first].")
@click.option("--allow-mismatch", is_flag=True, help="Compare runs with another library, seed or CLIP model on what they share.")
@click.option("--top", type=click.IntRange(1), default=12, show_default=True, help="Prompts shown side by side, biggest changes first.")
@click.option("--metric", help="The scorer reported: a label from summary.json's scorers, a model or a short name  [default: the primary scorer].")
def report(runs, out, baseline, allow_mismatch, top, metric) -> None:
    """One self-contained HTML report of a run, or a comparison of several."""
    if _not_rank_0("report"):
        return
    from clipeval import report as reporting

    path = reporting.write(list(runs), out, baseline=baseline, allow_mismatch=allow_mismatch, top=top, metric=metric)
    click.echo(f"report → {path}")


@main.command()
@click.argument("library")
def prompts(library: str) -> None:
    """Print a prompt library as CSV: prompt_id, [name,] prompt, category, challenge."""
    import csv

    from clipeval.prompts import load_library

    lib = load_library(library)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    named = lib.named
    try:
        writer.writerow(["prompt_id", *(["name"] if named else []), "prompt", "category", "challenge"])
        for p in lib.prompts:
            writer.writerow([p.prompt_id, *([p.name] if named else []), p.prompt, p.category, p.challenge])
        sys.stdout.flush()
    except BrokenPipeError:
        # `clipeval prompts parti | head -1`: the reader has what it wanted; exit 0 like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


@main.command()
def libraries() -> None:
    """List the built-in prompt libraries."""
    from urllib.parse import urlparse

    from clipeval.prompts import builtin_descriptors

    rows = []
    for name, d in builtin_descriptors().items():
        source = "shipped" if not d.downloaded else "download: " + urlparse(d.files[0]["url"]).netloc
        rows.append((name, str(d.count), source, d.description))
    widths = [max(len(r[i]) for r in rows + [("name", "prompts", "source", "")]) for i in range(3)]
    click.echo(f"{'name':<{widths[0]}}  {'prompts':>{widths[1]}}  {'source':<{widths[2]}}  description")
    for name, count, source, description in rows:
        click.echo(f"{name:<{widths[0]}}  {count:>{widths[1]}}  {source:<{widths[2]}}  {description}")
