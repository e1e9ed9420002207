"""``clipeval run`` end to end on tiny models, through the CLI as users run it."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TRICKY_PROMPTS, assert_user_error, files_of
from PIL import Image

from clipeval.score import ClipScorer


def test_run_writes_the_documented_files(run_tiny, tmp_path, models):
    out = tmp_path / "run"
    result = run_tiny(out, "--images-per-prompt", "2", "--batch-size", "3", "--seed", "5")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("clip/mean ") and str(out / "summary.json") in result.stdout

    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert list(scores.columns) == [
        "prompt_id", "sample", "seed", "prompt", "category", "challenge", "clip_score", "truncated", "image", "flag",
    ]
    assert (scores["flag"] == "").all()
    assert len(scores) == 32
    assert scores["prompt_id"].tolist() == [i // 2 for i in range(32)]
    assert scores["sample"].tolist() == [0, 1] * 16
    # bitreverse32(5) = 2³¹ + 2²⁹; the column holds the seed the generator was given
    assert scores["seed"].tolist() == [((i // 2) * 4096 + i % 2) ^ (2**31 + 2**29) for i in range(32)]
    assert scores["image"].tolist() == [f"images/{i // 2:05d}_{i % 2:02d}.png" for i in range(32)]
    assert scores["clip_score"].between(-1, 1).all()
    assert sorted(p.name for p in (out / "images").iterdir()) == [s.split("/")[1] for s in scores["image"]]

    prompts = pd.read_csv(out / "prompts.csv", keep_default_na=False)
    assert list(prompts.columns) == ["prompt_id", "prompt", "category", "challenge", "n", "clip_mean", "clip_min", "clip_max"]
    assert prompts["n"].tolist() == [2] * 16
    means = scores.groupby("prompt_id")["clip_score"].mean()
    assert np.allclose(prompts["clip_mean"], means, atol=1e-9)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["clip/mean"] == pytest.approx(scores["clip_score"].mean(), abs=1e-9)
    assert summary["clip/std"] == pytest.approx(scores["clip_score"].std(ddof=1), abs=1e-9)
    assert summary["clip/median"] == pytest.approx(scores["clip_score"].median(), abs=1e-9)
    assert summary["clip/min"] == scores["clip_score"].min() and summary["clip/max"] == scores["clip_score"].max()
    assert (summary["images"], summary["prompts"], summary["truncated_prompts"]) == (32, 16, 0)
    assert summary["flagged_images"] == {}
    assert summary["scale"] == "cosine" and "not clamped" in summary["score"]
    animals = summary["by_category"]["Animals"]
    assert (animals["n"], animals["prompts"]) == (4, 2)
    assert animals["mean"] == pytest.approx(scores.loc[scores.category == "Animals", "clip_score"].mean(), abs=1e-9)
    assert set(summary["by_challenge"]) == set(scores["challenge"])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["finished_at"]
    s = manifest["settings"]
    assert (s["checkpoint"], s["clip_model"], s["seed"], s["steps"]) == (str(models.sd), str(models.clip), 5, 2)
    assert (s["height"], s["width"], s["dtype"], s["device_type"]) == (64, 64, "float32", "cpu")
    assert s["guidance_scale"] == 7.5  # the pipeline's own default, resolved and recorded
    assert s["pipeline"] == "StableDiffusionPipeline"
    assert manifest["generation"]["seed_formula"] == "seed = (prompt_id * 2**12 + sample) XOR bitreverse32(base_seed)"
    assert manifest["generation"]["seed_scheme"] == 2
    assert manifest["library"]["name"] == "smoke" and len(manifest["library"]["sha256"]) == 64
    assert set(manifest["versions"]) >= {"clipeval", "torch", "diffusers", "transformers", "python"}
    assert manifest["command"][:2] == ["clipeval", "run"] or manifest["command"][0] == "clipeval"
    assert any(f["file"] == "model_index.json" and f["sha256"] for f in manifest["checkpoint"]["files"])


def test_scores_are_reproduced_from_the_saved_pngs_by_an_independent_reference(run_tiny, tmp_path, models):
    """The score is computed on the image exactly as saved: re-scoring the PNGs with plain
    transformers (its own processor, logits_per_image) gives the same numbers."""
    out = tmp_path / "run"
    assert run_tiny(out, "--preprocess", "exact", "--limit", "6").exit_code == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    reference = ClipScorer(str(models.clip), preprocess="exact")
    images = [Image.open(out / path).convert("RGB") for path in scores["image"]]
    inputs = reference.processor(images=images, return_tensors="pt")
    text = reference.tokenizer(scores["prompt"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reference.model(pixel_values=inputs["pixel_values"], **text).logits_per_image
    expected = (logits / reference.model.logit_scale.exp()).diagonal().tolist()
    assert scores["clip_score"].tolist() == pytest.approx(expected, abs=1e-6)


def test_result_files_get_the_users_umask(run_tiny, tmp_path):
    old = os.umask(0o022)
    try:
        assert run_tiny(tmp_path / "run", "--limit", "1").exit_code == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.name != "lock":
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_png_metadata_and_pixels(run_tiny, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "2").exit_code == 0
    image = Image.open(out / "images" / "00001_00.png")
    assert image.mode == "RGB" and image.size == (64, 64)
    meta = json.loads(image.info["clipeval"])
    assert meta == {"prompt_id": 1, "sample": 0, "seed": 4096, "prompt": "a golden retriever catching a frisbee in a park"}


def test_batch_size_does_not_change_results(run_tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tiny(a, "--limit", "5", "--batch-size", "1").exit_code == 0
    assert run_tiny(b, "--limit", "5", "--batch-size", "4").exit_code == 0
    sa = pd.read_csv(a / "scores.csv", keep_default_na=False)
    sb = pd.read_csv(b / "scores.csv", keep_default_na=False)
    assert sa.drop(columns="clip_score").equals(sb.drop(columns="clip_score"))
    assert np.allclose(sa["clip_score"], sb["clip_score"], atol=1e-5)
    for name in sa["image"]:
        pa, pb = np.asarray(Image.open(a / name), int), np.asarray(Image.open(b / name), int)
        assert np.abs(pa - pb).max() <= 1


def test_same_command_twice_gives_identical_files(run_tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tiny(a, "--limit", "4", "--images-per-prompt", "2").exit_code == 0
    assert run_tiny(b, "--limit", "4", "--images-per-prompt", "2").exit_code == 0
    assert files_of(a) == files_of(b)


def test_sdxl_family(run_tiny, tmp_path, models):
    out = tmp_path / "xl"
    result = run_tiny(out, "--limit", "3", checkpoint=models.sdxl)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["pipeline"] == "StableDiffusionXLPipeline"
    assert manifest["settings"]["guidance_scale"] == 5.0
    assert len(pd.read_csv(out / "scores.csv")) == 3


def test_tricky_prompts_long_prompt_flagged_and_text_kept(run_tiny, tmp_path, tricky_csv):
    out = tmp_path / "run"
    result = run_tiny(out, library=tricky_csv)
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert scores["prompt"].tolist() == TRICKY_PROMPTS
    assert scores["truncated"].tolist() == [False] * 5 + [True]
    assert json.loads((out / "summary.json").read_text())["truncated_prompts"] == 1
    assert "1 prompt(s) longer than the CLIP text limit" in result.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}_00.png" for i in range(6)]


def test_options_are_applied_and_recorded(run_tiny, tmp_path):
    out = tmp_path / "run"
    result = run_tiny(
        out, "--limit", "2", "--negative-prompt", "blurry, 'low' quality", "--guidance-scale", "3",
        "--height", "32", "--width", "48", "--no-save-images",
    )
    assert result.exit_code == 0, result.stderr
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert (settings["negative_prompt"], settings["guidance_scale"]) == ("blurry, 'low' quality", 3.0)
    assert (settings["height"], settings["width"]) == (32, 48)
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    assert pd.read_csv(out / "scores.csv", keep_default_na=False)["image"].tolist() == ["", ""]


def test_negative_prompt_changes_images(run_tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tiny(a, "--limit", "1").exit_code == 0
    assert run_tiny(b, "--limit", "1", "--negative-prompt", "a dog").exit_code == 0
    assert (a / "images/00000_00.png").read_bytes() != (b / "images/00000_00.png").read_bytes()


def test_rerun_resumes_without_generating_again(run_tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "4").exit_code == 0
    before = files_of(out)
    import clipeval.generate

    calls = []
    original = clipeval.generate.generate
    monkeypatch.setattr(
        clipeval.generate, "generate",
        lambda pipe, batch, s, **kw: calls.append([i.key for i in batch]) or original(pipe, batch, s, **kw)
    )
    assert run_tiny(out, "--limit", "4").exit_code == 0
    assert calls == [] and files_of(out) == before
    # A larger selection into the same folder only generates what is new: the second samples
    # of prompts 0-3 and both samples of prompts 4-5, in the fixed batches of the full list.
    assert run_tiny(out, "--limit", "6", "--images-per-prompt", "2").exit_code == 0
    assert calls == [[(0, 1), (1, 1)], [(2, 1), (3, 1)], [(4, 0), (4, 1), (5, 0), (5, 1)]]
    after = files_of(out)
    assert all(after[name] == data for name, data in before.items() if name.startswith("images/"))
    assert len(pd.read_csv(out / "scores.csv")) == 12
    assert json.loads((out / "manifest.json").read_text())["resumed"] == 2


def test_other_settings_are_refused_naming_them_and_overwrite_replaces(run_tiny, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "2").exit_code == 0
    before = files_of(out)
    refused = run_tiny(out, "--limit", "2", "--seed", "9")
    assert_user_error(refused, "other settings", "seed 9 (was 0)", "--overwrite")
    refused = run_tiny(out, "--limit", "2", "--steps", "3")
    assert_user_error(refused, "steps 3 (was 2)")
    assert files_of(out) == before  # nothing damaged by the refusals
    assert run_tiny(out, "--limit", "2", "--seed", "9", "--overwrite").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 9
    assert files_of(out) != before


def test_out_folder_that_is_not_a_run_is_left_alone(run_tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "scores.csv").write_text("precious")
    assert_user_error(run_tiny(out), "not a clipeval run folder")
    assert sorted(p.name for p in out.iterdir()) == ["scores.csv"]
    assert (out / "scores.csv").read_text() == "precious"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--checkpoint", "/no/such/model"], ["checkpoint not found", "/no/such/model"]),
        (["--checkpoint", "not a hub id!"], ["checkpoint not found"]),
        (["--prompt-library", "partti"], ["unknown prompt library", "Did you mean parti"]),
        (["--device", "tpu"], ["--device tpu"]),
        (["--device", "cuda:0"], ["CUDA is not available"]),
        (["--dtype", "float16"], ["float16 is not supported on the CPU"]),
        (["--height", "60"], ["multiples of 8"]),
        (["--steps", "0"], ["Invalid value for '--steps'"]),
        (["--stpes", "2"], ["No such option", "--steps"]),
        (["--clip-model", "/no/such/clip"], ["could not load CLIP model"]),
    ],
)
def test_bad_input_is_one_clear_line(run_tiny, tmp_path, args, needles):
    result = run_tiny(tmp_path / "run", *args)
    assert_user_error(result, *needles)


def test_bad_checkpoints(run_tiny, tmp_path, models):
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    assert_user_error(run_tiny(tmp_path / "r1", checkpoint=folder), "no model_index.json")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    assert_user_error(run_tiny(tmp_path / "r2", checkpoint=pickle), "pickle", ".safetensors")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")  # an empty file: refused from its header, before any base model is read
    assert_user_error(run_tiny(tmp_path / "r3", checkpoint=single), "model.safetensors: not a safetensors file")
    assert_user_error(
        run_tiny(tmp_path / "r4", "--base-model", str(models.sd), checkpoint=single), "not a safetensors file"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    assert_user_error(run_tiny(tmp_path / "r5", checkpoint=broken), "model_index.json")
    offline = run_tiny(tmp_path / "r6", checkpoint="someone/not-cached-model")
    assert_user_error(offline, "someone/not-cached-model")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 7))  # failed before creating --out


def test_unwritable_out_parent_fails_before_loading(run_tiny, tmp_path):
    assert_user_error(run_tiny("/proc/clipeval-run"), "/proc is not writable")  # even for root
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o500)
        assert_user_error(run_tiny(parent / "run"), "not writable")


def test_out_that_is_a_file(run_tiny, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert_user_error(run_tiny(path), "not a folder")


def test_empty_prompt_file_through_run(run_tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_user_error(run_tiny(tmp_path / "run", library=empty), "no prompts")


def test_demo_runs_end_to_end_and_says_its_scores_mean_nothing(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("run", "--checkpoint", "demo", "--clip-model", "demo", "--prompt-library", "smoke",
                 "--out", out, "--steps", "2", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("DEMO MODELS") == 2 and "mean nothing" in result.stderr
    assert len(pd.read_csv(out / "scores.csv")) == 16


def _pixels(out):
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted((out / "images").glob("*.png"))}


def test_seed_reaches_the_pixels(run_tiny, tmp_path):
    """--seed N and N+1 share no image; the same seed in other batches differs by at most one
    uint8 level; the seed column and each PNG's metadata hold the seed the generator was given."""
    args = ("--limit", "8", "--images-per-prompt", "2")
    for name, extra in {"s0": ("--seed", "0"), "s1": ("--seed", "1"), "s1b": ("--seed", "1", "--batch-size", "5")}.items():
        assert run_tiny(tmp_path / name, *args, *extra).exit_code == 0
    s0, s1, s1b = (_pixels(tmp_path / n) for n in ("s0", "s1", "s1b"))
    assert len(s0) == len(s1) == 16
    every_pair = [(a, b) for a in s0.values() for b in s1.values()]
    assert not any(np.array_equal(a, b) for a, b in every_pair)  # not even under another name
    for name in s1:
        assert np.abs(s1[name].astype(int) - s1b[name].astype(int)).max() <= 1, name
    scores = pd.read_csv(tmp_path / "s1" / "scores.csv")
    for row in scores.itertuples():
        meta = json.loads(Image.open(tmp_path / "s1" / row.image).text["clipeval"])
        assert meta["seed"] == row.seed < 2**32  # below 2³²: the CPU generator keeps every bit
    assert set(scores["seed"]).isdisjoint(pd.read_csv(tmp_path / "s0" / "scores.csv")["seed"])


def test_a_run_of_the_first_seed_scheme_is_resumed_only_for_seed_0(run_tiny, tmp_path):
    """Scheme 1 (clipeval 0.1.0) ignored --seed. A seed-0 run of it has exactly today's images and
    is extended; any other seed is refused with one line naming --overwrite."""
    for seed in ("0", "3"):
        out = tmp_path / f"seed{seed}"
        assert run_tiny(out, "--limit", "2", "--seed", seed).exit_code == 0
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["generation"]["seed_scheme"]  # as 0.1.0 wrote it
        (out / "manifest.json").write_text(json.dumps(manifest))
        before = _pixels(out)
        extended = run_tiny(out, "--limit", "3", "--seed", seed)
        if seed == "0":
            assert extended.exit_code == 0, extended.stderr
            assert json.loads((out / "manifest.json").read_text())["timings"]["images_generated"] == 1
        else:
            assert_user_error(extended, "seed scheme 1", "--overwrite")
            after = _pixels(out)
            assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in after)
            assert run_tiny(out, "--limit", "3", "--seed", seed, "--overwrite").exit_code == 0
