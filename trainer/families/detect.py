"""Tells which model family a checkpoint file or diffusers folder holds, without loading it.

Only tensor names and a few shapes are read (safetensors headers, or a memory-mapped torch.load), so
checking a multi-gigabyte file costs milliseconds. `detect_family` names the family to train with, and
turns anything no family trains into an `UnsupportedModelError` whose message names the file and what it
looks like (SD 2.x, SD 3, FLUX ... are refused by name until their family exists).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PathLike = str | Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class UnsupportedModelError(ValueError):
    """The file or folder is not something LoRA Foundry can train on."""


@dataclass(frozen=True)
class CheckpointKind:
    key: str
    name: str
    article: str = "an"
    family: str | None = None  # the family module that trains it (None: no family does yet)
    # the components a complete model of this kind holds, as (component, what users call it)
    components: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.name


SD_COMPONENTS = (("unet", "UNet"), ("vae", "VAE"), ("text_encoder", "text encoder"))
SDXL_COMPONENTS = (("unet", "UNet"), ("vae", "VAE"), ("text_encoder", "text encoder"),
                   ("text_encoder_2", "second text encoder"))
SD1 = CheckpointKind("sd1", "SD 1.x", family="sd15", components=SD_COMPONENTS)
SD1_INPAINT = CheckpointKind("sd1_inpaint", "SD 1.x inpainting")
SD2 = CheckpointKind("sd2", "SD 2.x")
SDXL = CheckpointKind("sdxl", "SDXL", family="sdxl", components=SDXL_COMPONENTS)
SDXL_DISTILLED = CheckpointKind("sdxl_distilled", "distilled SDXL (SSD-1B, Vega or KOALA)", article="a")
SDXL_REFINER = CheckpointKind("sdxl_refiner", "SDXL refiner")
SD3 = CheckpointKind("sd3", "SD 3")
FLUX = CheckpointKind("flux", "FLUX.1", article="a", family="flux")  # text encoders and VAE may be files apart
FLUX_CONTROL = CheckpointKind("flux_control", "FLUX.1 Fill, Depth or Canny (extra input channels)", article="a")
FLUX2 = CheckpointKind("flux2", "FLUX.2", article="a")
CHROMA = CheckpointKind("chroma", "Chroma", article="a")
ZIMAGE = CheckpointKind("zimage", "Z-Image", article="a", family="zimage")
LUMINA2 = CheckpointKind("lumina2", "Lumina Image 2.0", article="a")
LORA = CheckpointKind("lora", "LoRA", article="a")
UNKNOWN = CheckpointKind("unknown", "unknown")
TRAINED = (SD1, SDXL, FLUX, ZIMAGE)
# the family modules' labels, for messages
FAMILY_LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL", "flux": "FLUX.1", "zimage": "Z-Image"}
TRAINED_NAMES = (", ".join(FAMILY_LABELS[kind.family] for kind in TRAINED[:-1])
                 + f" and {FAMILY_LABELS[TRAINED[-1].family]}")
FLUX_PACKED_CHANNELS = 64  # FLUX.1's 16 latent channels in 2x2 patches: its img_in input

# Cross-attention context width of a UNet's attn2.to_k -> model family
CONTEXT_DIMS = {768: SD1, 1024: SD2, 2048: SDXL, 1280: SDXL_REFINER}
# a tensor only the full SDXL base UNet has: the tenth transformer block of its deepest level
SDXL_FULL_DEPTH_KEY = UNET_PREFIX + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"


@dataclass(frozen=True)
class _Inspection:
    kind: CheckpointKind
    components: frozenset[str]  # of "unet", "vae", "text_encoder", "text_encoder_2"


def describe_checkpoint(path: PathLike) -> CheckpointKind:
    """The model family of a single-file checkpoint or diffusers folder (UNKNOWN when unrecognised).

    Raises UnsupportedModelError when the file cannot be read as a checkpoint at all and
    FileNotFoundError when nothing is at `path`.
    """
    return _inspect(Path(path)).kind


def is_diffusers_folder(path: PathLike) -> bool:
    """True for a folder laid out like a diffusers pipeline or a single diffusers model."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    markers = ("model_index.json", "unet/config.json", "transformer/config.json")
    return any((folder / marker).is_file() for marker in markers)


def detect_family(path: PathLike) -> str:
    """The name of the family that trains the complete model at `path`; UnsupportedModelError naming what it
    looks like otherwise."""
    path = Path(path)
    inspection = _inspect(path)
    kind = inspection.kind
    if kind.family is None:
        raise UnsupportedModelError(_rejection_message(path, kind))
    _require_components(path, kind, inspection.components)
    return kind.family


def require_family(path: PathLike, family: str) -> None:
    """Raises UnsupportedModelError unless `path` is a complete model of `family`."""
    found = detect_family(path)
    if found != family:
        label = FAMILY_LABELS[found]
        raise UnsupportedModelError(
            f"{path} is {_article(label)} {label} model, but model.family is {family!r} "
            f"({FAMILY_LABELS.get(family, family)}); set model.family to {found!r} or 'auto'"
        )


