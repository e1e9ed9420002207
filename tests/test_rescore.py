"""``clipeval score``: re-scoring runs, scoring image folders, and every malformed input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error
from PIL import Image

from clipeval.decode import load_rgb
from clipeval.score import ClipScorer

pytestmark = pytest.mark.xdist_group("rescore")  # its module fixtures are whole runs: built once

PROMPTS = ['a "quoted" red cube, on a table', "東京の夜景 🌃", "a cat", "a dog"]


def score_cli(cli, source, out, *args):
    return cli("score", source, "--out", out, "--quiet", *args)


@pytest.fixture(scope="module")
def run_dir(models, tmp_path_factory):
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("rescore") / "run"
    args = ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip), "--prompt-library", "smoke",
            "--out", str(out), "--steps", "2", "--limit", "5", "--images-per-prompt", "2", "--batch-size", "3", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    return out


def test_rescoring_with_the_runs_model_reproduces_its_scores_exactly(cli, run_dir, models, tmp_path):
    out = tmp_path / "again"
    result = score_cli(cli, run_dir, out, "--clip-model", models.clip)
    assert result.exit_code == 0, result.stderr
    assert (out / "scores.csv").read_bytes() == (run_dir / "scores.csv").read_bytes()
    assert (out / "prompts.csv").read_bytes() == (run_dir / "prompts.csv").read_bytes()
    assert json.loads((out / "summary.json").read_text()) == json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "score" and manifest["source"] == {
        "kind": "run", "path": str(run_dir), "prompts": None, "batches": 4}
    assert manifest["settings"]["rescored_from"] == str(run_dir)
    # Same settings as the run: the re-score can be compared with it directly.
    assert cli("compare", run_dir, out, "--resamples", "200").exit_code == 0


def test_rescoring_a_resumed_and_extended_run_is_still_exact(cli, run_tiny, models, tmp_path):
    """The journal keeps each batch as it was scored, whatever the run's history."""
    run = tmp_path / "run"
    assert run_tiny(run, "--limit", "3", "--batch-size", "2").exit_code == 0
    assert run_tiny(run, "--limit", "5", "--images-per-prompt", "2", "--batch-size", "3").exit_code == 0
    out = tmp_path / "again"
    assert score_cli(cli, run, out, "--clip-model", models.clip).exit_code == 0
    assert (out / "scores.csv").read_bytes() == (run / "scores.csv").read_bytes()


def test_another_model_gives_other_scores_and_is_not_compared_silently(cli, run_dir, models, tmp_path):
    out = tmp_path / "other"
    assert score_cli(cli, run_dir, out, "--clip-model", models.clip2).exit_code == 0
    a = pd.read_csv(run_dir / "scores.csv", keep_default_na=False)
    b = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert a.drop(columns="clip_score").equals(b.drop(columns="clip_score"))
    assert not np.allclose(a["clip_score"], b["clip_score"])
    assert_user_error(cli("compare", run_dir, out), "clip_model")


def test_several_models_one_column_each_and_each_image_decoded_once(cli, run_dir, models, tmp_path, monkeypatch):
    import clipeval.decode

    decoded = []
    original = clipeval.decode.read_rgb
    monkeypatch.setattr(clipeval.decode, "read_rgb", lambda path: decoded.append(path) or original(path))
    out = tmp_path / "both"
    result = score_cli(cli, run_dir, out, "--clip-model", models.clip, "--clip-model", models.clip2)
    assert result.exit_code == 0, result.stderr
    assert len(decoded) == len(set(decoded)) == 10
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    second = "score:clip2"  # other scorers are labelled by their folder's name
    assert list(scores.columns)[-2:] == [second, "truncated:clip2"]
    assert scores["clip_score"].tolist() == pd.read_csv(run_dir / "scores.csv")["clip_score"].tolist()
    alone = tmp_path / "alone"
    assert score_cli(cli, run_dir, alone, "--clip-model", models.clip2).exit_code == 0
    assert scores[second].tolist() == pd.read_csv(alone / "scores.csv")["clip_score"].tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scorers"]) == {"clip", "clip2"}
    assert summary["scorers"]["clip2"]["model"] == str(models.clip2)
    assert summary["scorers"]["clip2"]["mean"] == pytest.approx(scores[second].mean(), abs=1e-9)
    assert summary["scorers"]["clip"]["mean"] == summary["clip/mean"]
    per_prompt = pd.read_csv(out / "prompts.csv")
    expected = scores.groupby("prompt_id")[second].mean().to_numpy()
    assert np.allclose(per_prompt["mean:clip2"].to_numpy(), expected, atol=1e-9)
    assert result.stdout.count(": mean") == 2


