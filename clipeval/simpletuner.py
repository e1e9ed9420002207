"""Reading a SimpleTuner training config (``--config config.json``) as SimpleTuner reads it.

Checked against SimpleTuner's source at the commit the built-in ``simpletuner`` library pins
(``simpletuner_models.toml`` names it): its keys with or without the leading ``--``, its
``{env:VAR}`` placeholders, its validation defaults for keys the config leaves out (its run used
them), its model families, and how it builds and scores its validation set. Options given on the
command line win over the config. A key with a wrong value is a one-line error naming it; a
validation key clipeval cannot honour is named once in a note, never silently ignored.

==============================================  ============================================
SimpleTuner key (its default)                   clipeval option
==============================================  ============================================
evaluation_type                                 must be "clip"
pretrained_model_name_or_path, else             --base-model
model_family + model_flavour (its default)      (SimpleTuner's HUGGINGFACE_PATHS)
output_dir                                      --checkpoint (run) / the training folder (sweep)
pretrained_evaluation_model_name_or_path        --clip-model (openai/clip-vit-large-patch14-336)
report_to (none): a name, a comma list, all     --report-to
tracker_project_name (simpletuner)              --project
logging_dir (logs, inside output_dir)           --logging-dir
validation_seed, else seed, else 0              --seed
validation_resolution (256): 1024, 1024x768,    --width and --height (the first if several)
  megapixels under 128 (1 = 1024)
validation_num_inference_steps (30)             --steps
validation_guidance (7.5)                       --guidance-scale
validation_negative_prompt (blurry, cropped,    --negative-prompt ("none" or empty: none)
  ugly)
num_validation_images (1)                       --images-per-prompt
validation_noise_scheduler (the family's)       --scheduler
validation_prompt_library, user_prompt_library, --prompt-library: SimpleTuner's built-in
  validation_prompt                             prompts, then the user's, then the single
                                                prompt, as one library
==============================================  ============================================
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError

# SimpleTuner's field defaults (simpletuner_sdk/.../field_registry/sections/*.py) for what we map.
DEFAULTS = {
    "pretrained_evaluation_model_name_or_path": "openai/clip-vit-large-patch14-336",
    "validation_resolution": "256", "validation_num_inference_steps": 30, "validation_guidance": 7.5,
    "validation_negative_prompt": "blurry, cropped, ugly", "num_validation_images": 1,
    "tracker_project_name": "simpletuner", "logging_dir": "logs", "report_to": "none",
}
BOOL_TRUE = {"1", "true", "yes", "y", "on"}  # SimpleTuner's BOOL_TRUE_STRINGS
BOOL_FALSE = {"0", "false", "no", "n", "off"}
LIBRARY_TRUE = {"", "1", "true", "yes", "on", "default", "image", "images"}  # get_validation_prompt_library
LIBRARY_FALSE = {"0", "false", "no", "off", "none", "null", "n"}
HONOURED = {
    "evaluation_type", "pretrained_evaluation_model_name_or_path", "validation_seed", "validation_resolution",
    "validation_num_inference_steps", "validation_guidance", "validation_negative_prompt", "validation_prompt",
    "validation_prompt_library", "validation_noise_scheduler",
    # clipeval never generates SimpleTuner's unconditional image (an empty prompt, scored against "")
    "validation_disable_unconditional",
}
# Validation keys that say when or how fast SimpleTuner validates, not what it scores.
NOT_ABOUT_THE_SCORE = {
    "validation_steps", "validation_epochs", "validation_step_interval", "validation_epoch_interval",
    "validation_on_startup", "validation_torch_compile", "validation_torch_compile_mode", "validation_multigpu",
    "validation_preview", "validation_preview_steps", "validation_method", "validation_disable",
    "eval_steps_interval", "eval_epoch_interval", "evaluation_dataset", "eval_dataset_id",
}


def load(path: str | Path, *, given_options: set[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """clipeval option values from the config, and notes worth printing. ``given_options``: those
    the command line gave, which win: a wrong config value for one of them is no error."""
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
    given = {str(k).lstrip("-"): _placeholders(v) for k, v in raw.items()}
    config = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    where = f"--config {path}"
    notes: list[str] = []
    kind = config.get("evaluation_type")
    if not isinstance(kind, str) or kind.lower() != "clip":
        raise ClipevalError(f"{where}: evaluation_type is {kind!r}; clipeval evaluates configs with evaluation_type \"clip\"")
    options: dict[str, Any] = {}
    family = _family(config, where)
    if config.get("pretrained_model_name_or_path") not in (None, ""):
        options["base_model"] = _text(config["pretrained_model_name_or_path"], "pretrained_model_name_or_path", where)
    elif family is not None:
        options["base_model"] = family["base_model"]
        notes.append(f"base model {family['base_model']}: SimpleTuner's model_family {config['model_family']!r}, "
                     f"flavour {family['flavour']!r}")
    if config.get("output_dir") not in (None, ""):
        options["checkpoint"] = _text(config["output_dir"], "output_dir", where)
    options["clip_model"] = _text(config["pretrained_evaluation_model_name_or_path"], "pretrained_evaluation_model_name_or_path", where)
    if "report_to" in given_options:
        config["report_to"] = "none"  # the command line's wins, whatever the config says
    _trackers(config, options, where)
    seed = config.get("validation_seed") or config.get("seed") or 0  # SimpleTuner: validation_seed or seed or 0
    options["seed"] = _integer(seed, "validation_seed", where, low=0)
    options["steps"] = _integer(config["validation_num_inference_steps"], "validation_num_inference_steps", where, low=1)
    options["guidance_scale"] = _number(config["validation_guidance"], "validation_guidance", where)
    options["images_per_prompt"] = _integer(config["num_validation_images"], "num_validation_images", where, low=1)
    negative = config["validation_negative_prompt"]
    if isinstance(negative, str) and negative.strip().lower() not in ("", "none"):
        # SimpleTuner's default applies only where the pipeline takes a negative prompt
        options["negative_prompt" if "validation_negative_prompt" in given else "default_negative_prompt"] = negative
    elif not isinstance(negative, str):
        raise ClipevalError(f"{where}: validation_negative_prompt must be text, got {negative!r}")
    width, height, several = _resolution(config["validation_resolution"], where)
    options["width"], options["height"] = width, height
    if several:
        notes.append(f"validation_resolution lists several sizes; clipeval evaluates at the first, {width}x{height}")
    scheduler, why = _scheduler(config, family)
    if scheduler:
        options["scheduler"] = scheduler
    unhonoured = [f"{k}={given[k]!r}" for k in sorted(given) if _unhonoured(k, given[k])]
    if why:
        unhonoured.append(why)
    library = _library(config, source, where)
    if library is not None:
        options["prompt_library"] = library
    if unhonoured:
        notes.append(f"clipeval cannot honour these validation settings of the config: {', '.join(unhonoured)}")
    return options, notes


def _placeholders(value: Any) -> Any:
    """SimpleTuner's ``{env:NAME}`` (the variable, or empty when unset), in every string of the value."""
    if isinstance(value, str):
        return re.sub(r"\{env:([^{}]+)\}", lambda m: os.environ.get(m.group(1), ""), value)
    if isinstance(value, list):
        return [_placeholders(v) for v in value]
    if isinstance(value, dict):
        return {k: _placeholders(v) for k, v in value.items()}
    return value


