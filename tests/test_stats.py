"""summary.json's and prompts.csv's numbers against a from-scratch computation on a scores table
built to separate the rules: flagged and unscored images, a prompt with no usable image, groups
above and below the few-prompts threshold, unlabelled rows, truncated prompts, values whose
rounding shows."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from clipeval import stats


def _scores() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    rows = []
    for p in range(24):
        for s in range(3):
            rows.append({"prompt_id": p, "sample": s, "seed": p * 4096 + s, "prompt": f"p{p}",
                         "category": "big" if p < 14 else ("small" if p < 20 else ""),
                         "challenge": "hard" if p % 3 == 0 else "",
                         "clip_score": float(np.float32(0.25 + 0.05 * rng.standard_normal())),
                         "truncated": p in (3, 4), "image": f"images/{p:05d}_{s:02d}.png", "flag": ""})
    frame = pd.DataFrame(rows)
    frame.loc[(frame["prompt_id"] == 1) & (frame["sample"] == 2), "flag"] = "nsfw"
    frame.loc[(frame["prompt_id"] == 2) & (frame["sample"] == 0), ["flag", "clip_score"]] = ["nan", None]
    frame.loc[(frame["prompt_id"] == 2) & (frame["sample"] == 1), "flag"] = "black"
    frame.loc[(frame["prompt_id"] == 5) & (frame["sample"] == 1), "clip_score"] = None  # unscored, unflagged
    frame.loc[frame["prompt_id"] == 3, "flag"] = "nsfw"  # prompt 3: no usable image at all (and truncated)
    return frame.sample(frac=1, random_state=3)  # rows arrive in any order (ranks, resumes)


@pytest.fixture(scope="module")
def table():
    return stats.scores_table(_scores().to_dict("records"))


def _scipy_ci(sums, counts, *, resamples: int, seed: int, method: str = "BCa"):
    """The reference: scipy's own bootstrap of the ratio of sums, resampling prompts, as its users call it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sps.bootstrap((np.asarray(sums), np.asarray(counts, float)), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis),
                             paired=True, vectorized=True, n_resamples=resamples, batch=1000, method=method,
                             rng=np.random.default_rng(seed)).confidence_interval


def _ci(part: pd.DataFrame) -> list[float] | None:
    per = part.groupby("prompt_id")["clip_score"].agg(["sum", "size"])
    if len(per) < 2:
        return None
    if np.ptp(per["sum"] / per["size"]) <= 1e-12:
        return [per["sum"].sum() / per["size"].sum()] * 2
    result = _scipy_ci(per["sum"].to_numpy(), per["size"].to_numpy(), resamples=2000, seed=0)
    return [result.low, result.high]


def test_the_scores_table_is_in_prompt_and_sample_order_with_its_columns(table):
    assert list(table.columns) == stats.SCORE_COLUMNS
    keys = list(zip(table["prompt_id"], table["sample"]))
    assert keys == sorted(keys) and len(keys) == 72 and list(table.index) == list(range(72))
    assert table["flag"].isna().sum() == 0


def test_usable_leaves_out_flagged_and_unscored_images(table):
    good = stats.usable(table)
    assert len(good) == 72 - 3 - 3 - 1  # three flagged, prompt 3's three, one unscored
    assert good["clip_score"].notna().all() and (good["flag"] == "").all() and 3 not in set(good["prompt_id"])
    assert len(stats.usable(table.drop(columns="flag"))) == 70  # without a flag column only unscored rows drop


