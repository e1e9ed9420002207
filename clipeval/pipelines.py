"""Loading a text-to-image checkpoint, whatever form it comes in, as a diffusers pipeline.

Forms: ``demo`` (a tiny random pipeline), a diffusers pipeline folder (``model_index.json``), a
hub id, a single ``.safetensors`` file whose architecture comes from ``--base-model``, and what
trainers save on top of a base model: LoRA and LyCORIS files or folders, and fine-tuned
denoisers (with their EMA copies); ``clipeval.layouts`` tells them apart.
Weights are read from safetensors only; remote code is never run. Every loading failure becomes
one ``ClipevalError`` line that says what to do.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError
from clipeval.hub import PICKLE_HINT, hub_error, quiet_hf, torch_dtype  # noqa: F401 - also pipelines' API
from clipeval.layouts import DENOISERS, LORA_FILES  # noqa: F401 - also pipelines' API
from clipeval.layouts import denoiser_class as _denoiser_class

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(spec: str) -> str:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device is an error."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if spec == "cpu":
        return spec
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ClipevalError("--device mps: Apple's MPS backend is not available on this machine")
        return spec
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise ClipevalError(f"--device {spec}: use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise ClipevalError(f"--device {spec}: CUDA is not available (torch {torch.__version__})")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ClipevalError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return spec




def resolve_dtype(spec: str, device: str, model_index: dict[str, Any] | None) -> str:
    """``auto``: float32 on the CPU; on accelerators half precision, bfloat16 for transformer
    denoisers (SD3, Flux, ...) which are trained in it and overflow in float16."""
    if spec != "auto":
        if spec == "float16" and device == "cpu":
            raise ClipevalError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
        return spec
    if device == "cpu":
        return "float32"
    if model_index and "transformer" in model_index and device.startswith("cuda"):
        return "bfloat16"
    return "float16"


ADAPTERS = ("lora", "lycoris")


@dataclass(frozen=True)
class CheckpointRef:
    """What ``--checkpoint`` resolved to, before any weights are read."""

    spec: str  # as the user gave it
    kind: str  # "demo" | "folder" | "hub" | "single-file" | "lora" | "lycoris" | "denoiser"
    location: str  # local path or hub id
    base_model: str | None
    model_index: dict[str, Any] | None
    weights: str | None = None  # "ema" or "raw" where the checkpoint holds both; None: no choice

    @property
    def pipeline_class(self) -> str:
        return (self.model_index or {}).get("_class_name", "?")





def resolve_checkpoint(
    spec: str, base_model: str | None, *, allow_pickle: bool = False, revision: str | None = None,
    ema: bool | None = None,
) -> CheckpointRef:
    """Check that the checkpoint exists and what it is, cheaply, before any model is loaded.
    ``ema``: where a checkpoint holds EMA and raw weights, which (None: the EMA)."""
    if spec == "demo":
        from clipeval import demo

        path = demo.demo_pipeline_dir()
        return CheckpointRef(spec, "demo", str(path), None, _read_index(path / "model_index.json"))
    path = Path(spec).expanduser()
    if revision is not None and (path.exists() or spec == "demo"):
        raise ClipevalError(f"--revision applies to hub ids; {spec} is local")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise ClipevalError(f"{spec}: {PICKLE_HINT}")
        if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in PICKLE_SUFFIXES:
            raise ClipevalError(f"{spec}: not a .safetensors file, a diffusers folder or a hub id")
        kind = _file_kind(path) if path.suffix.lower() == ".safetensors" else "single-file"
        if not base_model:
            if kind in ADAPTERS:
                raise ClipevalError(f"{spec} holds {_ADAPTER_WORDS[kind]}: pass --base-model with the pipeline they were trained from")
            raise ClipevalError(
                f"{spec} is a single-file checkpoint, which carries no architecture: pass --base-model "
                "with a diffusers folder or hub id of the same family (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
            )
        return CheckpointRef(spec, kind, str(path), base_model, _base_index(base_model))
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return _training_output(spec, path, base_model, allow_pickle, ema)
        if not allow_pickle and not any(path.rglob("*.safetensors")) and any(
            p.suffix in PICKLE_SUFFIXES for p in path.rglob("*") if p.is_file()
        ):
            raise ClipevalError(f"{spec} holds only pickle weights: {PICKLE_HINT}")
        return CheckpointRef(spec, "folder", str(path), None, _read_index(index))
    if path.exists():
        raise ClipevalError(f"{spec}: not a file or folder")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return CheckpointRef(spec, "hub", spec, None, _hub_index(spec, revision))
    raise ClipevalError(f"checkpoint not found: {spec} (no such file or folder, and not a hub id)")


_ADAPTER_WORDS = {"lora": "LoRA weights", "lycoris": "LyCORIS weights"}


def _file_kind(path: Path) -> str:
    """``lora``, ``lycoris`` or ``single-file`` (a whole model), from the tensor names in the
    header; a file cut short (still being written, or a crash mid-save) is refused unread."""
    from clipeval import layouts

    header = layouts.read_header(path)
    if header is None:
        raise ClipevalError(f"{path}: not a safetensors file, or cut short inside its header (still being written?)")
    if not header.complete:
        raise ClipevalError(f"{path}: truncated: its tensors end past the end of the file (still being written, or a crash mid-save)")
    return layouts.adapter_format(header.tensors) or "single-file"


def _training_output(spec: str, path: Path, base_model: str | None, allow_pickle: bool, ema: bool | None) -> CheckpointRef:
    """A folder a training script saved: LoRA or LyCORIS weights, or a fine-tuned UNet/transformer
    alone (with its EMA copy, perhaps). All go onto --base-model, which supplies everything else."""
    from clipeval import layouts

    weights, choice = layouts.ema_choice(path, ema)
    if weights is None and _denoiser_class(path) is not None:
        weights = path  # the folder is the UNet/transformer itself
    if weights is None:
        raise ClipevalError(
            f"{spec}: not a diffusers pipeline folder (no model_index.json), nor LoRA weights "
            f"({LORA_FILES[0]}), nor a fine-tuned unet/ or transformer/"
        )
    if weights.is_file():
        if weights.suffix != ".safetensors" and not allow_pickle:
            raise ClipevalError(f"{weights}: {PICKLE_HINT}")
        kind = _file_kind(weights) if weights.suffix == ".safetensors" else "lora"
        if kind == "single-file":
            raise ClipevalError(f"{weights}: its tensors are not LoRA or LyCORIS weights")
    else:
        kind = "denoiser"
        if not list(weights.glob("*.safetensors")) and not allow_pickle:
            raise ClipevalError(f"{weights} holds no safetensors weights: {PICKLE_HINT}")
    if not base_model:
        what = _ADAPTER_WORDS.get(kind) or f"a fine-tuned {weights.name}"
        raise ClipevalError(f"{spec} holds {what}: pass --base-model with the pipeline they were trained from")
    return CheckpointRef(spec, kind, str(weights), base_model, _base_index(base_model), weights=choice)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClipevalError(f"{path}: unreadable model_index.json ({err})") from err
    return _trusted(index, str(path))


TRUSTED_LIBRARIES = {None, "diffusers", "transformers"}


def _diffusers_pipeline_module(name: Any) -> bool:
    """diffusers resolves a library name that is one of its own pipeline packages (SD 1.x's
    safety checker is ["stable_diffusion", "StableDiffusionSafetyChecker"]) inside diffusers: its
    own code, not the checkpoint's."""
    import importlib.util

    if not isinstance(name, str) or not name.isidentifier():
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{name}") is not None
    except (ImportError, ValueError):
        return False


