"""``run --baseline RUN --until-decided`` end to end on the tiny models: a checkpoint made clearly
worse (its VAE decodes every image darker) is called worse after part of the library, the images
it made are exactly the first prompts of the seeded order, the folder is an ordinary run that
compare and report read, a rerun resumes, and extending it without --until-decided gives the
files of a plain full run. Then the bad inputs, one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_user_error, files_of

from clipeval import sequential

PROMPTS = 64
WORDS = "cat dog red blue house tree car sky river mountain bird flower city night sun moon boat horse chair table".split()


def _darker(source: Path, target: Path, shift: float = -2.0) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = next((target / "vae").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + shift
    save_file(tensors, weights)
    return target


# Each test generates whole runs with tiny models, and the module builds a world of them first.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("until_decided")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, models):
    """A library, a baseline over all of it, a darker checkpoint, and that checkpoint's plain full run."""
    import random

    from click.testing import CliRunner

    from clipeval.cli import main

    root = tmp_path_factory.mktemp("decided")
    rng = random.Random(4)
    library = root / "library.txt"
    library.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(PROMPTS)) + "\n")
    dark = _darker(models.sd, root / "dark")

    def run(checkpoint, out, *extra):
        result = CliRunner().invoke(main, ["run", "--checkpoint", str(checkpoint), "--clip-model", str(models.clip),
                                           "--prompt-library", str(library), "--out", str(out), "--steps", "2",
                                           "--batch-size", "1", "--quiet", *map(str, extra)])
        return result

    base = root / "base"
    assert run(models.sd, base, "--batch-size", "8").exit_code == 0  # compared by value only: any batches
    full = root / "dark-full"
    assert run(dark, full).exit_code == 0
    return type("World", (), {"root": root, "library": library, "dark": dark, "base": base, "full": full, "run": staticmethod(run)})


def _expected(world, margin: float = 0.005) -> dict:
    """What the sequence decides on the dark checkpoint's deltas, read off the plain full run in the
    seeded order: where a stopped run must stop, whatever the rule's arithmetic."""
    ours = pd.read_csv(world.full / "prompts.csv").set_index("prompt_id")["clip_mean"]
    theirs = pd.read_csv(world.base / "prompts.csv").set_index("prompt_id")["clip_mean"]
    deltas = [float(ours[p] - theirs[p]) for p in sequential.order(list(range(PROMPTS)), 0)]
    return sequential.summarize(deltas, PROMPTS, margin, baseline=str(world.base), scorer="clip")


@pytest.fixture(scope="module")
def decided(world):
    out = world.root / "dark-decided"
    result = world.run(world.dark, out, "--baseline", world.base, "--until-decided")
    assert result.exit_code == 0, result.stderr
    return out, result


def test_a_clearly_worse_checkpoint_is_called_worse_after_part_of_the_library(world, decided):
    out, result = decided
    summary = json.loads((out / "summary.json").read_text())
    q = summary["sequential"]
    truth = pd.read_csv(world.full / "prompts.csv")["clip_mean"].mean() - pd.read_csv(world.base / "prompts.csv")["clip_mean"].mean()
    assert truth < -0.02  # the darker checkpoint really is worse over the whole library
    want = _expected(world)
    used = want["prompts_used"]
    assert (q["decided"], q["verdict"], q["library_prompts"]) == (True, "worse", PROMPTS) and used < PROMPTS // 2
    assert q["prompts_used"] == used and q["mean_delta"] == pytest.approx(want["mean_delta"], abs=1e-6)
    assert q["mean_delta_ci"][1] < -q["margin"] and q["baseline"] == str(world.base) and q["method"] == "betting"
    assert q["scorer"] == "clip" and q["rule"] == sequential.Rule().record() and q["bound_exceeded_at"] is None
    made = len(list((out / "images").glob("*.png")))
    assert (q["prompts_generated"], q["prompts_saved"]) == (made, PROMPTS - made) and made >= used
    line = [x for x in result.stdout.splitlines() if x.startswith("sequential:")]
    assert line == [f"sequential: worse (margin 0.005) after {used} of {PROMPTS} prompts "
                    f"({used / PROMPTS:.0%}) (1 image each): mean paired delta of clip {q['mean_delta']:+.4f}, 95% "
                    f"sequence [{q['mean_delta_ci'][0]:+.4f}, {q['mean_delta_ci'][1]:+.4f}] against "
                    f"{world.base}; {made} generated, {PROMPTS - made} of the library saved"]