def _save(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)


def _random_rgb(seed, size=(40, 48)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_image_folder_paired_by_prompt_id(cli, models, tmp_path):
    images = tmp_path / "images"
    for name, seed in (("00000.png", 0), ("00001_00.png", 1), ("00001_01.png", 2), ("3.jpg", 3), ("00099.png", 4), ("cat.png", 5)):
        _save(images, name, _random_rgb(seed))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = score_cli(cli, images, out, "--prompts", "smoke", "--clip-model", models.clip)
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert list(zip(scores.prompt_id, scores["sample"], scores.image)) == [
        (0, 0, "00000.png"), (1, 0, "00001_00.png"), (1, 1, "00001_01.png"), (3, 0, "3.jpg")]
    assert (scores.seed == "").all()
    assert "13 prompts without an image: 00002, 00004" in result.stderr
    assert "3 files matching no prompt: 00099.png, cat.png, notes.txt" in result.stderr
    scorer = ClipScorer(str(models.clip))
    expected, _ = scorer.score([load_rgb(images / n) for n in scores.image], scores.prompt.tolist())
    assert scores.clip_score.tolist() == pytest.approx(expected, abs=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["problems"]["prompts without an image"]) == 13


def test_image_folder_paired_by_a_table(cli, models, tmp_path):
    images = tmp_path / "images"
    for i in range(4):
        _save(images / "sub", f"img {i}.png", _random_rgb(10 + i))
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "caption", "category"])
        for i, prompt in enumerate(PROMPTS):
            writer.writerow([f"sub/img {i}.png", prompt, "x"])
        writer.writerow(["sub/img 0.png", PROMPTS[0], "x"])  # a second image of prompt 0
        writer.writerow(["sub/missing.png", "a ghost", "x"])
    out = tmp_path / "out"
    result = score_cli(cli, images, out, "--prompts", table, "--clip-model", models.clip)
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert scores.prompt.tolist() == [PROMPTS[0], PROMPTS[0], *PROMPTS[1:]]
    assert list(zip(scores.prompt_id, scores["sample"])) == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)]
    assert scores.clip_score[0] == scores.clip_score[1]
    assert "1 missing images: sub/missing.png" in result.stderr


def test_table_paths_may_not_leave_the_image_folder(cli, models, tmp_path):
    images = tmp_path / "images"
    _save(images, "a.png", _random_rgb(0))
    _save(tmp_path, "outside.png", _random_rgb(1))
    table = tmp_path / "pairs.jsonl"
    table.write_text(json.dumps({"image": "../outside.png", "prompt": "x"}) + "\n")
    assert_user_error(score_cli(cli, images, tmp_path / "out", "--prompts", table, "--clip-model", models.clip),
                      "outside")


def test_conversions_gray_alpha_palette_16bit(tmp_path):
    rgb = _random_rgb(7, (16, 16))
    gray = rgb[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert torch.equal(load_rgb(tmp_path / "gray.png"), torch.from_numpy(np.stack([gray] * 3)))
    rgba = np.dstack([rgb, np.full((16, 16), 0, np.uint8)])  # fully transparent: white, as transformers does
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (load_rgb(tmp_path / "clear.png") == 255).all()
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert load_rgb(tmp_path / "palette.png").shape == (3, 16, 16)
    sixteen = (gray.astype(np.uint16) << 8) | 0x7F
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert torch.equal(load_rgb(tmp_path / "deep.png"), torch.from_numpy(np.stack([gray] * 3)))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.jpg")
    assert load_rgb(tmp_path / "print.jpg").dtype == torch.uint8


@pytest.mark.parametrize("kind", ["palette", "palette-transparent", "cmyk-jpeg", "gray-alpha", "rgba-half"])
def test_conversions_equal_the_processors_own_pixel_for_pixel(kind, tmp_path):
    """What CLIP sees of a palette, CMYK, or transparent file is what transformers' own
    conversion (``convert_to_rgb``, used by its CLIP processor) makes of it, pixel for pixel."""
    from transformers.image_transforms import convert_to_rgb

    rgb = _random_rgb(11, (24, 20))
    path = tmp_path / ("image.jpg" if kind == "cmyk-jpeg" else "image.png")
    if kind == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    elif kind == "palette-transparent":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, transparency=3)
    elif kind == "cmyk-jpeg":
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    elif kind == "gray-alpha":
        Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(path)
    else:
        Image.fromarray(np.dstack([rgb, np.full((24, 20), 128, np.uint8)]), "RGBA").save(path)
    expected = convert_to_rgb(Image.open(path), return_numpy=True)
    ours = load_rgb(path).permute(1, 2, 0).numpy()
    assert ours.shape == expected.shape == (24, 20, 3)
    assert np.array_equal(ours, expected)
    if kind == "palette-transparent":
        assert (ours == 255).all(axis=-1).any()  # the transparent index became white
    if kind == "cmyk-jpeg":
        assert np.abs(ours.astype(int) - rgb.astype(int)).mean() < 12  # still the picture, not inverted