def _trusted(index: Any, where: str) -> dict[str, Any]:
    """A model_index.json may name modules of its own (custom pipelines and components), which
    diffusers would import and run. clipeval never runs code that comes with a checkpoint."""
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ClipevalError(f"{where}: model_index.json asks for a custom pipeline class; clipeval never runs code from a checkpoint")
    for name, value in index.items():
        if not name.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2:
            if value[0] not in TRUSTED_LIBRARIES and not _diffusers_pipeline_module(value[0]):
                raise ClipevalError(
                    f"{where}: component {name} comes from {value[0]!r}, and clipeval never runs code from a "
                    "checkpoint (only diffusers and transformers components load)"
                )
    return dict(index)


def _hub_index(repo_id: str, revision: str | None = None) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(repo_id, revision=revision)
    except Exception as err:  # hub errors come in many types; all mean "cannot get it"
        raise ClipevalError(f"checkpoint {repo_id}{f'@{revision}' if revision else ''}: {hub_error(err)}") from err
    return _trusted(index, repo_id)


def _base_index(base: str) -> dict[str, Any]:
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ClipevalError(f"--base-model {base}: not a diffusers pipeline folder (no model_index.json)")
        return _read_index(path / "model_index.json")
    if HUB_ID.match(base):
        return _hub_index(base)
    raise ClipevalError(f"--base-model {base}: no such folder, and not a hub id")