def test_summary_equals_the_reference(table):
    boot = stats.Bootstrap(resamples=2000)
    summary = stats.summarize(table, boot)
    good = table[(table["flag"] == "") & table["clip_score"].notna()]
    values = good["clip_score"]
    assert summary["clip/mean"] == pytest.approx(values.mean(), abs=1e-10)
    assert summary["clip/std"] == pytest.approx(np.std(values, ddof=1), abs=1e-10)
    assert summary["clip/median"] == pytest.approx(np.median(values), abs=1e-10)
    assert (summary["clip/min"], summary["clip/max"]) == pytest.approx((values.min(), values.max()), abs=1e-10)
    assert summary["clip/mean_ci"] == pytest.approx(_ci(good), abs=1e-9)
    assert summary["images"] == len(good) == 65 and summary["prompts"] == 23
    assert summary["flagged_images"] == {"black": 1, "nan": 1, "nsfw": 4, "unscored": 1}
    assert summary["truncated_prompts"] == 1  # prompts 3 and 4 are truncated; 3 has no usable image
    assert summary["few_prompts"] is False and summary["few_prompts_threshold"] == 10
    assert summary["ci"] == {"level": 0.95, "method": "BCa bootstrap over prompts (scipy.stats.bootstrap; percentile "
                             "where BCa is undefined)", "resamples": 2000, "seed": 0}
    assert summary["scale"] == "cosine" and summary["std_kind"] == "sample standard deviation over images (ddof=1)"
    assert summary["flags"] == stats.FLAGS
    for column, key in (("category", "by_category"), ("challenge", "by_challenge")):
        labelled = good[good[column] != ""]
        expected = {}
        for label, part in labelled.groupby(column):
            prompts = part["prompt_id"].nunique()
            expected[label] = {"mean": part["clip_score"].mean(), "std": np.std(part["clip_score"], ddof=1),
                               "n": len(part), "prompts": prompts, "few_prompts": prompts < 10, "ci": _ci(part)}
        assert set(summary[key]) == set(expected), key
        for label, want in expected.items():
            got = summary[key][label]
            assert (got["n"], got["prompts"], got["few_prompts"]) == (want["n"], want["prompts"], want["few_prompts"])
            assert got["mean"] == pytest.approx(want["mean"], abs=1e-10) and got["std"] == pytest.approx(want["std"], abs=1e-10)
            assert got["ci"] == pytest.approx(want["ci"], abs=1e-9)
    assert summary["by_category"]["big"]["few_prompts"] is False and summary["by_category"]["small"]["few_prompts"] is True


def test_few_prompts_at_the_threshold():
    rows = [{"prompt_id": p, "sample": 0, "seed": p, "prompt": "x", "category": "", "challenge": "",
             "clip_score": 0.2 + 0.01 * p, "truncated": False, "image": "", "flag": ""} for p in range(10)]
    assert stats.summarize(stats.scores_table(rows), stats.Bootstrap(resamples=200))["few_prompts"] is False
    assert stats.summarize(stats.scores_table(rows[:9]), stats.Bootstrap(resamples=200))["few_prompts"] is True


def test_a_run_with_no_usable_image_is_one_line_with_the_flags():
    from clipeval.errors import ClipevalError

    rows = [{"prompt_id": p, "sample": 0, "seed": p, "prompt": "x", "category": "", "challenge": "",
             "clip_score": None if p == 0 else 0.2, "truncated": False, "image": "", "flag": "nan" if p == 0 else "black"}
            for p in range(3)]
    with pytest.raises(ClipevalError) as err:
        stats.summarize(stats.scores_table(rows))
    assert str(err.value) == "no usable image: all 3 are flagged (black: 2, nan: 1); see scores.csv"


def test_the_prompts_table_equals_the_reference(table):
    prompts = stats.prompts_table(table)
    assert list(prompts.columns) == stats.PROMPT_COLUMNS and prompts["prompt_id"].tolist() == list(range(24))
    good = table[(table["flag"] == "") & table["clip_score"].notna()]
    for _, row in prompts.iterrows():
        mine = good[good["prompt_id"] == row["prompt_id"]]["clip_score"]
        first = table[table["prompt_id"] == row["prompt_id"]].iloc[0]
        assert (row["prompt"], row["category"], row["challenge"]) == (first["prompt"], first["category"], first["challenge"])
        assert row["n"] == len(mine)
        if len(mine):
            assert [row["clip_mean"], row["clip_min"], row["clip_max"]] == pytest.approx(
                [mine.mean(), mine.min(), mine.max()], abs=1e-10)
        else:
            assert pd.isna(row["clip_mean"]) and pd.isna(row["clip_min"]) and pd.isna(row["clip_max"])
    assert prompts.loc[prompts["prompt_id"] == 3, "n"].item() == 0
    named = stats.prompts_table(table, names={p: f"n{p}" for p in range(24)})
    assert list(named.columns) == ["prompt_id", "name", *stats.PROMPT_COLUMNS[1:]] and named["name"].iloc[5] == "n5"
    assert list(stats.prompts_table(table, names={p: "" for p in range(24)}).columns) == stats.PROMPT_COLUMNS