def test_the_images_made_are_the_first_prompts_of_the_seeded_order(world, decided):
    out, _ = decided
    made = sorted(int(p.name[:5]) for p in (out / "images").glob("*.png"))
    order = sequential.order(list(range(PROMPTS)), 0)
    assert _expected(world)["prompts_used"] <= len(made) < PROMPTS
    assert made == sorted(order[:len(made)])  # a prefix of the order, whatever the batches in flight
    scores = pd.read_csv(out / "scores.csv")
    plain = pd.read_csv(world.full / "scores.csv").set_index("prompt_id").loc[scores["prompt_id"]].reset_index()
    assert scores["clip_score"].tolist() == plain["clip_score"].tolist()  # the same images as the plain run's
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["prompts"] == len(made) and manifest["selection"]["library_prompts"] == PROMPTS


def test_a_stopped_run_is_a_run_folder_for_compare_and_report(cli, world, decided):
    out, _ = decided
    compared = cli("compare", world.base, out, "--sequential", "--margin", "0.005", "--resamples", "500")
    assert compared.exit_code == 0, compared.stderr
    used = _expected(world)["prompts_used"]
    line = [x for x in compared.stdout.splitlines() if "sequential (betting" in x]
    assert len(line) == 1 and f"worse after {used} of {PROMPTS} prompts of the seeded order" in line[0]
    said = [x for x in compared.stdout.splitlines() if "is a run stopped by --until-decided" in x]
    assert said == [f"{out} is a run stopped by --until-decided: worse (margin 0.005) after {used} of "
                    f"{PROMPTS} prompts against {world.base}; the figures here cover the prompts it shares, of the "
                    f"{len(list((out / 'images').glob('*.png')))} it generated"]
    report = cli("report", out, "--out", world.root / "decided.html")
    assert report.exit_code == 0, report.stderr
    html = (world.root / "decided.html").read_text()
    made = len(list((out / "images").glob("*.png")))
    assert f"Sequential decision of clip against {world.base}: <b>worse</b> (margin 0.005) after {used} of {PROMPTS}" in html
    assert "(betting, deltas assumed within ±0.5)" in html and f"cover the {made} prompts generated" in html


def test_a_rerun_resumes_and_without_the_flag_extends_to_the_plain_full_run(world, decided):
    out, _ = decided
    copy = world.root / "dark-extended"
    shutil.copytree(out, copy)
    again = world.run(world.dark, copy, "--baseline", world.base, "--until-decided")
    assert again.exit_code == 0
    assert json.loads((copy / "manifest.json").read_text())["timings"]["images_generated"] == 0
    assert json.loads((copy / "summary.json").read_text())["sequential"] == json.loads((out / "summary.json").read_text())["sequential"]
    extended = world.run(world.dark, copy)
    assert extended.exit_code == 0, extended.stderr
    assert files_of(copy) == files_of(world.full)  # every byte of the tables, the summary and the images


@pytest.mark.parametrize("extra, needle", [
    (["--until-decided"], "--until-decided needs --baseline RUN"),
    (["--baseline", "{base}"], "--baseline is the run --until-decided decides against; add --until-decided"),
    (["--baseline", "{base}", "--until-decided", "--limit", "10"], "--limit and --until-decided exclude each other"),
    (["--baseline", "{base}", "--until-decided", "--seed", "1"], "was made with another --seed"),
    (["--baseline", "{base}", "--until-decided", "--images-per-prompt", "2"], "has 1 images per prompt, this run 2"),
    (["--baseline", "{root}/nowhere", "--until-decided"], "nowhere"),
])
def test_bad_sequential_options_are_one_line(world, extra, needle):
    out = world.root / "bad"
    result = world.run(world.dark, out, *[e.format(base=world.base, root=world.root) for e in extra])
    assert_user_error(result, needle)
    assert not out.exists()  # refused before anything was written