def load_pipeline(
    ref: CheckpointRef,
    *,
    device: str,
    dtype: str,
    allow_pickle: bool = False,
    revision: str | None = None,
    lora_scale: float | None = None,
):
    """Load the pipeline in ``dtype`` on ``device``, with diffusers' own progress bars off."""
    import warnings

    quiet_hf()
    import diffusers
    from diffusers import AutoPipelineForText2Image

    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(dtype)}
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.42 prefers `dtype`; older releases know only `torch_dtype`.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            safetensors = None if allow_pickle else True
            if ref.kind == "single-file":
                pipe = _from_single_file(diffusers, ref, kwargs)
            elif ref.kind in (*ADAPTERS, "denoiser"):
                base = str(Path(ref.base_model).expanduser()) if Path(ref.base_model).expanduser().is_dir() else ref.base_model
                pipe = AutoPipelineForText2Image.from_pretrained(base, use_safetensors=safetensors, **kwargs)
                scale = 1.0 if lora_scale is None else lora_scale
                if ref.kind == "lora":
                    _load_lora(pipe, ref, scale)
                elif ref.kind == "lycoris":
                    _load_lycoris(pipe, ref, scale)
                else:
                    _swap_denoiser(diffusers, pipe, Path(ref.location), safetensors, kwargs)
            else:
                pipe = AutoPipelineForText2Image.from_pretrained(
                    ref.location, use_safetensors=safetensors, revision=revision, **kwargs
                )
    except ClipevalError:
        raise
    except Exception as err:
        raise ClipevalError(f"could not load checkpoint {ref.spec}: {hub_error(err)}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_lora(pipe, ref: CheckpointRef, scale: float) -> None:
    """diffusers' own LoRA loading (peft backend; it converts kohya's and other trainers' keys), at
    ``scale``: 0 is the base model exactly. Then every module the file names must have been
    changed: a LoRA for another family, or keys diffusers could not place, is an error, never a
    silent no-op."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ClipevalError(f"{type(pipe).__name__} cannot load LoRA weights")
    lora = Path(ref.location)
    named = _named_modules(lora)
    try:
        with _diffusers_errors_unlogged():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="clipeval")
    except ClipevalError:
        raise
    except Exception as err:  # peft and diffusers raise many types for keys that fit nothing
        raise _misfit(ref, pipe, _first_reason(err)) from err
    for component, modules in named.items():
        module = _component(pipe, component)
        applied = _lora_layers(module) if module is not None else 0
        if applied < len(modules):
            where = f"{len(modules)} modules of the {component}" if component != "denoiser" else f"{len(modules)} denoiser modules"
            raise _misfit(ref, pipe, f"it names {where}, and diffusers could apply it to {applied} of them")
    pipe.set_adapters(["clipeval"], adapter_weights=[scale])


class _diffusers_errors_unlogged:
    """diffusers logs a failed adapter load at ERROR, many lines, before raising it: the raised
    error becomes clipeval's one line instead."""

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)


