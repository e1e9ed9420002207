"""Reading a SimpleTuner training config (``--config config.json``) as clipeval options.

SimpleTuner writes its keys with or without the leading ``--`` of its command line; both are read.
Only the keys below mean something here; every other key is ignored. A key with a wrong value
is a one-line error naming it. Options given on the command line win over the config.

================================================  ========================================
SimpleTuner key                                   clipeval option
================================================  ========================================
evaluation_type                                   must be "clip"
pretrained_model_name_or_path                     --base-model
output_dir                                        --checkpoint (run) / the training folder (sweep)
pretrained_evaluation_model_name_or_path          --clip-model
report_to                                         --report-to
validation_seed                                   --seed
validation_resolution ("1024", "1024x768")        --width and --height (the first if several)
validation_num_inference_steps                    --steps
validation_guidance                               --guidance-scale
validation_negative_prompt                        --negative-prompt
user_prompt_library (a {name: prompt} JSON)       --prompt-library
validation_prompt_library                         true/default/image: the built-in library
                                                  ``simpletuner`` (SimpleTuner's own prompts)
================================================  ========================================
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError


def load(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """clipeval option values from the config, and notes worth printing."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if source.suffix == ".toml" else json.loads(text)
    except OSError as err:
        raise ClipevalError(f"--config {path}: {err.strerror}") from err
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ClipevalError(f"--config {path}: not valid {'TOML' if source.suffix == '.toml' else 'JSON'} ({err})") from err
    if not isinstance(raw, dict):
        raise ClipevalError(f"--config {path}: expected an object of settings")
    config = {str(k).lstrip("-"): v for k, v in raw.items()}
    where = f"--config {path}"
    notes: list[str] = []
    kind = config.get("evaluation_type")
    if not isinstance(kind, str) or kind.lower() != "clip":
        raise ClipevalError(f"{where}: evaluation_type is {kind!r}; clipeval evaluates configs with evaluation_type \"clip\"")
    options: dict[str, Any] = {}
    text_keys = {"pretrained_model_name_or_path": "base_model", "output_dir": "checkpoint",
                 "pretrained_evaluation_model_name_or_path": "clip_model", "validation_negative_prompt": "negative_prompt"}
    for key, option in text_keys.items():
        if config.get(key) not in (None, ""):
            options[option] = _text(config[key], key, where)
    if config.get("report_to") not in (None, ""):
        report = _text(config["report_to"], "report_to", where).lower()
        if report not in ("tensorboard", "wandb", "none"):
            raise ClipevalError(f"{where}: report_to {report!r}: clipeval logs to tensorboard, wandb or none")
        options["report_to"] = report
    if config.get("validation_seed") is not None:
        options["seed"] = _integer(config["validation_seed"], "validation_seed", where, low=0)
    if config.get("validation_num_inference_steps") is not None:
        options["steps"] = _integer(config["validation_num_inference_steps"], "validation_num_inference_steps", where, low=1)
    if config.get("validation_guidance") is not None:
        options["guidance_scale"] = _number(config["validation_guidance"], "validation_guidance", where)
    if config.get("validation_resolution") not in (None, ""):
        width, height, several = _resolution(config["validation_resolution"], where)
        options["width"], options["height"] = width, height
        if several:
            notes.append(f"validation_resolution lists several sizes; clipeval evaluates at the first, {width}x{height}")
    library = config.get("user_prompt_library")
    if library not in (None, ""):
        options["prompt_library"] = _beside(_text(library, "user_prompt_library", where), source)
    elif config.get("validation_prompt_library") in (True, "true", "True", "default", "image"):
        options["simpletuner_library"] = True
    return options, notes


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ClipevalError(f"{where}: {key} must be text, got {value!r}")
    return str(value)


def _integer(value: Any, key: str, where: str, *, low: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or isinstance(value, bool) or number < low:
        raise ClipevalError(f"{where}: {key} must be an integer of at least {low}, got {value!r}")
    return number


def _number(value: Any, key: str, where: str) -> float:
    try:
        return float(str(value).strip()) if not isinstance(value, bool) else float("x")
    except ValueError:
        raise ClipevalError(f"{where}: {key} must be a number, got {value!r}") from None


def _resolution(value: Any, where: str) -> tuple[int, int, bool]:
    """SimpleTuner's "1024" (square), "1024x768" (width x height), or several separated by commas."""
    sizes = [s.strip() for s in str(value).split(",") if s.strip()]
    match = re.fullmatch(r"(\d+)(?:\s*[xX]\s*(\d+))?", sizes[0]) if sizes else None
    if not match:
        raise ClipevalError(f"{where}: validation_resolution {value!r}: expected 1024 or 1024x768")
    width = int(match.group(1))
    return width, int(match.group(2) or width), len(sizes) > 1


def _beside(path: str, config: Path) -> str:
    """A relative path as SimpleTuner reads it (from where it runs), else beside the config."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return str(given)
    beside = config.parent / given
    return str(beside) if beside.exists() else path