def test_a_baseline_of_another_library_or_scorer_is_refused(world, models, cli, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a cat\na dog\n")
    result = cli("run", "--checkpoint", world.dark, "--clip-model", models.clip, "--prompt-library", other, "--out",
                 tmp_path / "x", "--steps", "2", "--quiet", "--baseline", world.base, "--until-decided")
    assert_user_error(result, "was made with another prompt library")
    result = cli("run", "--checkpoint", world.dark, "--clip-model", models.clip2, "--prompt-library", world.library,
                 "--out", tmp_path / "y", "--steps", "2", "--quiet", "--baseline", world.base, "--until-decided")
    assert_user_error(result, "was made with another scorer")


def test_a_baseline_shorter_than_the_decision_needs_is_one_line_after_the_files(world, decided):
    """The same checkpoint against its own stopped run, margin 0, in the same batches: the same pixels,
    every delta exactly 0, which no sequence places below or above 0 whatever the last bits of the
    floats (a bet on a zero edge is zero); the baseline runs out first."""
    short, _ = decided
    held = len(list((short / "images").glob("*.png")))
    out = world.root / "against-short"
    result = world.run(world.dark, out, "--baseline", short, "--until-decided", "--margin", "0")
    assert_user_error(result, f"--baseline {short} holds {held} prompts of the seeded order and the sequence has not "
                              "decided")
    summary = json.loads((out / "summary.json").read_text())  # every file written first
    assert summary["sequential"]["verdict"] == "undecided"
    assert summary["sequential"]["mean_delta"] == 0.0 and summary["sequential"]["prompts_used"] == held


def test_a_sweep_decides_each_checkpoint_against_the_best_earlier_extending_it(world, models, cli, tmp_path, monkeypatch):
    """The first checkpoint gets a short prefix of the order (4 prompts here); the darker second one
    needs more to be decided, so the sweep extends the first one's prefix, then calls the second worse:
    an alert, with prompts_used and the verdict in history.csv."""
    import os
    import time

    from clipeval import sweep

    monkeypatch.setattr(sweep, "first_prefix", lambda prompts: 4)
    used = _expected(world)["prompts_used"]
    training = tmp_path / "train"
    shutil.copytree(models.sd, training / "checkpoint-100")
    shutil.copytree(world.dark, training / "checkpoint-200")
    old = time.time() - 3600
    for path in training.rglob("*"):
        os.utime(path, (old, old))
    results = tmp_path / "results"
    result = cli("sweep", training, "--out", results, "--clip-model", models.clip, "--prompt-library", world.library,
                 "--steps", "2", "--batch-size", "4", "--quiet", "--alert-if-worse", "0.005", "--until-decided")
    assert result.exit_code == 1, result.stderr  # the alert
    said = result.stderr.splitlines()
    extended = [line for line in said if line.startswith("extending checkpoint-100 to ")]
    assert extended and all("checkpoint-200 needs more of it to be decided" in line for line in extended)
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["run"].tolist() == ["checkpoint-100", "checkpoint-200"]
    assert history["verdict"].tolist() == ["", "worse"] and history["alert"].tolist() == ["", "true"]
    assert history["prompts_used"].tolist()[1] == used
    first = json.loads((results / "checkpoint-100" / "manifest.json").read_text())["selection"]["prompts"]
    # Each extension at least doubles what it had (up to two generation calls more were in flight each time).
    sizes = [int(line.split()[3]) for line in extended]
    assert sizes == sorted(sizes) and sizes[0] >= 8 and used <= first and sizes[-1] <= first
    made = sorted(int(p.name[:5]) for p in (results / "checkpoint-100" / "images").glob("*.png"))
    assert made == sorted(sequential.order(list(range(PROMPTS)), 0)[:first])
    assert any(line.startswith("alert: step 200 is worse") for line in said)
    cron = [line for line in result.stdout.splitlines() if line.startswith("step 200:")]
    assert len(cron) == 1 and cron[0].endswith(f"; sequential: worse after {used} prompts")


def test_until_decided_in_a_sweep_needs_the_alert_margin(cli, world, tmp_path):
    result = cli("sweep", tmp_path, "--out", tmp_path / "r", "--prompt-library", world.library, "--until-decided")
    assert_user_error(result, "--until-decided needs --alert-if-worse MARGIN")


def test_the_trackers_log_what_a_sequential_run_decided(world, decided, tmp_path):
    from clipeval.trackers import Tracking

    out, _ = decided
    summary = json.loads((out / "summary.json").read_text())
    scalars = Tracking("none", tmp_path).values(summary)
    assert scalars["clip/sequential_prompts"] == _expected(world)["prompts_used"] and scalars["clip/sequential_verdict"] == -1.0
    plain = {k: v for k, v in summary.items() if k != "sequential"}
    assert "clip/sequential_prompts" not in Tracking("none", tmp_path).values(plain)


@pytest.mark.parametrize("prompts, extra, needle", [
    (30, ["--sequence", "asymptotic"], "note: --sequence asymptotic decides nothing before prompt 50 unless the deltas "
                                       "seen already fix the mean, and {library} has 30 prompts"),
    (2, [], "note: no decision is possible on {library}'s 2 prompts with --sequence betting at margin 0.005, whatever "
            "the images"),
])
def test_a_library_too_small_to_decide_is_said_before_anything_loads(world, tmp_path, prompts, extra, needle):
    """Said before the checkpoint is even looked at (this one does not exist: the run then fails on it)."""
    library = tmp_path / "tiny.txt"
    library.write_text("\n".join(f"prompt {i}" for i in range(prompts)) + "\n")
    base = tmp_path / "base"
    assert world.run(world.dark, base, "--prompt-library", library).exit_code == 0
    result = world.run(tmp_path / "nowhere", tmp_path / "out", "--prompt-library", library, "--baseline", base,
                       "--until-decided", *extra)
    assert result.exit_code == 2 and "nowhere" in result.stderr.splitlines()[-1]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(needle.format(library=library))