def _article(name: str) -> str:
    if name.startswith("FLUX"):
        return "a"  # a word, not letters
    return "an" if name[:1] in "AEFHILMNORSX" else "a"  # by the letter's sound: "an SD", "an SDXL"


def _rejection_message(path: Path, kind: CheckpointKind) -> str:
    only = f"LoRA Foundry trains {TRAINED_NAMES} LoRAs"
    if kind == LORA:
        return f"{path} looks like a LoRA, not a base model; choose an {TRAINED_NAMES} checkpoint to train on"
    if kind == UNKNOWN:
        either = TRAINED_NAMES.replace(" and ", " or ")
        return f"{path} is not a recognisable {either} checkpoint (no UNet or transformer of any); {only}"
    return f"{path} looks like {kind.article} {kind.name} checkpoint; {only}"


def _require_components(path: Path, kind: CheckpointKind, components: frozenset[str]) -> None:
    missing = [label for name, label in kind.components if name not in components]
    if not missing:
        return
    whole = _and_list([label for _, label in kind.components])
    raise UnsupportedModelError(
        f"{path} is {kind.article} {kind.name} model without {_and_list(missing)} weights; LoRA Foundry needs a "
        f"full {kind.name} checkpoint ({whole} in one file, or a diffusers folder)"
    )


def _and_list(labels: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)


def _inspect(path: Path) -> _Inspection:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _inspect_folder(path)
    shapes = _read_shapes(path)
    return _Inspection(_kind_from_shapes(shapes), _components_from_keys(shapes))


# ---- single files ----------------------------------------------------------------------------


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, reading no tensor data."""
    readers = [("safetensors", _safetensors_shapes), ("torch", _torch_shapes)]
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        readers.reverse()
    errors = []
    for label, reader in readers:
        try:
            return reader(path)
        except Exception as exc:  # noqa: BLE001 - any failure here means "not readable by this reader"
            errors.append(f"as {label}: {_short(exc)}")
    raise UnsupportedModelError(f"{path} cannot be read as a checkpoint ({'; '.join(errors)})")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 - safe_open is not iterable


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # files from torch < 1.6 (legacy format) cannot be memory-mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = _unwrap_state_dict(loaded)
    return {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def _unwrap_state_dict(loaded: Any) -> Mapping[str, Any]:
    if not isinstance(loaded, Mapping):
        raise TypeError(f"holds a {type(loaded).__name__}, not a state dict")
    nested = loaded.get("state_dict")
    return nested if isinstance(nested, Mapping) else loaded


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _kind_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind:
    keys = shapes.keys()
    if any(_is_lora_key(key) for key in keys):
        return LORA
    if any("double_blocks." in key for key in keys):
        return _flux_kind(shapes)
    if any("joint_blocks." in key for key in keys):
        return SD3
    if any(key.removeprefix(UNET_PREFIX) == "cap_embedder.1.weight" for key in keys):
        # Z-Image modulates with a 256-wide timestep embedding in adaLN_modulation.0; Lumina 2 (its
        # architecture's ancestor) puts a SiLU first, its Linear is adaLN_modulation.1
        bare = {key.removeprefix(UNET_PREFIX) for key in keys}
        return ZIMAGE if "layers.0.adaLN_modulation.0.weight" in bare else LUMINA2
    if _has_prefix(keys, "conditioner.embedders.1."):
        return _sdxl_kind(shapes)
    if _has_prefix(keys, "conditioner.embedders.0.model."):
        return SDXL_REFINER
    context = _context_dim(shapes)
    kind = CONTEXT_DIMS.get(context, UNKNOWN) if context else UNKNOWN
    if kind == SDXL:
        return _sdxl_kind(shapes)
    if kind == UNKNOWN and _has_prefix(keys, "cond_stage_model.model."):
        return SD2  # open_clip text encoder: SD 2.x even if the UNet is missing
    if kind == SD1 and _unet_in_channels(shapes) == 9:
        return SD1_INPAINT
    if kind == SD1 and _unet_in_channels(shapes) not in (None, 4):
        return UNKNOWN
    return kind


def _flux_kind(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind:
    """FLUX.1 dev or schnell, or a relative whose extra parts FLUX.1's family does not train."""
    bare = {key.removeprefix(UNET_PREFIX): shape for key, shape in shapes.items()}
    if "double_stream_modulation_img.lin.weight" in bare:
        return FLUX2
    if any(key.startswith("distilled_guidance_layer.") for key in bare):
        return CHROMA
    image_in = bare.get("img_in.weight")
    if image_in is None:
        return UNKNOWN
    return FLUX if image_in[1] == FLUX_PACKED_CHANNELS else FLUX_CONTROL