def _first_reason(err: Exception) -> str:
    """The line of a load error that says what did not fit (torch lists every size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), None)
    head = lines[0] if lines else type(err).__name__
    return f"{type(err).__name__}: {head[:200]}{f' {detail[:300]}' if detail and detail != head else ''}"


def _misfit(ref: CheckpointRef, pipe, why: str) -> ClipevalError:
    return ClipevalError(
        f"{ref.location} does not fit --base-model {ref.base_model} ({type(pipe).__name__}): {why}; "
        "is it a LoRA for another model family?"
    )


def _named_modules(path: Path) -> dict[str, set[str]]:
    from clipeval import layouts

    header = layouts.read_header(path) if path.suffix == ".safetensors" else None
    return layouts.adapter_modules(header.tensors) if header is not None else {}


def _component(pipe, component: str):
    """The pipeline module a LoRA component addresses ("denoiser": the unet, else the transformer)."""
    if component == "denoiser":
        unet = getattr(pipe, "unet", None)
        return unet if unet is not None else getattr(pipe, "transformer", None)
    return getattr(pipe, component, None)


def _lora_layers(module) -> int:
    return sum(1 for m in module.modules() if "clipeval" in getattr(m, "lora_A", {}))


def _load_lycoris(pipe, ref: CheckpointRef, scale: float) -> None:
    """LyCORIS (LoKr, LoHa, LoCon, full diffs) through the lycoris package, as it ran in training:
    its modules wrap the base's layers (``apply_to``) at ``scale``. Not ``merge_to``: in lycoris
    4.1.3 it scales a LoKr whose factor is decomposed by alpha/dim twice (tested against a hand
    merge). Keys with kohya's prefixes (``lora_unet_``, ``lora_te_``, ...) go to their component;
    SimpleTuner's ``lycoris_`` prefix is the denoiser."""
    try:
        from lycoris import create_lycoris_from_weights
    except ImportError as err:
        raise ClipevalError(
            f"{ref.location} holds LyCORIS weights (LoKr, LoHa, ...): loading them needs the lycoris extra: "
            "pip install 'clipeval[lycoris]'"
        ) from err
    import logging

    from safetensors.torch import load_file

    from clipeval import layouts

    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(ref.location).items():
        module, dot, param = key.partition(".")
        if not dot:
            continue
        component, name = layouts.adapter_component(module)
        groups.setdefault(component, {})[f"lycoris_{name}.{param}"] = tensor
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # it logs every module it loads at INFO
    for component, weights in groups.items():
        module = _component(pipe, component)
        wanted = {key.split(".")[0] for key in weights}
        if module is None:
            raise _misfit(ref, pipe, f"it names {len(wanted)} modules of a {component}, which the base has not")
        network, _ = create_lycoris_from_weights(scale, ref.location, module, weights_sd=weights)
        if len(network.loras) < len(wanted):
            raise _misfit(ref, pipe, f"it names {len(wanted)} modules of the {component}, and "
                                     f"{len(network.loras)} of them were found in the base")
        network.apply_to()
        network.to(next(module.parameters()).dtype)
        module.add_module("clipeval_lycoris", network)  # so it follows the pipeline to its device


def _swap_denoiser(diffusers, pipe, folder: Path, safetensors, kwargs: dict[str, Any]) -> None:
    """A fine-tuned UNet/transformer (what training scripts save per checkpoint) into the base pipeline."""
    name = _denoiser_class(folder)
    cls = getattr(diffusers, name or "", None)
    slot = "unet" if name and name.startswith("UNet") else "transformer"
    if cls is None or getattr(pipe, slot, None) is None:
        raise ClipevalError(f"{folder}: a {name} does not fit the base {type(pipe).__name__}")
    setattr(pipe, slot, cls.from_pretrained(str(folder), use_safetensors=safetensors, **kwargs))


