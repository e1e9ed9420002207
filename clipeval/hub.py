"""Loading weights from disk or the Hugging Face Hub: the one line worth showing of a hub error,
quiet library logs, dtypes by name, and the pickle policy. Shared by pipelines, scorers and the demo."""

from __future__ import annotations

PICKLE_HINT = "pickle files can run arbitrary code when loaded; convert to .safetensors, or pass --allow-pickle " \
    "(then read with torch.load(weights_only=True), which refuses anything but tensors)"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def hub_error(err: BaseException) -> str:
    """The one line worth showing from a hub or loading error."""
    name = type(err).__name__
    text = str(err).strip().splitlines()
    first = text[0] if text else name
    if "GatedRepo" in name or "gated" in first.lower():
        return "the model is gated: accept its license on the Hub and log in (huggingface-cli login)"
    if "RevisionNotFound" in name:
        return "that revision does not exist"
    if "RepositoryNotFound" in name or "404" in first:
        return "no such model on the Hub (or it is private: log in with huggingface-cli login)"
    if "LocalEntryNotFound" in name or "offline" in first.lower() or "couldn't connect" in first.lower():
        return "not in the local Hugging Face cache and the Hub cannot be reached (offline?)"
    if "cannot be loaded with `safetensors`" in first:  # transformers' "do not set use_safetensors=True"
        return f"it has only pickle weights: {PICKLE_HINT}"
    if "does not appear to have a file named" in first and _hub_offline():
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE forbids downloading it"
    return f"{first} ({name})"


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def quiet_hf(*, with_diffusers: bool = True) -> None:
    """transformers/diffusers INFO chatter and per-component progress bars would drown our one
    progress bar; their warnings that matter surface as our errors. Scoring alone leaves
    diffusers unimported (5 s)."""
    import transformers

    # transformers first: importing diffusers already makes it log (image processor fallbacks).
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not with_diffusers:
        return
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