def _sdxl_kind(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointKind:
    """SDXL base, or one of its distillations (fewer transformer blocks: the shipped config does not fit)."""
    has_unet = _has_prefix(shapes.keys(), UNET_PREFIX)
    return SDXL if not has_unet or SDXL_FULL_DEPTH_KEY in shapes else SDXL_DISTILLED


def _is_lora_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te")) or ".lora_down." in key or ".lora_A." in key


def _has_prefix(keys: Any, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Width of the text context the UNet cross-attends to (attn2.to_k is [inner, context])."""
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def _unet_in_channels(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key in (UNET_PREFIX + "input_blocks.0.0.weight", "input_blocks.0.0.weight", "conv_in.weight"):
        shape = shapes.get(key)
        if shape is not None and len(shape) == 4:
            return shape[1]
    return None


def _components_from_keys(keys: Any) -> frozenset[str]:
    found = set()
    if _has_prefix(keys, UNET_PREFIX):
        found.add("unet")
    if _has_prefix(keys, VAE_PREFIX):
        found.add("vae")
    if _has_prefix(keys, "cond_stage_model.") or _has_prefix(keys, "conditioner.embedders.0."):
        found.add("text_encoder")
    if _has_prefix(keys, "conditioner.embedders.1."):
        found.add("text_encoder_2")
    return frozenset(found)


# ---- diffusers folders -----------------------------------------------------------------------


def _inspect_folder(folder: Path) -> _Inspection:
    if not is_diffusers_folder(folder):
        raise UnsupportedModelError(
            f"{folder} is a folder but not a diffusers model (no model_index.json or unet/config.json)"
        )
    return _Inspection(_folder_kind(folder), _folder_components(folder))


def _folder_kind(folder: Path) -> CheckpointKind:
    transformer = _read_json(folder / "transformer" / "config.json")
    if transformer is not None:
        class_name = str(transformer.get("_class_name", ""))
        if class_name == "FluxTransformer2DModel":
            return FLUX if transformer.get("in_channels") == FLUX_PACKED_CHANNELS else FLUX_CONTROL
        return FLUX2 if "Flux2" in class_name else SD3 if "SD3" in class_name else UNKNOWN
    unet = _read_json(folder / "unet" / "config.json")
    if unet is None:
        return UNKNOWN
    if _is_sdxl_style(folder, unet):
        return SDXL  # at any width: SDXL and the small test models of its architecture
    kind = CONTEXT_DIMS.get(unet.get("cross_attention_dim"), UNKNOWN)
    if kind == SDXL:
        return UNKNOWN  # SDXL's context width without its two text encoders and size conditioning
    if kind == UNKNOWN and _is_sd1_style(unet):
        kind = SD1  # SD 1.x architecture at another width (small test and distilled models)
    if kind in (SD1, SD2) and not _text_encoder_matches(folder, unet["cross_attention_dim"]):
        return UNKNOWN
    if kind == SD1 and unet.get("in_channels", 4) == 9:
        return SD1_INPAINT
    if kind == SD1 and unet.get("in_channels", 4) != 4:
        return UNKNOWN
    return kind


def _is_sd1_style(unet: dict) -> bool:
    """One text encoder feeding cross-attention, no extra conditioning: the SD 1.x UNet layout."""
    return (
        unet.get("_class_name") == "UNet2DConditionModel"
        and isinstance(unet.get("cross_attention_dim"), int)
        and unet.get("addition_embed_type") is None
        and unet.get("cross_attention_dim") not in (1024, 1280, 2048)
    )


def _is_sdxl_style(folder: Path, unet: dict) -> bool:
    """Two text encoders whose hidden states, side by side, are the cross-attention context, and the
    pooled-text-plus-size conditioning: the SDXL base UNet layout."""
    if unet.get("_class_name") != "UNet2DConditionModel" or unet.get("addition_embed_type") != "text_time":
        return False
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        config = _read_json(folder / name / "config.json")
        if config is None:
            return unet.get("cross_attention_dim") == 2048  # a missing encoder is reported as missing
        widths.append(config.get("text_config", config).get("hidden_size"))
    return unet.get("cross_attention_dim") == sum(widths)


def _text_encoder_matches(folder: Path, context_dim: int) -> bool:
    """SD 1.x/2.x feed the text encoder's hidden states straight into cross-attention."""
    config = _read_json(folder / "text_encoder" / "config.json")
    if config is None:
        return True  # no text encoder: reported as a missing component, not as another family
    text_config = config.get("text_config", config)
    return text_config.get("hidden_size") == context_dim


def _folder_components(folder: Path) -> frozenset[str]:
    found = set()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sub = folder / name
        if sub.is_dir() and any(f.suffix in WEIGHT_SUFFIXES for f in sub.iterdir() if f.is_file()):
            found.add(name)
    return frozenset(found)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{path} cannot be read as a model config ({_short(exc)})") from exc
    return data if isinstance(data, dict) else None
