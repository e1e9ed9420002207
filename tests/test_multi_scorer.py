"""One run, several scorers: CLIP beside VQAScore (a tiny LLaVA), each its own column, statistics
and verdicts, on the tiny SD pipeline. Each scorer's column equals a run of that scorer alone; the
commands that decide (compare, the gates, sweep's history, the report) work on any scorer
(``--metric``) and never pair two scorers' numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tiny_vlms
from conftest import assert_user_error, files_of, run_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_scorer")]  # whole runs on the tiny models; tests/test_metrics.py is the fast part

ARGS = ["--prompt-library", "smoke", "--limit", "4", "--images-per-prompt", "2", "--batch-size", "3", "--steps", "2",
        "--quiet"]


def run_args(models, out, *scorers: str) -> list[str]:
    """``run`` on the tiny SD; ``scorers`` are the --clip-model / --scorer options."""
    return ["run", "--checkpoint", str(models.sd), "--out", str(out), *ARGS, *map(str, scorers)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models, vlms):
    """The same images scored three ways: CLIP and the LLaVA together, each alone."""
    from click.testing import CliRunner

    from clipeval.cli import main

    root = tmp_path_factory.mktemp("multi")
    made = {
        "both": ("--clip-model", models.clip, "--scorer", vlms["llava"]),
        "clip": ("--clip-model", models.clip),
        "llava": ("--scorer", vlms["llava"]),
    }
    for name, scorers in made.items():
        result = CliRunner().invoke(main, run_args(models, root / name, *scorers))
        assert result.exit_code == 0, result.output
    return {name: root / name for name in made}


def table(folder):
    return pd.read_csv(folder / "scores.csv", keep_default_na=False)


def test_each_scorers_column_equals_a_run_of_it_alone(runs):
    both, clip, llava = table(runs["both"]), table(runs["clip"]), table(runs["llava"])
    assert list(both.columns)[-2:] == ["score:llava", "truncated:llava"]
    assert both["clip_score"].tolist() == clip["clip_score"].tolist()  # the very floats, not close ones
    assert both["score:llava"].tolist() == llava["clip_score"].tolist()
    assert both["truncated:llava"].tolist() == llava["truncated"].tolist()
    assert (both["score:llava"] > 0).all() and (both["score:llava"] < 1).all()
    assert both["score:llava"].std() > 1e-3  # the answer rows spread P("Yes"): a swapped image would show
    # The images are the same images: generated once, whatever the scorers.
    assert {k: v for k, v in files_of(runs["both"]).items() if k.startswith("images/")} == \
           {k: v for k, v in files_of(runs["clip"]).items() if k.startswith("images/")}


def test_each_scorer_has_its_own_statistics_and_manifest_record(runs, vlms):
    summary = json.loads((runs["both"] / "summary.json").read_text())
    alone = json.loads((runs["llava"] / "summary.json").read_text())
    clip = json.loads((runs["clip"] / "summary.json").read_text())
    assert set(summary["scorers"]) == {"clip", "llava"}
    block = summary["scorers"]["llava"]
    assert block["kind"] == "vqa" and block["column"] == "score:llava" and block["model"] == str(vlms["llava"])
    assert block["scale"] == "probability" and block["score"].startswith("VQAScore")
    # The same statistics as the run of the LLaVA alone, interval included.
    for key in ("mean", "mean_ci", "min", "max", "std", "median", "by_category", "by_challenge"):
        assert block[key] == alone[f"clip/{key}" if key in ("mean", "mean_ci", "min", "max", "std", "median") else key], key
    assert alone["scale"] == "probability" and alone["score"].startswith("VQAScore")
    # The top of the summary stays the primary scorer's, as in a run of CLIP alone.
    assert {k: v for k, v in summary.items() if k != "scorers"} == {k: v for k, v in clip.items() if k != "scorers"}
    assert block["mean"] == pytest.approx(table(runs["both"])["score:llava"].mean(), abs=1e-9)
    per_prompt = pd.read_csv(runs["both"] / "prompts.csv")
    assert per_prompt["mean:llava"].tolist() == pd.read_csv(runs["llava"] / "prompts.csv")["clip_mean"].tolist()
    manifest = json.loads((runs["both"] / "manifest.json").read_text())
    record = {r["label"]: r for r in manifest["scorers"]}["llava"]
    assert record["question"] == 'Does this figure show "{}"? Please answer yes or no.'
    assert record["answer_token"] == "Yes" and isinstance(record["answer_token_id"], int)
    assert record["class"] == "LlavaForConditionalGeneration"
    assert manifest["settings"]["scorers"] == [manifest["settings"]["clip_model"], str(vlms["llava"])]


def test_compare_works_on_either_metric_and_refuses_to_mix_them(cli, runs, tmp_path):
    by_vqa = cli("compare", runs["both"], runs["llava"], "--metric", "llava", "--format", "json", "--resamples", "200")
    assert by_vqa.exit_code == 0, by_vqa.stderr
    overall = json.loads(by_vqa.stdout)["runs"][0]["overall"]
    assert overall["delta"] == 0 and overall["images"] == 8
    by_clip = cli("compare", runs["both"], runs["clip"], "--metric", "clip", "--format", "json", "--resamples", "200")
    assert json.loads(by_clip.stdout)["runs"][0]["overall"]["delta"] == 0
    # Each run's primary scorer: CLIP against VQAScore numbers, refused.
    assert_user_error(cli("compare", runs["clip"], runs["llava"]), "never compared", "--metric")
    # A run without that scorer says how to add it.
    assert_user_error(cli("compare", runs["clip"], runs["both"], "--metric", "llava"),
                      "has no scorer 'llava' (it has clip)", "clipeval score")
    assert_user_error(cli("compare", runs["both"], runs["llava"], "--metric", "lava"), "no scorer 'lava'")


def test_the_gates_and_the_report_read_the_chosen_metric(cli, runs, models, vlms, tmp_path):
    mean = json.loads((runs["both"] / "summary.json").read_text())["scorers"]["llava"]["mean"]
    before = files_of(runs["both"])
    junit = tmp_path / "gate.xml"
    # The same command again with a gate: nothing is generated, the gate reads the LLaVA's mean.
    gated = cli(*run_args(models, runs["both"], "--clip-model", models.clip, "--scorer", vlms["llava"]),
                "--metric", "llava", "--fail-below", f"{mean + 1e-4:.6f}", "--junit-xml", junit)
    assert gated.exit_code == 1, gated.stderr
    assert f"gate failed: llava/mean {mean:.4f} < --fail-below" in gated.stderr
    assert 'name="llava/mean &gt;= ' in junit.read_text()
    assert files_of(runs["both"]) == before  # a failed gate still leaves every file
    passed = cli(*run_args(models, runs["both"], "--clip-model", models.clip, "--scorer", vlms["llava"]),
                 "--metric", "llava", "--fail-below", f"{mean - 1e-4:.6f}")
    assert passed.exit_code == 0, passed.stderr
    assert "llava: mean" in passed.stdout and "clip: mean" in passed.stdout
    page = tmp_path / "r.html"
    assert cli("report", runs["both"], "--metric", "llava", "--out", page).exit_code == 0
    assert f"<b>{mean:.4f}</b>" in page.read_text()
    clip_page = tmp_path / "c.html"
    assert cli("report", runs["both"], "--out", clip_page).exit_code == 0
    clip_mean = json.loads((runs["both"] / "summary.json").read_text())["clip/mean"]
    assert f"<b>{clip_mean:.4f}</b>" in clip_page.read_text() and f"<b>{mean:.4f}</b>" not in clip_page.read_text()


def test_a_clip_run_rescored_with_vqa_compares_by_either_metric(cli, runs, models, vlms, tmp_path):
    out = tmp_path / "rescored"
    result = cli("score", runs["clip"], "--out", out, "--clip-model", models.clip, "--scorer", vlms["llava"], "--quiet")
    assert result.exit_code == 0, result.stderr
    scores = table(out)
    assert scores["clip_score"].tolist() == table(runs["clip"])["clip_score"].tolist()
    # Re-scored in the run's own batches, so the very floats of the run that carried it.
    assert scores["score:llava"].tolist() == table(runs["both"])["score:llava"].tolist()
    assert "llava: mean" in result.stdout
    for metric in ("clip", "llava"):
        compared = cli("compare", runs["both"], out, "--metric", metric, "--format", "json", "--resamples", "200")
        assert compared.exit_code == 0, compared.stderr
        assert json.loads(compared.stdout)["runs"][0]["overall"]["delta"] == 0
    # VQAScore alone re-scores too: its primary column.
    alone = tmp_path / "vqa-only"
    assert cli("score", runs["clip"], "--out", alone, "--scorer", vlms["llava"], "--quiet").exit_code == 0
    assert table(alone)["clip_score"].tolist() == table(runs["llava"])["clip_score"].tolist()


def test_bad_scorers_and_metrics_are_one_line_before_any_work(cli, models, vlms, tmp_path):
    assert_user_error(cli(*run_args(models, tmp_path / "a", "--clip-model", models.clip), "--metric", "llava"),
                      "--metric: this run has no scorer 'llava'", "--scorer llava")
    assert not (tmp_path / "a").exists()
    twin = tmp_path / "other" / "clip"
    shutil.copytree(models.clip, twin)
    assert_user_error(cli(*run_args(models, tmp_path / "b", "--clip-model", models.clip, "--scorer", twin)),
                      "two scorers are both called 'clip'")
    # Remote code, a processor without a chat template, a model that is neither kind.
    remote = tiny_vlms.needing_remote_code(vlms["llava"], tmp_path / "remote")
    assert_user_error(cli(*run_args(models, tmp_path / "c", "--scorer", remote)), "needs remote code")
    plain = tiny_vlms.without_chat_template(vlms["llava"], tmp_path / "plain")
    assert_user_error(cli(*run_args(models, tmp_path / "d", "--clip-model", models.clip, "--scorer", plain)),
                      "plain: its processor has no chat template")
    text_only = tmp_path / "text-only"  # a text model with CLIP's tokenizer and image processor beside it
    _tiny_bert(text_only)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json"):
        if (models.clip / name).is_file():
            shutil.copy(models.clip / name, text_only / name)
    assert_user_error(cli(*run_args(models, tmp_path / "e", "--scorer", text_only)),
                      "neither a dual encoder", "nor a vision-language model")
    assert_user_error(cli("compare", tmp_path / "x", tmp_path / "y", "--metrc", "clip"), "Did you mean '--metric'?")


def _tiny_bert(folder):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(folder)


def test_the_sweep_history_is_of_the_chosen_metric(cli, models, vlms, tmp_path):
    training = tmp_path / "training"
    for step in (100, 200):
        shutil.copytree(models.sd, training / f"checkpoint-{step}")
    out = tmp_path / "results"
    args = ["sweep", training, "--out", out, "--settle", "0", "--clip-model", models.clip, "--scorer", vlms["llava"],
            "--metric", "llava", "--alert-if-worse", "0.01", *ARGS]
    swept = cli(*args)
    assert swept.exit_code == 0, swept.stderr
    assert "step 200: llava/mean " in swept.stdout and "clip/mean" not in swept.stdout  # the cron log says whose
    history = pd.read_csv(out / "history.csv", keep_default_na=False)
    assert history["metric"].tolist() == ["llava", "llava"]
    for _, row in history.iterrows():
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert row["clip_mean"] == summary["scorers"]["llava"]["mean"] != summary["clip/mean"]
    assert history["delta_best"].iloc[0] == "" and float(history["delta_best"].iloc[1]) == 0  # the same weights twice
    # By CLIP, on the same folders: the history is rebuilt, every row of CLIP.
    again = cli(*[a for a in args if a not in ("--metric", "llava")])
    assert again.exit_code == 0, again.stderr
    history = pd.read_csv(out / "history.csv", keep_default_na=False)
    assert history["metric"].tolist() == ["clip", "clip"]
    assert history["clip_mean"].iloc[0] == json.loads((out / "checkpoint-100" / "summary.json").read_text())["clip/mean"]
    page = tmp_path / "t.html"
    assert_user_error(cli("report", out, "--metric", "llava", "--out", page), "history.csv holds the scores of clip")


def test_resume_after_kill_keeps_every_column(runs, models, vlms, run_tiny, tmp_path):
    import signal

    out = tmp_path / "run"
    args = run_args(models, out, "--clip-model", models.clip, "--scorer", vlms["llava"])
    prelude = """