def test_unreadable_images_are_skipped_and_listed(cli, models, tmp_path):
    images = tmp_path / "images"
    _save(images, "00000.png", _random_rgb(0))
    (images / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = Image.fromarray(_random_rgb(1))
    good.save(images / "00002.png")
    (images / "00002.png").write_bytes((images / "00002.png").read_bytes()[:200])  # truncated
    out = tmp_path / "out"
    result = score_cli(cli, images, out, "--prompts", "smoke", "--clip-model", models.clip)
    assert result.exit_code == 0, result.stderr
    assert "2 unreadable images: 00001.png, 00002.png" in result.stderr
    assert pd.read_csv(out / "scores.csv").image.tolist() == ["00000.png"]
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["image"] for s in skipped] == ["00001.png", "00002.png"] and all(s["reason"] for s in skipped)


def test_nothing_scorable_is_an_error(cli, models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "00000.png").write_bytes(b"garbage")
    assert_user_error(score_cli(cli, images, tmp_path / "o1", "--prompts", "smoke", "--clip-model", models.clip),
                      "no image could be scored")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(score_cli(cli, empty, tmp_path / "o2", "--prompts", "smoke", "--clip-model", models.clip),
                      "no image in", "matches a prompt")


def test_long_prompt_scores_as_its_truncation(cli, models, tmp_path):
    images = tmp_path / "images"
    _save(images, "a.png", _random_rgb(3))
    long = "a very long caption " + " ".join(f"w{i}" for i in range(120))
    (tmp_path / "pairs.tsv").write_text(f"image\tprompt\na.png\t{long}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert score_cli(cli, images, out, "--prompts", tmp_path / "pairs.tsv", "--clip-model", models.clip).exit_code == 0
    row = pd.read_csv(out / "scores.csv").iloc[0]
    assert bool(row.truncated)
    scorer = ClipScorer(str(models.clip))
    ids = scorer.tokenizer(long)["input_ids"][:76] + [scorer.tokenizer.eos_token_id]
    with torch.no_grad():
        text = scorer.model.get_text_features(input_ids=torch.tensor([ids])).pooler_output[0]
    image = scorer.embed_images(load_rgb(images / "a.png")[None])[0]
    assert row.clip_score == pytest.approx(float(image @ (text / text.norm())), abs=1e-6)


def test_fast_and_exact_agree_on_odd_sizes(cli, models, tmp_path):
    images = tmp_path / "images"
    for i, size in enumerate([(40, 48), (300, 200), (17, 90), (32, 32)]):
        _save(images, f"{i:05d}.png", _random_rgb(20 + i, size))
    fast, exact = tmp_path / "fast", tmp_path / "exact"
    assert score_cli(cli, images, fast, "--prompts", "smoke", "--clip-model", models.clip).exit_code == 0
    assert score_cli(cli, images, exact, "--prompts", "smoke", "--clip-model", models.clip, "--preprocess", "exact").exit_code == 0
    a, b = pd.read_csv(fast / "scores.csv"), pd.read_csv(exact / "scores.csv")
    assert np.allclose(a.clip_score, b.clip_score, atol=1e-4)


@pytest.mark.parametrize("args, needles", [
    (["--prompts", "smoke"], ["is a run folder", "drop --prompts"]),
])
def test_run_folder_with_prompts_is_refused(cli, run_dir, models, tmp_path, args, needles):
    assert_user_error(score_cli(cli, run_dir, tmp_path / "o", "--clip-model", models.clip, *args), *needles)


def test_bad_sources(cli, run_dir, models, tmp_path):
    images = tmp_path / "images"
    _save(images, "00000.png", _random_rgb(0))
    assert_user_error(score_cli(cli, images, tmp_path / "o1", "--clip-model", models.clip), "not a run folder", "--prompts")
    assert_user_error(score_cli(cli, tmp_path / "nope", tmp_path / "o2"), "no such folder")
    assert_user_error(score_cli(cli, run_dir, run_dir, "--clip-model", models.clip), "must not be the source")
    (tmp_path / "bad.csv").write_text("image,description\n00000.png,x\n")
    assert_user_error(score_cli(cli, images, tmp_path / "o3", "--prompts", tmp_path / "bad.csv", "--clip-model", models.clip),
                      "no prompt column")
    assert_user_error(score_cli(cli, images, tmp_path / "o4", "--prompts", "smok", "--clip-model", models.clip),
                      "Did you mean smoke")


def test_text_forwards_run_full_when_each_batch_holds_one_prompt(cli, models, tmp_path, monkeypatch):
    """Batches of one prompt each: the prompts of the coming batches are embedded together, so
    the text tower runs few copies (batch by batch it ran text_group rows per prompt)."""
    from transformers import CLIPModel

    images = tmp_path / "images"
    for i in range(16):
        for sample in range(2):
            _save(images, f"{i:05d}_{sample:02d}.png", _random_rgb(100 + 2 * i + sample))
    rows = []
    original = CLIPModel.get_text_features

    def counting(self, input_ids, **kwargs):
        rows.extend(tuple(r) for r in input_ids.tolist())
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(CLIPModel, "get_text_features", counting)
    result = score_cli(cli, images, tmp_path / "out", "--prompts", "smoke", "--clip-model", models.clip,
                       "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert len(scores) == 32 and scores.prompt.nunique() == 16
    shapes = {len(r) for r in rows}
    assert len(set(rows)) == 16  # each prompt once
    assert len(rows) <= 16 + 3 * len(shapes) < 16 * 4  # only the last forward of a shape has copies


@pytest.mark.slow
def test_ctrl_c_while_the_model_loads_stops_the_decoders_and_keeps_the_earlier_result(models, tmp_path):
    """Ctrl-C while torch loads and the decoders are busy: exit 130 at once (the queued images are
    not decoded first), one line, and the --out folder's earlier result untouched."""
    import time

    from conftest import run_subprocess

    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        Image.fromarray(np.full((24, 24, 3), i, np.uint8)).save(images / f"{i:05d}.png")
    library = tmp_path / "prompts.txt"
    library.write_text("".join(f"prompt {i}\n" for i in range(60)), encoding="utf-8")
    out = tmp_path / "out"
    args = ["score", images, "--prompts", library, "--clip-model", models.clip, "--out", out, "--quiet"]
    assert run_subprocess(args).returncode == 0
    files = lambda: {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}  # noqa: E731
    before = files()
    assert "scores.csv" in before
    prelude = """
import os, signal, time
import clipeval.pipelines as pipelines, clipeval.decode as decode
_read = decode.read_rgb
decode.read_rgb = lambda path: (time.sleep(0.5), _read(path))[1]  # 60 images: 30 s in one process
def resolve_device(spec):
    time.sleep(1.0)  # the decoders are busy
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
pipelines.resolve_device = resolve_device
"""
    started = time.monotonic()
    done = run_subprocess([*args, "--overwrite"], prelude=prelude)
    assert time.monotonic() - started < 12, "the queued images were decoded before exiting"
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "run the same command again" in done.stderr
    assert files() == before


@pytest.mark.slow
def test_a_kill_while_rescoring_into_the_same_folder_keeps_the_earlier_result(models, tmp_path):
    """Scoring again into a folder of the same settings replaces its set only once the new one is
    written: kill -9 in the middle leaves the earlier files byte for byte, and a rerun completes."""
    from conftest import run_subprocess

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((24, 24, 3), 50 * i, np.uint8)).save(images / f"{i:05d}.png")
    library = tmp_path / "prompts.txt"
    library.write_text('a "quoted" cube\n東京の夜景 🌃\n' + "long " * 90 + "\nx\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["score", images, "--prompts", library, "--clip-model", models.clip, "--out", out, "--quiet"]
    assert run_subprocess(args).returncode == 0
    results = ("scores.csv", "prompts.csv", "summary.json", "manifest.json")
    before = {name: (out / name).read_bytes() for name in results}
    kill = ("import os, signal, clipeval.rescore as r\n"
            "r._score_batches = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n")
    assert run_subprocess(args, prelude=kill).returncode == -9
    assert {name: (out / name).read_bytes() for name in results} == before
    again = run_subprocess(args)
    assert again.returncode == 0, again.stderr
    assert (out / "scores.csv").read_bytes() == before["scores.csv"]
