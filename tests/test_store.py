"""The result set as every command reads it: ``store.write_results`` writes four files whose
manifest carries the others' sha256, and ``store.load_run`` accepts exactly a complete, matching
set (or a 0.1.0 folder without hashes) and refuses anything else in one line that says what to do.
Also the journal a resume reads, and the settings comparison that decides whether a folder may be
resumed. No model: the files are written by the store itself."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from clipeval import stats, store
from clipeval.errors import ClipevalError


def scores_frame(prompts: int = 4) -> pd.DataFrame:
    rows = []
    for p in range(prompts):
        for s in range(2):
            rows.append({"prompt_id": p, "sample": s, "seed": 4096 * p + s, "prompt": "NA" if p == 0 else f"a, \"quoted\" {p}",
                         "category": "" if p == 1 else "Animals", "challenge": "NA", "clip_score": 0.25 + 0.01 * p + 0.001 * s,
                         "truncated": p == 3, "image": f"images/{p:05d}_{s:02d}.png", "flag": ""})
    return pd.DataFrame(rows)


def write_set(folder: Path, scores: pd.DataFrame | None = None, **manifest) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    scores = scores_frame() if scores is None else scores
    return store.write_results(folder, scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                               manifest={"status": "complete", "settings": {"seed": 0}, **manifest})


def test_the_manifest_holds_each_result_files_sha256_and_the_set_reads_back(tmp_path):
    manifest = write_set(tmp_path / "run")
    assert sorted(manifest["results"]) == ["prompts.csv", "scores.csv", "summary.json"]
    for name, digest in manifest["results"].items():
        assert hashlib.sha256((tmp_path / "run" / name).read_bytes()).hexdigest() == digest
    assert json.loads((tmp_path / "run" / "manifest.json").read_text()) == manifest
    record = store.load_run(tmp_path / "run")
    assert record.manifest == manifest and record.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    written = scores_frame()
    assert record.scores["prompt"].tolist() == written["prompt"].tolist()  # "NA" stays a prompt, not a missing value
    assert record.scores["challenge"].tolist() == ["NA"] * 8 and record.scores["category"].tolist()[2:4] == ["", ""]
    assert record.scores["clip_score"].tolist() == pytest.approx(written["clip_score"].tolist(), abs=0)
    assert record.scores["flag"].tolist() == [""] * 8


def test_the_files_are_written_as_documented(tmp_path):
    write_set(tmp_path / "run")
    scores = (tmp_path / "run" / "scores.csv").read_bytes()
    assert b"\r\n" not in scores and scores.endswith(b"\n")
    assert scores.splitlines()[0] == ",".join(stats.SCORE_COLUMNS).encode()
    summary = (tmp_path / "run" / "summary.json").read_bytes()
    assert summary.endswith(b"}\n") and summary.startswith(b'{\n  "')  # indented, one trailing newline
    assert store.json_bytes({"prompt": "東京 🐱"}) == '{\n  "prompt": "東京 🐱"\n}\n'.encode()  # not \\u escapes
    with pytest.raises(ValueError):
        store.json_bytes({"x": math.nan})  # JSON has no NaN: never written


@pytest.mark.parametrize("name", ["scores.csv", "prompts.csv", "summary.json"])
def test_a_result_file_that_is_not_the_manifests_is_refused_by_name(tmp_path, name):
    write_set(tmp_path / "run")
    path = tmp_path / "run" / name
    data = bytearray(path.read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")  # one byte of a number
    path.write_bytes(bytes(data))
    with pytest.raises(ClipevalError) as err:
        store.load_run(tmp_path / "run")
    assert str(err.value) == (f"{tmp_path / 'run'}: {name} does not belong with manifest.json (a final write was "
                              "interrupted or failed); rerun the command that made it to complete it")


def test_an_unfinished_manifest_is_refused_with_its_status(tmp_path):
    write_set(tmp_path / "run", status="running")
    with pytest.raises(ClipevalError) as err:
        store.load_run(tmp_path / "run")
    assert str(err.value) == (f"{tmp_path / 'run'}: the run is not finished (status: running); "
                              "rerun the command that made it to complete it")


def test_a_legacy_folder_without_hashes_reads_its_scores_and_summary(tmp_path):
    """0.1.0 wrote no hashes: scores.csv, and summary.json where there is one, are read as they are."""
    folder = tmp_path / "old"
    write_set(folder)
    (folder / "manifest.json").write_text(json.dumps({"status": "complete", "settings": {}}))
    (folder / "prompts.csv").write_text("not, the, same\n")  # never read by a legacy load
    record = store.load_run(folder)
    assert len(record.scores) == 8 and record.summary["images"] == 8
    (folder / "summary.json").unlink()
    assert store.load_run(folder).summary is None


def test_a_set_without_usable_images_removes_the_old_summary(tmp_path):
    folder = tmp_path / "run"
    write_set(folder)
    scores = scores_frame().assign(clip_score=None, flag="nan")
    manifest = store.write_results(folder, scores=scores, prompts=stats.prompts_table(scores), summary=None,
                                   manifest={"status": "complete"})
    assert not (folder / "summary.json").exists() and sorted(manifest["results"]) == ["prompts.csv", "scores.csv"]
    record = store.load_run(folder)
    assert record.summary is None and record.scores["clip_score"].isna().all()


def test_a_missing_file_says_which_and_whether_a_rerun_completes_it(tmp_path):
    folder = tmp_path / "run"
    write_set(folder)
    (folder / "scores.csv").unlink()
    with pytest.raises(ClipevalError) as err:
        store.load_run(folder)
    assert str(err.value) == f"{folder}: not a finished clipeval run (scores.csv missing)"
    (folder / store.STATE).mkdir()
    (folder / store.STATE / store.PENDING).write_text("{}")
    with pytest.raises(ClipevalError) as err:
        store.load_run(folder)
    assert str(err.value) == (f"{folder}: not a finished clipeval run (scores.csv missing); "
                              "rerun the command that made it to complete it")


def test_unreadable_and_malformed_files_are_one_line(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ClipevalError, match=r"unreadable run files \(.*\); rerun the command"):
        store.load_run(folder)
    (folder / "manifest.json").write_text(json.dumps({"status": "complete"}))
    (folder / "scores.csv").write_text("prompt_id,sample,seed,prompt,category,challenge\n0,0,0,a,,\n")
    with pytest.raises(ClipevalError) as err:
        store.load_run(folder)
    assert str(err.value) == f"{folder}/scores.csv: missing columns clip_score"
    (folder / "scores.csv").write_text("prompt_id,sample,prompt,clip_score\n0,0,a,0.5\n")
    with pytest.raises(ClipevalError) as err:
        store.load_run(folder)
    assert str(err.value) == f"{folder}/scores.csv: missing columns category, challenge, seed"  # sorted, comma-separated
    (folder / "scores.csv").write_text("prompt_id,sample,seed,prompt,category,challenge,clip_score\n0,0,0,a,,,high\n")
    with pytest.raises(ClipevalError) as err:
        store.load_run(folder)
    assert str(err.value) == f"{folder}/scores.csv: clip_score is not numeric"
    (folder / "scores.csv").write_text("prompt_id,sample,seed,prompt,category,challenge,clip_score\n0,0,0,a,,,0.5\n1,0,1,b,,,\n")
    record = store.load_run(folder)  # no flag, no image column (an early format): both read as empty
    assert record.scores["flag"].tolist() == ["", ""] and record.scores["image"].tolist() == ["", ""]
    assert record.scores["clip_score"].iloc[0] == 0.5 and math.isnan(record.scores["clip_score"].iloc[1])
    assert store.load_run(tmp_path / "run/").path == folder  # a trailing slash is the same folder


def test_a_score_outputs_images_are_where_it_read_them(tmp_path):
    folder = tmp_path / "scored"
    write_set(folder, kind="score", settings={"rescored_from": str(tmp_path / "src")})
    assert store.load_run(folder).image_root == tmp_path / "src"
    write_set(folder, kind="score", settings={}, source={"path": str(tmp_path / "images")})
    assert store.load_run(folder).image_root == tmp_path / "images"
    write_set(folder, kind="run", settings={"rescored_from": "elsewhere"})
    assert store.load_run(folder).image_root == folder


def test_the_journal_keeps_whole_batches_and_seals_a_torn_line(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.path.mkdir()
    rundir.commit([{"prompt_id": 0, "sample": 0, "x": "東京"}, {"prompt_id": 0, "sample": 1}])
    journal = rundir.state / "journal-0.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"rows": [{"prompt_id": 1, "sam')  # a kill in the middle of a write
    rundir.commit([{"prompt_id": 2, "sample": 0}])
    store.RunDir(tmp_path / "run", rank=1).commit([{"prompt_id": 1, "sample": 0}])
    assert rundir.batches() == [[(0, 0), (0, 1)], [(2, 0)], [(1, 0)]]  # rank 0's journal, then rank 1's
    assert sorted(rundir.done()) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert rundir.done()[(0, 0)]["x"] == "東京"
    assert journal.read_bytes().count(b"\n") == 3  # the torn line was closed before the next batch
    rundir.commit([{"prompt_id": 3, "sample": 0}])  # after a whole line: nothing to seal
    assert journal.read_bytes() == ('{"rows": [{"prompt_id": 0, "sample": 0, "x": "東京"}, {"prompt_id": 0, "sample": 1}]}\n'
                                    '{"rows": [{"prompt_id": 1, "sam\n'
                                    '{"rows": [{"prompt_id": 2, "sample": 0}]}\n'
                                    '{"rows": [{"prompt_id": 3, "sample": 0}]}\n').encode()


def test_settings_are_compared_by_value_and_paths_by_place(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "sd-a"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert store.canonical("models/sd-a/") == str(folder) == store.canonical(str(folder))
    assert store.canonical(["./models/sd-a", "org/model"]) == [str(folder), "org/model"]
    assert store.canonical("missing/folder") == "missing/folder" and store.canonical("demo") == "demo"
    assert store.canonical("") == "" and store.canonical(None) is None and store.canonical(3) == 3
    old = {"checkpoint": str(folder), "seed": 0, "steps": 30, "clip_models": ["models/sd-a"]}
    assert store.settings_diff(old, {"checkpoint": "./models/sd-a", "seed": 0, "clip_models": [str(folder)], "new": 1}) == []
    assert store.settings_diff(old, {"seed": 1, "steps": 30}) == ["seed 1 (was 0)"]
    assert store.settings_diff(old, {"checkpoint": "models", "steps": "30"}) == [
        f"checkpoint 'models' (was {str(folder)!r})", "steps '30' (was 30)"]
    rundir = store.RunDir(tmp_path / "out")
    write_set(rundir.path, settings=old)
    assert rundir.check({"seed": 0}, overwrite=False)["settings"] == old
    with pytest.raises(ClipevalError) as err:
        rundir.check({"seed": 1}, overwrite=False)
    assert str(err.value) == (f"{rundir.path} holds a run with other settings (seed 1 (was 0)): use another --out, "
                              "or --overwrite to replace it")
    assert rundir.check({"seed": 1}, overwrite=True) is None


def test_a_folder_with_other_files_is_not_taken(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ClipevalError, match="is not empty and is not a clipeval run folder"):
        store.RunDir(tmp_path / "mine").check({}, overwrite=True)
    assert store.RunDir(tmp_path / "new").check({}, overwrite=False) is None
    (tmp_path / "empty").mkdir()
    assert store.RunDir(tmp_path / "empty").check({}, overwrite=False) is None


def test_clear_removes_only_what_a_run_wrote(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    write_set(rundir.path)
    rundir.commit([{"prompt_id": 0, "sample": 0}])
    rundir.start({"status": "running"})
    rundir.images.mkdir()
    (rundir.images / "00000_00.png").write_bytes(b"png")
    (rundir.images / "mine.png").write_bytes(b"keep")
    (rundir.path / "notes.txt").write_text("keep")
    rundir.clear()
    left = sorted(str(p.relative_to(rundir.path)) for p in rundir.path.rglob("*") if p.is_file())
    assert left == ["images/mine.png", "notes.txt"]
    assert os.listdir(rundir.state) == []


def test_a_live_run_holds_the_folder_and_a_released_one_does_not(tmp_path):
    first, second = store.RunDir(tmp_path / "run"), store.RunDir(tmp_path / "run")
    first.state.mkdir(parents=True)
    (first.state / "lock").write_text("4194304999 (a dead run's longer pid)")
    first.lock()
    assert (first.state / "lock").read_text() == str(os.getpid())
    with pytest.raises(ClipevalError) as err:
        second.lock()
    assert str(err.value) == (f"{first.path} is in use by a running clipeval (pid {os.getpid()}); wait for it to finish")
    first.release()
    first.release()  # twice is harmless
    second.lock()  # free again: taken, and its pid written over the old one
    assert (second.state / "lock").read_text() == str(os.getpid())
    second.release()


def test_claim_checks_again_under_the_lock_and_lets_go_when_it_refuses(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    write_set(rundir.path, settings={"seed": 0})
    previous = rundir.claim({"seed": 0}, overwrite=False)
    assert previous["settings"] == {"seed": 0} and (rundir.path / "scores.csv").exists()  # kept: it resumes
    rundir.release()
    with pytest.raises(ClipevalError, match="holds a run with other settings"):
        rundir.claim({"seed": 1}, overwrite=False)
    other = store.RunDir(tmp_path / "run")
    other.lock()  # the refused claim released its lock
    other.release()
    assert rundir.claim({"seed": 1}, overwrite=True) is None
    assert not (rundir.path / "scores.csv").exists()  # --overwrite cleared the previous run
    rundir.release()


def test_stale_temp_files_and_failure_notes_are_removed_only_when_claimed(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.images.mkdir(parents=True)
    rundir.state.mkdir()
    stale = [rundir.path / ".scores.csv.abc.tmp", rundir.images / ".00000_00.png.x.tmp", rundir.state / ".run.json.y.tmp",
             rundir.state / "failed-1"]
    kept = [rundir.path / "scores.tmp", rundir.images / "00000_00.png", rundir.state / "journal-0.jsonl"]
    for path in stale + kept:
        path.write_bytes(b"x")
    rundir.signal_failure("rank 1 failed")
    assert rundir.peer_failed()
    assert rundir.check({}, overwrite=False) is None and all(p.exists() for p in stale)  # a check only reads
    rundir.claim({}, overwrite=False)
    rundir.release()
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert not rundir.peer_failed()


def test_a_failure_note_is_one_file_per_rank_and_no_note_is_no_failure(tmp_path):
    rundir = store.RunDir(tmp_path / "run", rank=3)
    assert not rundir.peer_failed()  # no state folder yet
    rundir.state.mkdir(parents=True)
    assert not rundir.peer_failed()
    rundir.signal_failure("out of memory")
    assert (rundir.state / "failed-3").read_text() == "out of memory"
    assert store.RunDir(tmp_path / "run").peer_failed()  # rank 0 sees it


def test_the_manifest_in_progress_wins_and_finishing_forgets_it(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    assert rundir.manifest() is None
    write_set(rundir.path, settings={"seed": 0})
    assert rundir.manifest()["status"] == "complete"
    rundir.start({"status": "running", "settings": {"seed": 0}})
    assert json.loads((rundir.state / "run.json").read_text())["status"] == "running"
    assert rundir.manifest()["status"] == "running"  # an unfinished extension of a finished run
    assert store.load_run(rundir.path).manifest["status"] == "complete"  # readers still see the old set
    scores = scores_frame(2)
    manifest = rundir.finish(scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                             manifest={"status": "complete", "settings": {"seed": 0}, "n": 2})
    assert not (rundir.state / "run.json").exists()
    assert rundir.manifest() == manifest == json.loads((rundir.path / "manifest.json").read_text())
    (rundir.state / "run.json").write_text("{not json")
    with pytest.raises(ClipevalError) as err:
        rundir.manifest()
    assert str(err.value).startswith(f"{rundir.state / 'run.json'} is unreadable (") and err.value.args[0].endswith("); use --overwrite")


def test_images_are_written_whole_under_their_name(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.images.mkdir(parents=True)
    rundir.save_image("00001_02.png", b"\x89PNG bytes")
    assert (rundir.images / "00001_02.png").read_bytes() == b"\x89PNG bytes"
    assert [p.name for p in rundir.images.iterdir()] == ["00001_02.png"]  # no temp file left
    assert store.image_name(1, 2) == "00001_02.png" and store.image_name(123456, 7) == "123456_07.png"


def test_a_run_folder_and_its_state_are_made_with_their_parents(tmp_path):
    deep = store.RunDir(tmp_path / "a" / "b" / "run")
    deep.claim({"seed": 0}, overwrite=False)
    deep.release()
    assert deep.state.is_dir()
    locked = store.RunDir(tmp_path / "c" / "d" / "run")
    locked.lock()
    locked.release()
    started = store.RunDir(tmp_path / "e" / "f" / "run")
    started.start({"status": "running"})
    assert json.loads((started.state / "run.json").read_text()) == {"status": "running"}
    store.RunDir(tmp_path / "g").release()  # never locked: nothing to let go


def test_the_lock_file_is_readable_by_others_and_an_empty_one_names_no_pid(tmp_path):
    old = os.umask(0o022)
    try:
        first = store.RunDir(tmp_path / "run")
        first.lock()
    finally:
        os.umask(old)
    assert (first.state / "lock").stat().st_mode & 0o777 == 0o644
    os.truncate(first.state / "lock", 0)  # a holder that has not written its pid yet
    with pytest.raises(ClipevalError, match=r"is in use by a running clipeval \(pid another process\)"):
        store.RunDir(tmp_path / "run").lock()
    first.release()


def test_the_journal_is_utf8_json_and_refuses_nan(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.path.mkdir()
    rundir.commit([{"prompt_id": 0, "sample": 0, "prompt": "東京 🐱"}])
    assert "東京 🐱".encode() in (rundir.state / "journal-0.jsonl").read_bytes()  # not \\u escapes
    with pytest.raises(ValueError):
        rundir.commit([{"prompt_id": 1, "sample": 0, "clip_score": math.nan}])  # a NaN score is None, never NaN
    assert rundir.batches() == [[(0, 0)]]
    (rundir.state / "journal-1.jsonl").mkdir()  # a journal that cannot be opened
    with pytest.raises(ClipevalError) as err:
        store.RunDir(tmp_path / "run", rank=1).commit([{"prompt_id": 2, "sample": 0}])
    assert str(err.value).startswith(f"cannot write {rundir.state / 'journal-1.jsonl'}: ")
    assert str(err.value).endswith("files written before are intact: fix it, then rerun the same command to resume")


def test_settings_differences_are_all_named_and_a_manifest_without_settings_has_none(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    write_set(rundir.path, settings={"seed": 0, "steps": 30})
    with pytest.raises(ClipevalError) as err:
        rundir.check({"seed": 1, "steps": 20}, overwrite=False)
    assert "(seed 1 (was 0); steps 20 (was 30))" in str(err.value)
    bare = store.RunDir(tmp_path / "bare")
    bare.start({"status": "running"})  # a manifest in progress without settings
    assert bare.check({"seed": 5}, overwrite=False) == {"status": "running"}


def test_clearing_and_finishing_a_folder_that_holds_little_is_fine(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.path.mkdir()
    rundir.clear()  # no result files, no state folder, no images
    scores = scores_frame(2)
    rundir.finish(scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                  manifest={"status": "complete"})  # finished without a manifest in progress
    assert store.load_run(rundir.path).manifest["status"] == "complete"


def test_the_output_folder_is_probed_where_the_run_will_write(tmp_path):
    """check_parent, before any model loads: a file in the way, an unwritable place (a real probe,
    so root is refused too), the folder itself when it exists and not its parent."""
    import subprocess

    (tmp_path / "file").write_text("x")
    with pytest.raises(ClipevalError) as err:
        store.check_parent(tmp_path / "file")
    assert str(err.value) == f"--out {tmp_path / 'file'}: exists and is not a folder"
    with pytest.raises(ClipevalError) as err:
        store.check_parent(Path("/proc/clipeval/run"))
    assert str(err.value).startswith("--out /proc/clipeval/run: /proc is not writable (") and str(err.value).endswith(")")
    store.check_parent(tmp_path / "deep" / "er" / "run")  # its first existing parent is written to
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(ClipevalError) as err:
            store.check_parent(frozen)
        assert str(err.value).startswith(f"--out {frozen}: {frozen} is not writable (")
        store.check_parent(frozen.parent / "beside")  # its parent is writable
    finally:
        subprocess.run(["chattr", "-i", str(frozen)])


def test_a_state_folder_that_cannot_be_made_names_its_path(tmp_path):
    rundir = store.RunDir(tmp_path / "run")
    rundir.path.mkdir()
    rundir.state.write_text("a file where the state folder goes")
    for call, named in ((lambda: rundir.start({"status": "running"}), rundir.state),
                        (lambda: rundir.commit([{"prompt_id": 0, "sample": 0}]), rundir.state / "journal-0.jsonl")):
        with pytest.raises(ClipevalError) as err:
            call()
        assert str(err.value).startswith(f"cannot write {named}: ")


def test_every_setting_is_compared_after_one_the_old_run_did_not_have(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "sd-a"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # A setting added since the old run was made is passed over; the ones after it are still compared.
    assert store.settings_diff({"seed": 0}, {"scheduler": "euler", "seed": 1}) == ["seed 1 (was 0)"]
    # Only settings that name a place are compared by place: text that happens to name a folder is text.
    assert store.settings_diff({"negative_prompt": "models/sd-a"}, {"negative_prompt": "./models/sd-a"}) == [
        "negative_prompt './models/sd-a' (was 'models/sd-a')"]


def test_demo_is_the_embedded_demo_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert store.canonical("demo") == "demo" and store.canonical("./demo") == str(tmp_path / "demo")


def test_result_files_get_the_users_umask_and_a_failed_write_is_one_line_leaving_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        write_set(tmp_path / "run")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes == dict.fromkeys(["scores.csv", "prompts.csv", "summary.json", "manifest.json"], 0o644)
    target = tmp_path / "run" / "taken"
    target.mkdir()  # the rename fails after the temp file was written
    with pytest.raises(ClipevalError) as err:
        store.write_atomic(target, b"data")
    assert str(err.value).startswith(f"cannot write {target}: ")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_summary_that_cannot_be_removed_names_its_path(tmp_path):
    folder = tmp_path / "run"
    (folder / "summary.json").mkdir(parents=True)  # in the way of a set without usable images
    with pytest.raises(ClipevalError) as err:
        store.write_results(folder, scores=scores_frame(), prompts=stats.prompts_table(scores_frame()), summary=None,
                            manifest={"status": "complete"})
    assert str(err.value).startswith(f"cannot write {folder / 'summary.json'}: ")


def test_text_that_looks_like_numbers_stays_text_and_a_missing_score_of_any_scorer_is_nan(tmp_path):
    scores = scores_frame().assign(prompt=lambda f: [f"{1984 + p}" for p in f["prompt_id"]], category="3", challenge="007",
                                   flag="")
    scores["score:my vqa"] = [0.5, float("nan")] + [0.75] * (len(scores) - 2)
    scores["truncated:my vqa"] = False
    write_set(tmp_path / "run", scores)
    back = store.load_run(tmp_path / "run").scores
    assert back["prompt"].tolist() == [f"{1984 + p}" for p in scores["prompt_id"]]
    assert back["category"].tolist() == ["3"] * len(scores) and back["challenge"].tolist() == ["007"] * len(scores)
    assert back["score:my vqa"].dtype == float and math.isnan(back["score:my vqa"][1])
    assert back["score:my vqa"].drop(index=1).tolist() == scores["score:my vqa"].drop(index=1).tolist()
