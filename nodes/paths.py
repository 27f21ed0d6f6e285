"""The one place that turns widget values into paths: ComfyUI folders, allowed roots, safe names."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..trainer.names import output_stem_problem

PACK_DIR = "lora-foundry"


class PathError(ValueError):
    pass


def comfy_tokenizer_dir() -> Path:
    """CLIP's tokenizer files as ComfyUI ships them; the trainer gets this path in its config."""
    return Path(folder_paths.__file__).resolve().parent / "comfy" / "sd1_tokenizer"


def input_dir() -> Path:
    return Path(folder_paths.get_input_directory()).resolve()


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory()).resolve()


def runs_dir() -> Path:
    return output_dir() / PACK_DIR / "runs"


def datasets_dir() -> Path:
    return output_dir() / PACK_DIR / "datasets"


def cache_dir() -> Path:
    return output_dir() / PACK_DIR / "cache"


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def require_inside(files: list[Path], root: Path, what: str) -> None:
    """Refuse any file that resolves (symlinks followed) outside `root`, naming each."""
    outside = [str(f) for f in files if not inside(f, root)]
    if outside:
        raise PathError(f"{what}: these files resolve outside {root} and are refused: {', '.join(outside)}")


def dataset_folders() -> list[str]:
    """Subfolders of ComfyUI's input directory (one level), for the Dataset node's dropdown."""
    root = input_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and inside(p, root))


def resolve_dataset_folder(name: str) -> Path:
    """A dropdown value back to a folder, refusing anything that leaves the input directory (symlinks too)."""
    if not name or name != Path(name).name or name in (".", ".."):
        raise PathError(f"dataset folder {name!r}: pick a folder from the list (a name inside ComfyUI's input folder)")
    root = input_dir()
    folder = (root / name).resolve()
    if not inside(folder, root):
        raise PathError(f"dataset folder {name!r} resolves outside ComfyUI's input folder; refused")
    if not folder.is_dir():
        raise PathError(f"dataset folder {name!r} does not exist in {root}")
    return folder


DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's folder of models that come without text encoders and VAE
NO_FILE = "none"  # the text-encoder and VAE dropdowns' "not chosen": the base model file holds them


def base_models() -> list[str]:
    """Checkpoints ComfyUI lists, the diffusion models of models/diffusion_models (and models/unet) as
    'diffusion_models/NAME', and diffusers folders under models/diffusers as 'diffusers/NAME'."""
    names = [n for n in folder_paths.get_filename_list("checkpoints") if n.endswith((".safetensors", ".ckpt", ".sft"))]
    names += [f"{DIFFUSION_MODELS}/{n}" for n in folder_paths.get_filename_list(DIFFUSION_MODELS)
              if n.endswith((".safetensors", ".sft"))]
    for root in folder_paths.get_folder_paths("diffusers"):
        root_path = Path(root)
        if root_path.is_dir():
            names += [f"diffusers/{p.name}" for p in sorted(root_path.iterdir()) if (p / "model_index.json").is_file()]
    return names


def resolve_base_model(name: str) -> Path:
    if name.startswith("diffusers/"):
        folder = name[len("diffusers/") :]
        for root in folder_paths.get_folder_paths("diffusers"):
            candidate = (Path(root) / folder).resolve()
            if folder == Path(folder).name and inside(candidate, Path(root)) and candidate.is_dir():
                return candidate
        raise PathError(f"base model {name!r} is not a diffusers folder in models/diffusers")
    if name.startswith(f"{DIFFUSION_MODELS}/"):
        return resolve_listed(DIFFUSION_MODELS, name[len(DIFFUSION_MODELS) + 1 :], "base model")
    if name not in folder_paths.get_filename_list("checkpoints"):
        raise PathError(f"base model {name!r} is not in ComfyUI's checkpoints list")
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise PathError(f"base model {name!r} not found")
    return Path(path)


def model_files(folder: str) -> list[str]:
    """The safetensors files ComfyUI lists in one of its model folders ("text_encoders", "vae"), after "none"."""
    return [NO_FILE] + [n for n in folder_paths.get_filename_list(folder) if n.endswith((".safetensors", ".sft"))]


def resolve_listed(folder: str, name: str, what: str) -> Path:
    """A dropdown value of one of ComfyUI's model folders to its file; only names ComfyUI lists there."""
    if name not in folder_paths.get_filename_list(folder):
        raise PathError(f"{what} {name!r} is not in ComfyUI's {folder} list")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise PathError(f"{what} {name!r} not found")
    return Path(path)


def safe_output_name(name: str) -> str:
    """The output name as typed, as a file stem every OS stores unchanged; a typed ".safetensors" is dropped.

    Nothing else is changed: surrounding white space is refused rather than stripped, so the LoRA file is
    named exactly what the widget shows (a space the user did not see would otherwise decide the name, and
    Windows would drop a trailing one anyway). Letters and digits of any script are fine.
    """
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    problem = output_stem_problem(stem)
    if problem is None and stem != stem.strip():
        problem = "starts or ends with white space, which is easy to miss in the name; remove it"
    if problem:
        raise PathError(f"output name {name!r}: {problem}")
    return stem


def lora_file(stem: str) -> Path:
    return loras_dir() / f"{stem}.safetensors"


def resolve_lora(name: str) -> Path:
    """A loras-dropdown value (or the Train node's lora_name output) to its file."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        candidate = (loras_dir() / name).resolve()
        if inside(candidate, loras_dir()) and candidate.is_file():
            return candidate
        raise PathError(f"LoRA {name!r} not found in ComfyUI's loras folders")
    return Path(path)


def user_accelerate_configs() -> list[str]:
    """YAML/JSON files in ComfyUI's user directory under lora-foundry/accelerate/."""
    root = Path(folder_paths.get_user_directory()) / PACK_DIR / "accelerate"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())


def resolve_accelerate_config(name: str) -> Path:
    if name not in user_accelerate_configs():
        raise PathError(f"accelerate config {name!r} is not in the user folder's lora-foundry/accelerate/")
    return Path(folder_paths.get_user_directory()) / PACK_DIR / "accelerate" / name