def set_attention(pipe, backend: str) -> None:
    """The denoiser's attention backend, and only the denoiser's (CLIP keeps PyTorch's SDPA).

    Denoisers built on diffusers' attention dispatcher (Flux, Wan, Qwen-Image, ...) take every
    backend diffusers knows (flash, sage, ...). Those with the classic processors (SD/SDXL UNets,
    SD3's transformer in diffusers 0.42) take sdpa, eager (plain matmuls) or xformers."""
    unet = getattr(pipe, "unet", None)
    denoiser = unet if unet is not None else getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ClipevalError("--attention: this pipeline has no unet or transformer")
    processors = list(getattr(denoiser, "attn_processors", {}).values())
    if processors and all(hasattr(p, "_attention_backend") for p in processors):
        name = "native" if backend == "sdpa" else backend
        try:
            denoiser.set_attention_backend(name)
        except (ValueError, RuntimeError, ImportError) as err:
            raise ClipevalError(f"--attention {backend}: {str(err).splitlines()[0]}") from err
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend in ("sdpa", "native"):
        denoiser.set_attn_processor(AttnProcessor2_0())
    elif backend == "eager":
        denoiser.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        try:
            denoiser.enable_xformers_memory_efficient_attention()
        except (ModuleNotFoundError, ImportError, ValueError) as err:
            raise ClipevalError(f"--attention xformers: {str(err).splitlines()[0]}") from err
    else:
        raise ClipevalError(
            f"--attention {backend}: the {type(denoiser).__name__} of this pipeline uses diffusers' classic attention "
            "processors, which take sdpa, eager or xformers; backends such as flash and sage apply to denoisers built "
            "on diffusers' attention dispatcher (Flux, Wan, Qwen-Image, ...)"
        )


def _from_single_file(diffusers, ref: CheckpointRef, kwargs: dict[str, Any]):
    cls = getattr(diffusers, ref.pipeline_class, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ClipevalError(f"--base-model {ref.base_model}: {ref.pipeline_class} cannot load single-file checkpoints")
    base = Path(ref.base_model).expanduser()
    local = base.is_dir()
    return cls.from_single_file(
        ref.location, config=str(base) if local else ref.base_model, local_files_only=local, **kwargs
    )


# SimpleTuner's validation scheduler names (its SCHEDULER_NAME_MAP) that are diffusers' own classes.
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "flow_matching": "FlowMatchEulerDiscreteScheduler",
    "flow_match_euler": "FlowMatchEulerDiscreteScheduler",
}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ClipevalError(f"--scheduler {name}: use one of {', '.join(SCHEDULERS)}")


def set_scheduler(pipe, name: str) -> None:
    """Swap the noise scheduler, built from the pipeline's own scheduler config (its training
    timesteps, betas and prediction type), as diffusers documents it."""
    import diffusers

    check_scheduler(name)
    cls = getattr(diffusers, SCHEDULERS[name])
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    if flow != name.startswith("flow"):
        kind = "a flow-matching" if flow else "a noise-prediction"
        raise ClipevalError(f"--scheduler {name}: this pipeline is {kind} model ({type(pipe.scheduler).__name__}); "
                            f"use {'flow_matching' if flow else 'ddim, euler, unipc, ...'}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def compile_denoiser(pipe) -> None:
    """torch.compile the UNet or transformer (the part that runs every step), channels-last for a
    UNet on CUDA. Off by default: compiling costs minutes up front, pays on long runs, and moves
    results in the last float bits."""
    import torch

    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, name, None)
    if denoiser is None:
        raise ClipevalError("--compile: this pipeline has no unet or transformer to compile")
    if name == "unet" and str(pipe.device).startswith("cuda"):
        denoiser.to(memory_format=torch.channels_last)
    setattr(pipe, name, torch.compile(denoiser))


def call_defaults(pipe) -> dict[str, Any]:
    """The pipeline's own defaults for the settings we record, so the manifest holds real values."""
    params = inspect.signature(pipe.__call__).parameters
    defaults = {name: params[name].default for name in ("num_inference_steps", "guidance_scale") if name in params}
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        # Not `unet or transformer`: a compiled module cannot be truth-tested.
        denoiser = getattr(pipe, "unet", None)
        if denoiser is None:
            denoiser = getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, int):
        defaults["height"] = defaults["width"] = sample * scale
    defaults["takes_negative_prompt"] = "negative_prompt" in params
    # SD/SDXL pipelines insist on multiples of 8; transformer denoisers pack 2×2 latent patches.
    defaults["size_multiple"] = scale * 2 if "transformer" in pipe.components else 8
    return defaults
