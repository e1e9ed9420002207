"""Tiny random vision-language models of two families, built offline and saved with
``save_pretrained``, so VQAScore's tests load them through ``AutoModelForImageTextToText`` and
``AutoProcessor`` as a real checkpoint is loaded:

- LLaVA (``LlavaForConditionalGeneration``: a CLIP vision tower and a Llama language model), with
  LLaVA-1.5's chat template (``USER: <image>\\n... ASSISTANT:``);
- SmolVLM / Idefics3 (``Idefics3ForConditionalGeneration``), with SmolVLM's template.

The tokenizers are word-level and hold "Yes" and "No" as single tokens. A random language model
puts P("Yes") near 1/vocabulary with differences of 1e-5 between images, so a test at 1e-5 could
not tell a swapped image: the "Yes" and "No" output rows are refitted so P("Yes") spreads over
roughly 0.1-0.8 on varied images and questions.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("a an the of on in with and red blue green cube cat dog photo table sign saying stop sky night city "
         "Does this figure show Please answer yes or no . ? \" ' , : ! Yes No USER ASSISTANT User Assistant").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def word_tokenizer(extra_specials: list[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIALS, *extra_specials]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    return tokenizer


def _llama(vocab: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def build_llava(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                              patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_llama(len(tokenizer), tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    spread_answers(model, processor, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_smolvlm(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig)

    torch.manual_seed(seed)
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = word_tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *grid])
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                  patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=_llama(len(tokenizer), tokenizer), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    model = Idefics3ForConditionalGeneration(config).eval()
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    spread_answers(model, processor, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def spread_answers(model, processor, seed: int) -> None:
    """Refit the "Yes" and "No" output rows so that, on calibration images and questions, the
    "Yes" logit sits around log(vocabulary) ± 1.5: P("Yes") then spans roughly 0.1-0.8."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    questions = ["a red cube", "a photo of a cat on the table", "a blue sky at night", "a sign saying stop",
                 "the city", "a green dog with a cat and a cube", "an", "a photo"]
    hidden = []
    for i, text in enumerate(questions):
        image = (torch.rand(3, 40, 48, generator=generator) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        assert torch.allclose(model.get_output_embeddings()(out.hidden_states[-1][0, -1]), out.logits[0, -1], atol=1e-5)
        hidden.append(out.hidden_states[-1][0, -1])
    h = torch.stack(hidden)  # the last layer's output after the final norm
    centred = h - h.mean(0)
    target = torch.linspace(-1.5, 1.5, len(questions), dtype=torch.float32)
    row = torch.linalg.lstsq(centred, target[:, None]).solution[:, 0]
    head = model.get_output_embeddings()
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    offset = math.log(len(processor.tokenizer)) - float(h.mean(0) @ row)
    with torch.no_grad():
        head.weight[:] *= 0.1  # the other logits near 0
        # "Yes" = a direction that varies with image and question, shifted by a constant
        # direction (the mean hidden state) to sit around log(V).
        mean = h.mean(0)
        head.weight[yes] = row + offset * mean / (mean @ mean)
        head.weight[no] = -0.5 * row + math.log(len(processor.tokenizer)) * mean / (mean @ mean)


def needing_remote_code(model: Path, folder: Path) -> Path:
    """A copy of ``model`` whose config names a model type transformers does not know and maps it to
    the folder's own code (which exits if it is ever run)."""
    import json
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_vlm", auto_map={"AutoConfig": "configuration_mine.MyConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_mine.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


def without_chat_template(model: Path, folder: Path) -> Path:
    """A copy of ``model`` whose processor and tokenizer carry no chat template."""
    import json
    import shutil

    shutil.copytree(model, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("chat_template", None)
            path.write_text(json.dumps(data))
    return folder