def test_rounding_keeps_ten_significant_digits_and_float32_scores_their_shortest_form():
    assert stats.rounded(0.123456789012345) == 0.123456789
    assert stats.rounded(1234.56789012345) == 1234.56789
    assert stats.rounded(float("nan")) is None
    assert stats.score_value(np.float32(0.1)) == 0.1 and stats.score_value(0.30000001192092896) == 0.3
    assert stats.score_value(0.123456789) == 0.12345679  # the float32 nearest, in its shortest decimal


def test_power_analysis_below_two_prompts_is_none_and_needs_at_least_two():
    assert stats.power_analysis([0.01]) is None
    power = stats.power_analysis([0.5, -0.5, 0.5, -0.5])  # a huge spread: thousands needed
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    sd = np.std([0.5, -0.5, 0.5, -0.5], ddof=1)
    assert power == {"alpha": 0.05, "power": 0.8, "prompts": 4, "prompt_delta_sd": pytest.approx(sd),
                     "mde": pytest.approx(z * sd / 2), "prompts_needed": {"0.005": math.ceil((z * sd / 0.005) ** 2),
                                                                          "0.01": math.ceil((z * sd / 0.01) ** 2)}}
    two = stats.power_analysis([0.01, 0.03])  # two prompts are enough to have a spread
    assert two["prompts"] == 2 and two["prompt_delta_sd"] == pytest.approx(np.std([0.01, 0.03], ddof=1))
    tiny = stats.power_analysis([0.01, 0.0100001, 0.0099999])
    assert tiny["prompts_needed"] == {"0.005": 2, "0.01": 2}  # a paired test needs two prompts at least


def test_the_interval_falls_back_to_the_percentile_where_bca_is_undefined():
    """Nine resamples of three prompts, seed 28: the point estimate (0.225) is the largest resample, so BCa's
    bias correction is infinite and scipy returns NaN (the premise is checked). The percentile interval of the
    same resamples stands in, and neither of scipy's warnings reaches the user."""
    sums, counts = np.array([0.2, 0.4, 0.3]), np.array([1.0, 1.0, 2.0])

    bca = _scipy_ci(sums, counts, resamples=9, seed=28)
    assert np.isnan(bca.low) and np.isnan(bca.high)
    want = _scipy_ci(sums, counts, resamples=9, seed=28, method="percentile")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = stats.weighted_mean_ci(sums, counts, stats.Bootstrap(resamples=9, seed=28))
    assert got == pytest.approx((want.low, want.high), abs=1e-12)
    assert got == pytest.approx((0.152, 0.225), abs=1e-12)


def test_a_wider_level_widens_the_interval():
    wide = stats.weighted_mean_ci(np.array([0.2, 0.3, 0.5, 0.1]), np.ones(4), stats.Bootstrap(confidence=0.99, resamples=1000))
    narrow = stats.weighted_mean_ci(np.array([0.2, 0.3, 0.5, 0.1]), np.ones(4), stats.Bootstrap(confidence=0.8, resamples=1000))
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def _frame(prompts: int, truncated=(), category=lambda p: "") -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": p, "sample": 0, "seed": p, "prompt": f"p{p}", "category": category(p), "challenge": "",
                          "clip_score": 0.3 + 0.01 * ((p * 7) % 5), "truncated": p in truncated, "image": "", "flag": ""}
                         for p in range(prompts)])


def test_a_group_of_exactly_ten_prompts_is_not_few_and_one_prompt_has_no_interval():
    summary = stats.summarize(_frame(11, category=lambda p: "ten" if p < 10 else "one"))
    assert summary["score"] == stats.SCORE_DEFINITION and summary["scale"] == "cosine"
    assert summary["by_category"]["ten"]["few_prompts"] is False and summary["by_category"]["ten"]["prompts"] == 10
    assert summary["by_category"]["one"]["ci"] is None and summary["by_category"]["one"]["few_prompts"] is True
    assert stats.summarize(_frame(1))["clip/mean_ci"] is None


def test_truncated_prompts_counts_the_prompts_whose_text_was_cut():
    assert stats.summarize(_frame(6, truncated={2, 3, 5}))["truncated_prompts"] == 3


def test_scores_without_a_flag_column_count_nothing_flagged():
    """Scores a caller built without flags (the library API): every image counts, none is flagged."""
    summary = stats.summarize(_frame(4).drop(columns="flag"))
    assert summary["images"] == 4 and summary["flagged_images"] == {}


