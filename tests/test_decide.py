"""The Decider between the journal and the sequence: which prompts are deltas, which are skipped,
when the run stops, and when a baseline is too short, on journals written by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipeval import decide, sequential


def _decider(order, base_prompts, base_scores, margin=0.005):
    d = decide.Decider(list(order), 1, margin, "betting", Path("base"))
    d.base = {p: {0: s} for p, s in base_scores.items()}
    d.base_prompts = set(base_prompts)
    return d


def _done(scores: dict[int, float], flagged=()):
    return {(p, 0): {"clip_score": s, "flag": "nan" if p in flagged else ""} for p, s in scores.items()}


def test_a_prompt_without_a_usable_pair_is_skipped_not_counted_as_zero():
    """An unusable image on either side leaves its prompt out of the sequence, as compare leaves it
    out: the block's mean is the paired prompts' and the verdicts are those of the paired deltas in a
    library one smaller."""
    rng = np.random.default_rng(0)
    order = list(range(120))
    base = {p: 0.3 for p in order}
    ours = {p: 0.3 - 0.02 + 0.01 * float(rng.standard_normal()) for p in order[:100]}
    decider = _decider(order, order, {p: s for p, s in base.items() if p != 2})  # the baseline's image 2 unusable
    done = _done(ours, flagged={5})  # and our image 5
    deltas = decider.deltas(done)
    assert len(deltas) == 100 and deltas[2] is None and deltas[5] is None
    block = decider.sequential_block(done, Path("out"))
    paired = [ours[p] - 0.3 for p in order[:100] if p not in (2, 5)]
    assert block["unpaired_prompts"] == 2 and block["decided"] and block["verdict"] == "worse"
    used = block["prompts_used"]
    assert block["mean_delta"] == pytest.approx(float(np.mean([ours[p] - 0.3 for p in order[:used] if p not in (2, 5)])))
    assert block["prompts_generated"] == 100 and block["prompts_saved"] == 20
    counted = sequential.summarize([0.0 if v is None else v for v in deltas], 120, 0.005)
    assert counted["mean_delta"] != block["mean_delta"]
    assert sequential.decisions(deltas, 120, 0.005)[6:] == sequential.decisions(paired, 118, 0.005)[4:]


def test_a_baseline_one_prompt_too_short_stops_the_run_and_says_so():
    """A baseline that lacks the last prompt of the order: after every other prompt, undecided (all
    deltas 0 at margin 0), the run must stop and say the baseline is too short; one that holds the
    whole library ends undecided with no error."""
    order = list(range(30))
    done = _done({p: 0.3 for p in order[:29]})
    short = _decider(order, order[:29], {p: 0.3 for p in order[:29]}, margin=0.0)
    assert short.should_stop(done)
    block = short.sequential_block(done, Path("out"))
    assert block["verdict"] == "undecided" and block["prompts_used"] == 29
    with pytest.raises(decide.BaselineTooShort, match=r"holds 29 prompts of the seeded order") as err:
        short.check_reached(done, block)
    assert err.value.prompts == 29
    whole = _decider(order, order, {p: 0.3 for p in order}, margin=0.0)
    assert not whole.should_stop(done)  # the 30th prompt is still to come, and the baseline has it
    full = _done({p: 0.3 for p in order})
    whole.check_reached(full, whole.sequential_block(full, Path("out")))  # nothing raised


def test_the_rule_follows_the_deciding_scorers_kind_unless_a_bound_is_given():
    d = decide.Decider([1, 2], 1, 0.005, "betting", None)
    assert d.rule == sequential.Rule()
    d.kind = "vqa"
    assert d.rule.bound == 1.0
    d.bound = 0.1
    assert d.rule.bound == 0.1
