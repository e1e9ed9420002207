"""VQAScore against the independent reference on the same model: the model's own
``generate(max_new_tokens=1, output_scores=True)`` on one image and question, softmax at the "Yes"
token. Two families (LLaVA, SmolVLM/Idefics3), tiny and random, saved and loaded through
``AutoModelForImageTextToText`` and ``AutoProcessor``; their answer rows spread P("Yes") so a
swapped image or prompt shows."""

from __future__ import annotations

import json

import pytest
import tiny_vlms
import torch

from clipeval.errors import ClipevalError
from clipeval.vqa import QUESTION, VqaScorer

PROMPTS = ["a cat", "a photo of a red cube on the table with a blue sky at night and a dog", "stop",
           'a sign saying "stop" 🐱 东京', "a\ttab and 'quotes'"]


@pytest.fixture(scope="module", params=["llava", "smolvlm"])
def family(request, vlms):
    return request.param, vlms[request.param], VqaScorer(str(vlms[request.param]), name=request.param)


def images(n: int, height: int = 48, width: int = 64, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, height, width, generator=g) * 255).to(torch.uint8)


def reference(path, prompt: str, image: torch.Tensor) -> float:
    """The plain way: the processor on one image and question, then generate one token."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(prompt)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[image.permute(1, 2, 0).numpy()]], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, do_sample=False)
    return float(out.scores[0][0].float().softmax(-1)[processor.tokenizer.convert_tokens_to_ids("Yes")])


def test_each_score_equals_generates_probability_of_yes(family):
    """A batch of mixed prompt lengths (left padded) scores what each image scores alone."""
    _, path, scorer = family
    batch = images(len(PROMPTS))
    scores, truncated = scorer.score(batch, PROMPTS)
    expected = [reference(path, p, img) for p, img in zip(PROMPTS, batch)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert truncated == [False] * len(PROMPTS)
    assert all(0 < s < 1 for s in scores) and max(scores) - min(scores) > 0.05  # spread: a swap would show
    alone = [scorer.score(img[None], [p])[0][0] for p, img in zip(PROMPTS, batch)]
    assert scores == pytest.approx(alone, abs=1e-6)


def test_a_swapped_image_or_prompt_changes_the_score(family):
    _, _, scorer = family
    batch = images(2)
    straight, _ = scorer.score(batch, PROMPTS[:2])
    swapped, _ = scorer.score(batch.flip(0), PROMPTS[:2])
    assert abs(straight[0] - swapped[0]) > 1e-3 and abs(straight[1] - swapped[1]) > 1e-3
    other, _ = scorer.score(batch, PROMPTS[2:4])
    assert abs(straight[0] - other[0]) > 1e-3


def test_images_of_any_size_are_taken_at_the_models_resolution(family):
    _, path, scorer = family
    small, large = images(1, 20, 36, seed=1)[0], images(1, 96, 80, seed=2)[0]
    scores, _ = scorer.score([small, large], PROMPTS[:2])
    assert scores == pytest.approx([reference(path, PROMPTS[0], small), reference(path, PROMPTS[1], large)], abs=1e-5)


def test_a_prompt_beyond_the_models_positions_is_cut_and_flagged(family):
    _, _, scorer = family
    long = " ".join(["cat"] * (scorer.max_length + 50))
    scores, truncated = scorer.score(images(2), [long, "a cat"])
    assert truncated == [True, False] and 0 < scores[0] < 1
    assert scorer.questions([long])[0].text.count("cat") < scorer.max_length


def test_the_manifest_records_question_and_answer_token(family):
    name, _, scorer = family
    described = scorer.describe()
    assert described["question"] == QUESTION and described["answer"] == "Yes" and described["answer_token"] == "Yes"
    assert scorer.model_class == {"llava": "LlavaForConditionalGeneration", "smolvlm": "Idefics3ForConditionalGeneration"}[name]


def test_not_a_vision_language_model_is_one_line(models):
    with pytest.raises(ClipevalError) as err:
        VqaScorer(str(models.clip), name="tiny-clip")
    assert str(err.value).startswith("tiny-clip is a clip model, not a vision-language model that AutoModelForImageTextToText loads")


def test_a_model_that_needs_remote_code_is_refused(vlms, tmp_path):
    folder = tiny_vlms.needing_remote_code(vlms["llava"], tmp_path / "remote")
    with pytest.raises(ClipevalError) as err:
        VqaScorer(str(folder), name="remote")
    assert "needs remote code" in str(err.value) and "never runs" in str(err.value)


def test_a_processor_without_a_chat_template_is_refused(vlms, tmp_path):
    folder = tiny_vlms.without_chat_template(vlms["llava"], tmp_path / "no-template")
    with pytest.raises(ClipevalError) as err:
        VqaScorer(str(folder), name="plain")
    assert str(err.value) == ("plain: its processor has no chat template, so clipeval cannot ask it a question as the "
                              "model was trained to be asked")


def test_an_answer_that_is_not_one_token_is_refused(family):
    from clipeval.vqa import answer_token

    _, _, scorer = family
    with pytest.raises(ClipevalError) as err:
        answer_token(scorer.processor, scorer._chat("a cat"), "Yes indeed", "m")
    assert str(err.value).startswith("m: its tokenizer has no single token for the answer 'Yes indeed' after its chat template")


def test_the_question_is_cut_to_exactly_what_fits(family):
    """The word-level tokenizers make one token of each "cat": the cut keeps exactly the budget."""
    _, _, scorer = family
    budget = scorer.max_length - scorer._overhead
    assert budget > 10
    # The template's quotes tokenize as one piece ('""?') around an empty prompt and as two ('"', '"?')
    # around a real one: budget - 1 words is what exactly fits with the image and the answer's position.
    fits, over, far = (" ".join(["cat"] * n) for n in (budget - 1, budget, budget + 40))
    kept, cut, long = scorer.questions([fits, over, far])
    assert (kept.truncated, cut.truncated, long.truncated) == (False, True, True)
    assert kept.text == cut.text == long.text == scorer._chat(fits)
    inputs = scorer.processor(text=[kept.text], images=[[images(1)[0].permute(1, 2, 0).numpy()]], return_tensors="pt")
    assert inputs["input_ids"].shape[-1] + 1 == scorer.max_length
    assert not scorer.questions([" ".join(["cat"] * (budget - 9))])[0].truncated


def test_half_precision_weights_and_inputs(vlms):
    import torch

    full = VqaScorer(str(vlms["llava"]))
    half = VqaScorer(str(vlms["llava"]), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.dtype == "bfloat16" and full.model.dtype == torch.float32
    batch = images(3)
    a, _ = full.score(batch, PROMPTS[:3])
    b, _ = half.score(batch, PROMPTS[:3])
    assert b == pytest.approx(a, abs=0.03) and a != b
    # On an accelerator the default is bfloat16 (a 7B model in float32 is 28 GB); the CPU keeps float32.
    meta = VqaScorer(str(vlms["llava"]), device="meta")
    assert meta.dtype == "bfloat16" and meta.model.dtype == torch.bfloat16
    assert VqaScorer(str(vlms["llava"]), device="meta", dtype="float16").model.dtype == torch.float16


def test_a_vision_language_model_is_told_from_its_config(vlms, models, tmp_path):
    import shutil

    from clipeval.vqa import is_vision_language

    assert is_vision_language(str(vlms["llava"]), None) and is_vision_language(str(vlms["smolvlm"]), None)
    assert not is_vision_language(str(models.clip), None)
    assert not is_vision_language("demo", None)
    assert not is_vision_language(str(tmp_path / "no-such-model"), None)  # a hub id: the CLIP loader says why
    leftover = tmp_path / "leftover"  # a native model whose config still names remote classes: allowed
    shutil.copytree(vlms["llava"], leftover)
    config = json.loads((leftover / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_llava.LlavaConfig"}
    (leftover / "config.json").write_text(json.dumps(config))
    assert is_vision_language(str(leftover), None)
    assert VqaScorer(str(leftover)).model_class == "LlavaForConditionalGeneration"
    remote = tiny_vlms.needing_remote_code(vlms["llava"], tmp_path / "remote")
    with pytest.raises(ClipevalError, match="needs remote code"):
        is_vision_language(str(remote), None)


class _Pieces:
    """A tokenizer that knows a few whole strings: enough to show which answer token is chosen."""

    def __init__(self, table: dict[str, list[int]], pieces: list[str]):
        self.table, self.pieces = table, pieces

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}

    def tokenize(self, text):
        return self.pieces


def test_the_answer_token_follows_the_template_as_the_family_needs():
    from types import SimpleNamespace

    from clipeval.vqa import answer_token

    direct = SimpleNamespace(tokenizer=_Pieces({"Q:": [7, 8], "Q:Yes": [7, 8, 30], "Q: Yes": [7, 8, 5, 30]}, ["Yes"]))
    assert answer_token(direct, "Q:", "Yes", "m") == ("Yes", 30)
    # LLaVA-1.5 ("... ASSISTANT:"): SentencePiece marks the word start, so the model emits "▁Yes".
    spaced = SimpleNamespace(tokenizer=_Pieces({"Q:": [7, 8], "Q:Yes": [7, 8, 41, 42], "Q: Yes": [7, 8, 31]}, ["▁Y", "es"]))
    assert answer_token(spaced, "Q:", "Yes", "m") == (" Yes", 31)
    # The template's last token merged with the answer's: neither is one token after it.
    merged = SimpleNamespace(tokenizer=_Pieces({"Q:": [7, 8], "Q:Yes": [7, 9], "Q: Yes": [7, 8, 41, 42]}, ["Y", "es"]))
    with pytest.raises(ClipevalError) as err:
        answer_token(merged, "Q:", "Yes", "m")
    assert str(err.value) == ("m: its tokenizer has no single token for the answer 'Yes' after its chat template (it splits "
                              "it into ['Y', 'es']); VQAScore reads one logit")