def test_a_journal_row_counts_only_with_a_score_and_no_flag():
    """What --until-decided counts as a usable image, row by row."""
    assert stats.usable_row({"clip_score": 0.31, "flag": ""})
    assert stats.usable_row({"clip_score": -0.2})  # no flag key: an older journal
    assert not stats.usable_row({"clip_score": None, "flag": ""})
    assert not stats.usable_row({"clip_score": math.nan, "flag": ""})
    assert not stats.usable_row({"flag": ""})
    assert not stats.usable_row({"clip_score": 0.31, "flag": "black"})
    assert stats.usable_row({"clip_score": 0.0, "flag": None})  # a zero score is a score


def test_the_prompts_tables_image_count_is_an_integer_column(table):
    prompts = stats.prompts_table(table)
    assert prompts["n"].dtype.kind == "i" and "." not in "".join(prompts["n"].astype(str))  # prompts.csv says 2, not 2.0


def test_two_prompts_have_an_interval_and_one_has_none():
    """The README's "None below two prompts": two prompts with different means are resampled as any
    library is (scipy's BCa on the same resamples), one prompt has no interval."""
    sums, counts = np.array([0.4, 0.9]), np.array([2.0, 3.0])
    want = _scipy_ci(sums, counts, resamples=1000, seed=0)
    got = stats.weighted_mean_ci(sums, counts, stats.Bootstrap(resamples=1000, seed=0))
    # Two prompts: every resample is one prompt twice (0.2), the other twice (0.3) or both (0.26).
    assert got == pytest.approx((want.low, want.high), abs=1e-12) == (0.2, 0.3)
    assert stats.weighted_mean_ci(np.array([0.4]), np.array([2.0])) is None


def test_prompts_with_different_means_are_resampled_even_where_sums_times_counts_tie():
    """A prompt with one usable image at 0.5 and one with two at 0.125 each: their means differ, so the
    interval is the bootstrap's (scipy's BCa on the same resamples), never the point; a shortcut that
    looked at score sums times image counts (both 0.5) would call them equal."""
    sums, counts = np.array([0.5, 0.25]), np.array([1.0, 2.0])
    want = _scipy_ci(sums, counts, resamples=1000, seed=0)
    got = stats.weighted_mean_ci(sums, counts, stats.Bootstrap(resamples=1000, seed=0))
    assert got == pytest.approx((want.low, want.high), abs=1e-12) and got[0] < 0.25 < got[1]


def test_a_spread_of_float_rounding_is_no_spread_up_to_1e_12_inclusive():
    """Means 1e-12 apart (the threshold itself) are one value: the interval is the point; beyond
    it, the resampled interval."""
    assert np.ptp(np.array([0.0, 1e-12])) == 1e-12  # exactly the threshold, no rounding in between
    assert stats.weighted_mean_ci(np.array([0.0, 1e-12]), np.ones(2)) == (5e-13, 5e-13)
    spread = stats.weighted_mean_ci(np.array([0.0, 1e-9]), np.ones(2))
    assert spread[0] < spread[1]


@pytest.mark.filterwarnings("error")
def test_a_missing_flag_is_a_clean_image_in_the_table_and_the_summary():
    """An older journal's rows have no flag key, and a training loop's own frame may hold None: either is
    an unflagged image, as `usable_row` reads one row; an image without a score is counted 'unscored'."""
    # (warnings are errors here: pandas warns, and will refuse, filling a float column of NaN with text)
    rows = _frame(4).drop(columns="flag").to_dict("records")
    table = stats.scores_table(rows)
    assert table["flag"].tolist() == ["", "", "", ""]  # scores.csv's flag column, filled
    summary = stats.summarize(table)
    assert summary["images"] == 4 and summary["flagged_images"] == {}
    for missing in (None, math.nan):
        frame = _frame(4).assign(flag=missing)
        frame.loc[2, "clip_score"] = math.nan
        summary = stats.summarize(frame, stats.Bootstrap(resamples=200))
        assert summary["images"] == 3 and summary["prompts"] == 3 and summary["flagged_images"] == {"unscored": 1}


def test_a_prompt_the_names_leave_out_has_an_empty_name(table):
    """prompts.csv's name column for a {name: prompt} library; a caller's names that cover only some
    prompts leave the others' names empty, never NaN or a placeholder."""
    names = stats.prompts_table(table, {0: "first", 7: "seventh"}).set_index("prompt_id")["name"]
    assert names[0] == "first" and names[7] == "seventh"
    assert (names.drop([0, 7]) == "").all() and len(names) == 24
