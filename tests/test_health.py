"""Training health: the sweep compares every checkpoint with the best earlier one, as `compare`
does, and alerts (exit 1) when the newest is significantly worse by more than the margin."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error
from test_compare import SETTINGS, base_scores


def make_run(path, scores: pd.DataFrame, **settings):
    """A finished run folder with these scores and their summary, as clipeval writes one."""
    from clipeval import stats, store

    path.mkdir(parents=True)
    scores = scores.assign(flag="")
    store.write_results(path, scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                        manifest={"status": "complete", "settings": {**SETTINGS, **settings}})
    return path


def _training(tmp_path, shifts: dict[int, float], noise: float = 0.004, settings: dict | None = None):
    """checkpoint-<step> folders (already evaluated into results/) whose scores are the base
    scores shifted by ``shifts[step]`` on every image, plus a little noise."""
    training, results = tmp_path / "out", tmp_path / "results"
    scores = base_scores(prompts=60)
    rng = np.random.default_rng(1)
    for step, shift in shifts.items():
        (training / f"checkpoint-{step}").mkdir(parents=True)
        (training / f"checkpoint-{step}" / "model_index.json").write_text("{}")
        jitter = noise * rng.standard_normal(len(scores))
        make_run(results / f"checkpoint-{step}", scores.assign(clip_score=(scores["clip_score"] + shift + jitter).round(8)),
                 **(settings or {}).get(step, {}))
    return training, results


def sweep(cli, training, results, *extra):
    return cli("sweep", training, "--out", results, "--prompt-library", "smoke", "--quiet", *extra)


def test_a_clearly_worse_newest_checkpoint_raises_the_alert(cli, tmp_path):
    training, results = _training(tmp_path, {100: 0.0, 200: 0.02, 300: -0.03})
    result = sweep(cli, training, results, "--alert-if-worse", "0.01")
    assert result.exit_code == 1, result.stderr
    alert = [line for line in result.stderr.splitlines() if line.startswith("alert:")]
    assert len(alert) == 1 and "step 300" in alert[0] and "(step 200)" in alert[0]
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["step"].tolist() == [100, 200, 300]
    assert history["best_step"].tolist() == ["", "100", "200"]  # the best *earlier* checkpoint
    assert history["alert"].tolist() == ["", "false", "true"]
    # delta_best is exactly compare's delta for the same pair
    compared = cli("compare", results / "checkpoint-200", results / "checkpoint-300", "--format", "json")
    data = json.loads(compared.stdout)["runs"][0]["overall"]
    row = history.iloc[2]
    assert float(row["delta_best"]) == pytest.approx(data["delta"], abs=1e-12)
    assert [float(row["delta_best_ci_low"]), float(row["delta_best_ci_high"])] == pytest.approx(data["delta_ci"], abs=1e-12)
    assert float(row["delta_best"]) == pytest.approx(-0.05, abs=0.002)


def test_a_better_checkpoint_or_a_margin_larger_than_the_drop_does_not(cli, tmp_path):
    training, results = _training(tmp_path, {100: 0.0, 200: 0.02, 300: 0.03})
    assert sweep(cli, training, results, "--alert-if-worse", "0.0").exit_code == 0
    assert pd.read_csv(results / "history.csv", keep_default_na=False)["alert"].tolist() == ["", "false", "false"]
    training, results = _training(tmp_path / "b", {100: 0.0, 200: -0.03})
    result = sweep(cli, training, results, "--alert-if-worse", "0.1")  # a drop of 0.03 < 0.1
    assert result.exit_code == 0 and "alert:" not in result.stderr
    # The same folder, nothing new to evaluate, another margin: the rule is applied again at once.
    result = sweep(cli, training, results, "--alert-if-worse", "0.01")
    assert result.exit_code == 1 and "alert: step 200" in result.stderr


def test_without_the_flag_the_columns_are_written_and_the_exit_code_is_unchanged(cli, tmp_path):
    training, results = _training(tmp_path, {100: 0.0, 200: -0.03})
    result = sweep(cli, training, results)
    assert result.exit_code == 0
    assert "alert:" not in result.stderr  # no alert without --alert-if-worse, as the README says
    assert pd.read_csv(results / "history.csv", keep_default_na=False)["alert"].tolist() == ["", "true"]


def test_runs_that_cannot_be_paired_are_one_line_naming_both(cli, tmp_path):
    training, results = _training(tmp_path, {100: 0.0, 200: 0.0}, settings={200: {"seed": 5}})
    result = sweep(cli, training, results)
    assert_user_error(result, "checkpoint-100", "checkpoint-200", "cannot be paired")
    a, b = results / "checkpoint-100", results / "checkpoint-200"
    assert result.stderr == (f"clipeval: error: {a} and {b} cannot be paired: runs differ in what must match ({b} has seed "
                             f"5, {a} has seed 0); sweep into another --out to start a history of runs evaluated alike\n")


def test_a_checkpoint_is_compared_only_with_smaller_steps_and_the_stepless_final_model_with_all(tmp_path):
    """Two runs at one step (a model and its EMA copy, saved together) are not each other's earlier
    checkpoint; the final model, which has no step, comes after every checkpoint."""
    from clipeval.compare import compare, load_run
    from clipeval.sweep import write_history

    training, results = _training(tmp_path, {100: 0.0, 200: 0.03, 201: 0.05, 300: 0.01})
    steps = {"checkpoint-100": 100, "checkpoint-200": 200, "checkpoint-201": 200, "checkpoint-300": None}
    frame = write_history(results, steps, margin=0.0, read={})
    assert frame["run"].tolist() == ["checkpoint-100", "checkpoint-200", "checkpoint-201", "checkpoint-300"]
    assert frame["best_step"].tolist()[1:] == [100, 100, 200]

    def delta(best: str, run: str) -> float:
        return compare([load_run(results / best), load_run(results / run)]).runs[0].overall.delta

    assert frame["delta_best"].tolist()[1:] == pytest.approx(
        [delta("checkpoint-100", "checkpoint-200"), delta("checkpoint-100", "checkpoint-201"),
         delta("checkpoint-201", "checkpoint-300")], abs=1e-12)
    assert frame.at[3, "delta_best"] == pytest.approx(-0.04, abs=0.003)  # against 201 (+0.05), not 200 (+0.03)


def _junit(path):
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    return root, suite, cases


def test_gates_write_junit_and_the_github_step_summary(cli, run_tiny, tmp_path, monkeypatch):
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    # run --fail-below: a failing gate is a <failure> with the measured mean, after every file is written
    out = tmp_path / "run"
    failed = run_tiny(out, "--limit", "2", "--fail-below", "0.99", "--junit-xml", tmp_path / "run.xml")
    assert failed.exit_code == 1 and (out / "summary.json").is_file()
    root, suite, cases = _junit(tmp_path / "run.xml")
    mean = json.loads((out / "summary.json").read_text())["clip/mean"]
    assert (root.get("tests"), root.get("failures"), suite.get("failures")) == ("1", "1", "1")
    assert cases[0].get("name") == "clip/mean >= 0.99" and cases[0].get("classname") == "clipeval.run"
    assert cases[0].find("failure").get("message").startswith(f"clip/mean {mean:.4f}")
    assert run_tiny(out, "--limit", "2", "--fail-below", "-1", "--junit-xml", tmp_path / "ok.xml").exit_code == 0
    _, suite, cases = _junit(tmp_path / "ok.xml")
    assert suite.get("failures") == "0" and cases[0].find("failure") is None

    # compare --fail-if-worse: one case per compared run
    training, results = _training(tmp_path / "c", {100: 0.0, 200: -0.03, 300: 0.01})
    a, b, c = (results / f"checkpoint-{s}" for s in (100, 200, 300))
    compared = cli("compare", a, b, c, "--fail-if-worse", "--margin", "0.01", "--resamples", "500",
                   "--junit-xml", tmp_path / "compare.xml")
    assert compared.exit_code == 1
    _, suite, cases = _junit(tmp_path / "compare.xml")
    assert [case.find("failure") is not None for case in cases] == [True, False]
    assert "lies wholly below -0.01" in cases[0].find("failure").get("message")

    # sweep --alert-if-worse
    training, results = _training(tmp_path / "s", {100: 0.0, 200: -0.03})
    assert sweep(cli, training, results, "--alert-if-worse", "0.01", "--junit-xml", tmp_path / "sweep.xml").exit_code == 1
    _, suite, cases = _junit(tmp_path / "sweep.xml")
    assert len(cases) == 1 and "step 200: delta -0.03" in cases[0].find("failure").get("message")

    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, never replaced
    assert "| run | clip/mean |" in text and "**failed**" in text and "passed" in text
    assert "| run | images | mean [95% CI] | delta [95% CI] |" in text  # compare's markdown table
    assert "| step | clip_mean |" in text and "| true |" in text


def test_a_tick_with_nothing_new_reads_each_finished_run_once(cli, tmp_path, monkeypatch):
    """A cron sweep hashes every result file of every finished run it reads: once per tick."""
    from clipeval import store

    training, results = _training(tmp_path, {100: 0.0, 200: 0.01, 300: -0.02})
    reads = []
    original = store.load_run
    monkeypatch.setattr(store, "load_run", lambda path, *a, **k: reads.append(path.name) or original(path, *a, **k))
    assert sweep(cli, training, results).exit_code == 0
    assert sorted(reads) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert len(pd.read_csv(results / "history.csv")) == 3


# -- data built to separate right from wrong (mutation testing found these rules untested) ---------------

def test_the_best_earlier_checkpoint_is_the_best_not_the_previous(cli, tmp_path):
    """300 is below 200, and 400 is compared with 200 (the best earlier), not with 300 (the previous)."""
    training, results = _training(tmp_path, {100: 0.0, 200: 0.03, 300: 0.01, 400: 0.015})
    assert sweep(cli, training, results).exit_code == 0
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["best_step"].tolist() == ["", "100", "200", "200"]
    compared = json.loads(cli("compare", results / "checkpoint-200", results / "checkpoint-400", "--format",
                              "json").stdout)["runs"][0]["overall"]
    assert float(history.iloc[3]["delta_best"]) == pytest.approx(compared["delta"], abs=1e-12) and compared["delta"] < 0


def test_a_dip_whose_point_is_below_the_margin_but_whose_interval_is_not_raises_no_alert(cli, tmp_path):
    """The rule is the whole interval below -MARGIN, not the point estimate."""
    training, results = _training(tmp_path, {100: 0.0, 200: -0.008}, noise=0.03)
    result = sweep(cli, training, results, "--alert-if-worse", "0.005")
    row = pd.read_csv(results / "history.csv", keep_default_na=False).iloc[1]
    delta, low, high = (float(row[c]) for c in ("delta_best", "delta_best_ci_low", "delta_best_ci_high"))
    assert delta < -0.005 < high and low < -0.005  # the data separate the two rules
    assert row["alert"] == "false" and result.exit_code == 0 and "alert:" not in result.stderr


def test_alert_if_worse_0_still_writes_its_test_case(cli, tmp_path):
    training, results = _training(tmp_path, {100: 0.0, 200: 0.02})
    assert sweep(cli, training, results, "--alert-if-worse", "0", "--junit-xml", tmp_path / "sweep.xml").exit_code == 0
    root, suite, cases = _junit(tmp_path / "sweep.xml")
    assert root.get("tests") == "1" and len(cases) == 1 and cases[0].find("failure") is None


def test_a_failed_checkpoint_wins_over_an_alert(cli, tmp_path):
    """Exit 2 (a checkpoint could not be evaluated) beats exit 1 (an alert on the newest): cron must
    hear about a broken checkpoint even when the training also got worse. The alert is still said
    and the history still written."""
    training, results = _training(tmp_path, {100: 0.0, 200: 0.02, 300: -0.03})
    broken = training / "checkpoint-150"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["evil_module", "EvilUNet"]}))
    (broken / "unet").mkdir()
    result = sweep(cli, training, results, "--alert-if-worse", "0.01", "--settle", "0")
    assert result.exit_code == 2, result.stderr
    assert "checkpoint-150 failed" in result.stderr and "alert: step 300" in result.stderr
    assert "0 evaluated, 3 up to date, 0 still being written, 1 failed" in result.stdout
    assert pd.read_csv(results / "history.csv", keep_default_na=False)["alert"].tolist() == ["", "false", "true"]
