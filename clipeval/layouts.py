"""What training tools write, read from the files themselves, before any weights are loaded.

kohya sd-scripts, ai-toolkit, OneTrainer, SimpleTuner and diffusers' example scripts each name
and lay out their checkpoints their own way (README, "What the sweep understands"). This module
knows those layouts: whether a ``.safetensors`` file is a LoRA, a LyCORIS adapter or a whole model
(from its tensor names, read from the header alone), which step a checkpoint was saved at, where
its EMA weights are, and which entries of a training folder are checkpoints at all.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_FILES = ("pytorch_lora_weights.safetensors", "lora/lora.safetensors", "pytorch_lora_weights.bin")
DENOISERS = ("unet", "transformer")  # the subfolders a fine-tuning script saves
# Folders that are part of a checkpoint, never a checkpoint of their own: a pipeline's components,
# EMA copies, and trainers' side folders (kohya's accelerate state is matched by its -state suffix).
PARTS = {"unet", "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
         "tokenizer", "tokenizer_2", "tokenizer_3", "image_encoder", "feature_extractor", "safety_checker",
         "unet_ema", "transformer_ema", "ema", "logs", "samples", "sample", "validation_images", "lora"}
STATE_FILES = ("trainer_state.json", "training_state.json", "train_state.json")  # HF Trainer; SimpleTuner; kohya

# The step in a name, in the order tried. The stem of a file, or a folder's name.
STEP_PATTERNS = (
    re.compile(r"-(?:save|backup)-(\d+)-\d+-\d+$"),  # OneTrainer: {date}-save-{step}-{epoch}-{epoch_step}
    re.compile(r"(?:checkpoint|global[-_]?step|steps?|ckpt)[-_]?(\d+)$", re.IGNORECASE),  # checkpoint-N, kohya -stepNNNNNNNN
    re.compile(r"_(\d{9,})$"),  # ai-toolkit: NAME_000000250
)
KOHYA_EPOCH = re.compile(r"^(.+)-(\d{6})$")  # kohya: NAME-000001 (the epoch; its step is in the metadata or -state/)

LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.")
LYCORIS_PARAMS = re.compile(r"^(?:lokr_|hada_|oft_|boft_|diff$|diff_b$)")


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: tensor names with their offsets, and its string metadata."""

    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    complete: bool  # the tensors the header lists end within the file


def read_header(path: Path) -> Header | None:
    """None when ``path`` is not a safetensors file at all (or is cut inside its header)."""
    try:
        with Path(path).open("rb") as f:
            size = Path(path).stat().st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 256 << 20):
                return None
            raw = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(raw, dict):
        return None
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {k: v for k, v in raw.items() if isinstance(v, dict) and "data_offsets" in v}
    ends = [t["data_offsets"][1] for t in tensors.values()]
    return Header(tensors, metadata if isinstance(metadata, dict) else {}, 8 + length + max(ends, default=0) <= size)


def safetensors_complete(path: Path) -> bool:
    header = read_header(path)
    return header is not None and header.complete


def adapter_format(names) -> str | None:
    """``"lycoris"`` (LoKr, LoHa, OFT, full diffs, or anything under SimpleTuner's ``lycoris_``
    prefix), ``"lora"`` (kohya's lora_down/lora_up, peft's lora_A/lora_B, older diffusers keys), or
    None: a whole model."""
    names = list(names)
    lycoris = any(n.startswith("lycoris_") or LYCORIS_PARAMS.match(n.rsplit(".", 1)[-1]) for n in names)
    if lycoris:
        return "lycoris"
    # Whatever the trainer's naming (kohya, peft, diffusers' old keys, XLabs' ``qkv_lora1``,
    # DoRA's ``lora_magnitude_vector``), a LoRA's tensors say "lora"; a whole model's never do.
    if any("lora" in name.lower() for name in names):
        return "lora"
    return None


# Which pipeline component a LoRA key prefix addresses. "denoiser" is the unet or the transformer.
KOHYA_PREFIXES = (("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"), ("lora_te1_", "text_encoder"),
                  ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"),
                  ("lycoris_", "denoiser"))