@cache
def families() -> dict[str, Any]:
    """SimpleTuner's model families (``simpletuner_models.toml``, made by tools/simpletuner_models.py)."""
    return tomllib.loads(resources.files("clipeval").joinpath("simpletuner_models.toml").read_text(encoding="utf-8"))


def _family(config: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The model family's entry and, as SimpleTuner's setup_model_flavour does, the base model of
    the flavour given (or the family's default)."""
    name = config.get("model_family")
    if name in (None, ""):
        return None
    table = families()
    entry = table.get(str(name).lower())
    if not isinstance(entry, dict):
        known = ", ".join(k for k in table if k != "commit")
        raise ClipevalError(f"{where}: model_family {name!r} is not one of SimpleTuner's ({known})")
    flavour = config.get("model_flavour") or entry.get("default_flavour")
    if config.get("pretrained_model_name_or_path") in (None, "") and flavour not in entry["flavours"]:
        raise ClipevalError(f"{where}: model_flavour {flavour!r} is not one of {name}'s: {', '.join(entry['flavours'])}")
    return {**entry, "flavour": flavour, "base_model": entry["flavours"].get(flavour)}


def _scheduler(config: dict[str, Any], family: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(the --scheduler SimpleTuner's validation used, or None for the pipeline's own; a note when
    it named one clipeval has not)."""
    from clipeval.pipelines import SCHEDULERS

    name = config.get("validation_noise_scheduler")
    if name in (None, "", "None") and family is not None:
        name = family.get("noise_scheduler")
    if config.get("model_family") == "sana":
        name = "sana"
    if name in (None, "", "None"):
        return None, None
    if family is not None and family.get("prediction_type") == "flow_matching" and name in ("euler", "sana"):
        name = "flow_matching"  # SimpleTuner: euler on a flow-matching model is its flow-matching Euler
    if name not in SCHEDULERS:
        return None, f"validation_noise_scheduler={name!r} (SimpleTuner's own scheduler; the pipeline's is used)"
    return name, None


def _trackers(config: dict[str, Any], options: dict[str, Any], where: str) -> None:
    from clipeval.trackers import parse_report_to

    report = config["report_to"]
    if isinstance(report, list):
        report = ",".join(str(r) for r in report)
    options["report_to"] = parse_report_to(_text(report, "report_to", where), f"{where}: report_to")
    options["project"] = _text(config["tracker_project_name"], "tracker_project_name", where)
    if config.get("output_dir") not in (None, ""):
        # SimpleTuner's logging_dir is os.path.join(output_dir, logging_dir): beside its own curves
        options["logging_dir"] = Path(_text(config["output_dir"], "output_dir", where)).expanduser() / \
            _text(config["logging_dir"], "logging_dir", where)


def _library(config: dict[str, Any], source: Path, where: str):
    """SimpleTuner's validation prompts: its built-in library (validation_prompt_library), then the
    user's (user_prompt_library), then validation_prompt, named "validation"."""
    from clipeval.prompts import Combined

    parts: list[str] = []
    selector = config.get("validation_prompt_library")
    if selector not in (None, False):
        key = str(selector).strip().lower()
        if selector is True or key in LIBRARY_TRUE or key in BOOL_TRUE:
            parts.append("simpletuner")
        elif key not in LIBRARY_FALSE:
            raise ClipevalError(
                f"{where}: validation_prompt_library {selector!r}: clipeval has SimpleTuner's image library "
                "(true, default, image); its audio libraries do not describe images"
            )
    library = config.get("user_prompt_library")
    if library not in (None, ""):
        parts.append(_beside(_text(library, "user_prompt_library", where), source))
    single = config.get("validation_prompt")
    extra = ((("validation", _text(single, "validation_prompt", where)),)
             if single not in (None, "", "None") else ())
    if not parts and not extra:
        return None
    if len(parts) == 1 and not extra:
        return parts[0]
    return Combined(tuple(parts), extra)


def _unhonoured(key: str, value: Any) -> bool:
    """A validation setting with a value that changes what SimpleTuner scored, which clipeval does not map."""
    about_validation = key.startswith(("validation_", "evaluation_", "eval_"))
    if not about_validation or key in HONOURED or key in NOT_ABOUT_THE_SCORE:
        return False
    if value in (None, "", False, 0, 0.0, [], {}) or (isinstance(value, str) and value.strip().lower() in ("none", "false")):
        return False
    return True


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
    import math

    try:
        number = float(str(value).strip()) if not isinstance(value, bool) else float("x")
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ClipevalError(f"{where}: {key} must be a number, got {value!r}")
    return number


def _resolution(value: Any, where: str) -> tuple[int, int, bool]:
    """SimpleTuner's "1024" (square), "1024x768" (width x height), several separated by commas, or
    megapixels: a number under 128 is read as SimpleTuner's cmd_args reads it (1 is 1024 px,
    N is N·1000 rounded down to a multiple of 8)."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d*)?", text) and float(text) < 128:
        if "." in text and float(text) != int(float(text)):
            raise ClipevalError(f"{where}: validation_resolution {value!r}: SimpleTuner reads fractional megapixels as "
                                f"{int(float(text)) * 1000} px; give the size in pixels")
        megapixels = int(float(text))
        side = 1024 if megapixels == 1 else int(megapixels * 1000) // 8 * 8
        if side < 8:
            raise ClipevalError(f"{where}: validation_resolution {value!r} gives {side} px")
        return side, side, False
    sizes = [s.strip() for s in text.split(",") if s.strip()]
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