import os, signal
import clipeval.store as store
_commit, _n = store.RunDir.commit, [0]
def commit(self, rows):
    _commit(self, rows); _n[0] += 1
    if _n[0] == 1: os.kill(os.getpid(), signal.SIGKILL)
store.RunDir.commit = commit
"""
    killed = run_subprocess(args, prelude=prelude)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    from click.testing import CliRunner

    from clipeval.cli import main

    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["images_generated"] == 5  # 8 images in batches of 3: the first batch was kept
    assert files_of(out) == files_of(runs["both"])
    assert np.isfinite(table(out)["score:llava"].astype(float)).all()


def test_evaluate_takes_several_scorers_and_matches_the_run(runs, models, vlms):
    """The library API goes through the same loop, tables and statistics: the same columns."""
    from diffusers import StableDiffusionPipeline

    from clipeval import evaluate
    from clipeval.scorers import make_scorer

    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    result = evaluate(pipe, "smoke", clip=[str(models.clip), make_scorer(str(vlms["llava"]))], limit=4,
                      images_per_prompt=2, batch_size=3, steps=2)
    run = table(runs["both"])
    assert result.scores["clip_score"].tolist() == run["clip_score"].tolist()
    assert result.scores["score:llava"].tolist() == run["score:llava"].tolist()
    assert result.summary["scorers"] == json.loads((runs["both"] / "summary.json").read_text())["scorers"]


def test_trackers_log_every_scorer_under_its_label(runs):
    from clipeval.trackers import Tracking

    summary = json.loads((runs["both"] / "summary.json").read_text())
    scalars = Tracking("none", runs["both"] / "logs").values(summary)
    block = summary["scorers"]["llava"]
    assert scalars["llava/mean"] == block["mean"] and scalars["llava/median"] == block["median"]
    assert scalars["clip/mean"] == summary["clip/mean"] and "clip/clip/mean" not in scalars
    assert not any(k.startswith("clip/") and "llava" in k for k in scalars)
    percent = Tracking("none", runs["both"] / "logs", scale="percent").values(summary)
    assert percent["llava/mean"] == pytest.approx(100 * block["mean"])