DOTTED_PREFIXES = {"unet": "denoiser", "transformer": "denoiser", "diffusion_model": "denoiser", "model": "denoiser",
                   "text_encoder": "text_encoder", "te": "text_encoder", "text_encoder_2": "text_encoder_2",
                   "text_encoder_3": "text_encoder_3"}


def adapter_component(module: str) -> tuple[str, str]:
    """(component, the module's name within it) for a LoRA or LyCORIS module name."""
    for prefix, component in KOHYA_PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix):]
    head, _, rest = module.partition(".")
    if head in DOTTED_PREFIXES and rest:
        return DOTTED_PREFIXES[head], rest
    return "denoiser", module  # peft's own files name the denoiser's modules without a prefix


def adapter_modules(names) -> dict[str, set[str]]:
    """The modules a LoRA file names, by component: what loading it must change. Only keys of a
    down or up factor count (not alpha, DoRA's magnitudes, or a naming this does not know)."""
    out: dict[str, set[str]] = {}
    for name in names:
        cut = min((name.find(part) for part in LORA_PARTS if part in name), default=-1)
        if cut < 0:
            continue
        component, module = adapter_component(name[:cut])
        out.setdefault(component, set()).add(module)
    return out


def training_step(checkpoint: str | Path) -> int | None:
    """The training step of a checkpoint, from what its trainer wrote: the name (``checkpoint-1500``,
    kohya's ``-step00000300``, ai-toolkit's ``_000000250``, OneTrainer's ``-save-30-7-2``), kohya's
    ``ss_steps`` metadata, a state file inside the folder or beside it (kohya's ``-state/``), or the
    name of the folder a file sits in (OneTrainer's backups, SimpleTuner's checkpoint-N/)."""
    path = Path(checkpoint)
    stem = path.stem if path.suffix.lower() == ".safetensors" else path.name
    step = step_in_name(stem)
    if step is not None:
        return step
    if path.is_file():
        header = read_header(path)  # None for anything but a safetensors file
        value = (header.metadata if header else {}).get("ss_steps")
        if isinstance(value, str) and value.isdigit():
            return int(value)
        state = _state_step(path.parent / f"{stem}-state")  # kohya --save_state, beside the file
        if state is not None:
            return state
        for parent in list(path.parents)[:3]:  # OneTrainer backup-…/lora/lora.safetensors, checkpoint-N/…
            step = step_in_name(parent.name)
            if step is not None:
                return step
            state = _state_step(parent)
            if state is not None:
                return state
        return None
    state = _state_step(path)
    if state is None and path.is_dir():
        state = _state_step(path.parent / f"{path.name}-state")
    return state


def step_in_name(name: str) -> int | None:
    for pattern in STEP_PATTERNS:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


def _state_step(folder: Path) -> int | None:
    for name in STATE_FILES:
        try:
            state = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            continue
        for key in ("global_step", "current_step", "step"):
            if isinstance(state.get(key), int) and not isinstance(state.get(key), bool):
                return state[key]
    return None


def ema_choice(folder: Path, ema: bool | None) -> tuple[Path | None, str | None]:
    """Where a checkpoint folder's weights are, and which ("ema", "raw"; None: there is no choice).

    ``ema`` None is the default: the EMA weights where there are both, since they are what the
    trainer ships as its final model (diffusers' train_text_to_image.py writes the EMA UNet into the
    final pipeline; SimpleTuner validates and exports its EMA)."""
    raw_lora = next((folder / n for n in LORA_FILES if (folder / n).is_file()), None)
    ema_lora = next((folder / "ema" / n for n in LORA_FILES if (folder / "ema" / n).is_file()), None)
    raw_denoiser = next((folder / n for n in DENOISERS if (folder / n / "config.json").is_file()), None)
    ema_denoiser = next((folder / f"{n}_ema" for n in DENOISERS if (folder / f"{n}_ema" / "config.json").is_file()), None)
    if ema_denoiser is None and (folder / "ema" / "config.json").is_file():
        ema_denoiser = folder / "ema"
    use_ema = ema is not False
    for raw, averaged in ((raw_lora, ema_lora), (raw_denoiser, ema_denoiser)):
        if raw is not None and averaged is not None:
            return (averaged, "ema") if use_ema else (raw, "raw")
        if raw is not None or averaged is not None:
            return raw or averaged, ("ema" if raw is None else None)
    return None, None


@dataclass
class Found:
    """A checkpoint in a training folder: where it is, its step, and the name its results go under."""

    path: Path
    step: int | None
    name: str
    final: bool = False  # the trainer's final model (the folder's own pipeline or LoRA)
    notes: list[str] = field(default_factory=list)


def denoiser_class(folder: Path) -> str | None:
    """The class a folder's config.json names, when the folder is a UNet or a transformer itself."""
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and (name.startswith("UNet") or name.endswith("Transformer2DModel")) else None


def is_checkpoint_folder(folder: Path) -> bool:
    return (
        (folder / "model_index.json").is_file()
        or any((folder / name).is_file() for name in LORA_FILES)
        or any((folder / "ema" / name).is_file() for name in LORA_FILES)
        or any((folder / name / "config.json").is_file() or (folder / f"{name}_ema" / "config.json").is_file()
               for name in DENOISERS)
        or denoiser_class(folder) is not None
    )


def _skipped_folder(folder: Path) -> bool:
    name = folder.name
    return name.startswith(".") or name in PARTS or name.endswith("-state") or name.startswith("temporary-")


def find_checkpoints(root: Path, *, depth: int = 3) -> list[Found]:
    """Every checkpoint under a training folder, oldest step first, the final model last.

    Folders that load as a checkpoint (a pipeline, LoRA weights, a fine-tuned unet/ or
    transformer/) and ``.safetensors`` files (kohya's, ai-toolkit's and OneTrainer's per-step
    LoRAs or single-file models) down to ``depth`` levels; never a component folder, an EMA copy
    or kohya's ``-state/``. The folder's own pipeline or LoRA (diffusers' scripts write the final
    model at the root) is the final model, named ``final``. A OneTrainer backup is left out when a
    save of the same step is there (the same weights)."""
    found: list[Found] = []

    def walk(folder: Path, level: int) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                if _skipped_folder(entry):
                    continue
                if is_checkpoint_folder(entry):
                    found.append(_found(root, entry))
                elif level < depth:
                    walk(entry, level + 1)
            elif entry.suffix.lower() == ".safetensors" and not entry.name.startswith(".") and entry.name not in LORA_FILES:
                found.append(_found(root, entry))  # a LORA_FILES name is its folder's, the root's final LoRA

    walk(root, 1)
    if is_checkpoint_folder(root):
        names = {f.name for f in found}
        final = Found(root, training_step(root), "final" if "final" not in names else "final-model", final=True)
        found.append(final)
    saved = {f.step for f in found if not _is_backup(root, f.path)}
    found = [f for f in found if not (_is_backup(root, f.path) and f.step is not None and f.step in saved)]
    return sorted(found, key=lambda f: (f.step is None, f.final, f.step or 0, f.name))


def _is_backup(root: Path, path: Path) -> bool:
    """OneTrainer's workspace/backup/{date}-backup-{step}-{epoch}-{epoch_step}/."""
    parts = path.relative_to(root).parts
    return any(part == "backup" or "-backup-" in part for part in parts)


FINAL_FOLDERS = ("pipeline",)  # SimpleTuner writes its final model to OUT/pipeline/


def _found(root: Path, path: Path) -> Found:
    relative = path.relative_to(root)
    parts = list(relative.parts)
    if path.is_file():
        parts[-1] = path.stem
    final = (len(parts) == 1 and path.is_dir() and path.name in FINAL_FOLDERS) or _kohya_final(path)
    return Found(path, training_step(path), "__".join(parts), final=final)


def _kohya_final(path: Path) -> bool:
    """kohya's NAME.safetensors beside its NAME-step00000300 / NAME-000001 files: the final model,
    placed after a per-step file of the same step."""
    if not path.is_file() or step_in_name(path.stem) is not None:
        return False
    import glob

    stem = path.stem
    return any(step_in_name(sibling.stem) is not None or KOHYA_EPOCH.match(sibling.stem)
               for sibling in path.parent.glob(f"{glob.escape(stem)}-*.safetensors"))
