"""Checkpoint recognition (fast, on tiny fake files) and the random SD 1.5 checkpoint (slow, ~2 GiB).

The slow tests load the random checkpoint into diffusers with the pack's shipped config folder and into
a real ComfyUI (in a subprocess), and check that both hold exactly the file's tensors and that their
text encoders agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.families.detect import (
    CHROMA,
    FLUX,
    FLUX2,
    FLUX_CONTROL,
    LORA,
    LUMINA2,
    SD1,
    SD1_INPAINT,
    SD2,
    SD3,
    SDXL,
    SDXL_DISTILLED,
    SDXL_REFINER,
    UNKNOWN,
    ZIMAGE,
    UnsupportedModelError,
    describe_checkpoint,
    detect_family,
    is_diffusers_folder,
    require_family,
)


def require_sd15(path: Path | str) -> None:
    require_family(path, "sd15")

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "trainer" / "families" / "sd15_config"
PROBE = Path(__file__).resolve().parent / "comfy_checkpoint_probe.py"
PROMPT = "a photo of a red circle on a grey table"


def tiny(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def sd1_keys(in_channels: int = 4) -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": tiny(8, in_channels, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 768),
        "first_stage_model.encoder.conv_in.weight": tiny(8, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": tiny(4, 768),
    }


FAKES: dict[str, dict[str, torch.Tensor]] = {
    "sd1": sd1_keys(),
    "sd1_inpaint": sd1_keys(in_channels=9),
    "sd1_unet_only": {k: v for k, v in sd1_keys().items() if k.startswith("model.diffusion_model.")},
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 1024),
        "first_stage_model.encoder.conv_in.weight": tiny(8, 3, 3, 3),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": tiny(12, 4),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": tiny(8, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": tiny(8, 2048),
        "first_stage_model.encoder.conv_in.weight": tiny(8, 3, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": tiny(4, 768),
        "conditioner.embedders.1.model.token_embedding.weight": tiny(4, 1280),
    },
    "sdxl_unet_only": {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": tiny(8, 2048),
    },
    "sdxl_distilled": {  # SSD-1B's depth: no tenth transformer block at the deepest level
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": tiny(8, 2048),
        "first_stage_model.encoder.conv_in.weight": tiny(8, 3, 3, 3),
        "conditioner.embedders.1.model.token_embedding.weight": tiny(4, 1280),
    },
    "sdxl_refiner": {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": tiny(8, 1280),
        "conditioner.embedders.0.model.token_embedding.weight": tiny(4, 1280),
    },
    "flux": {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": tiny(6, 2),
             "model.diffusion_model.img_in.weight": tiny(2, 64)},
    "flux_bare": {"double_blocks.0.img_attn.qkv.weight": tiny(6, 2), "img_in.weight": tiny(2, 64)},
    "flux_fill": {"double_blocks.0.img_attn.qkv.weight": tiny(6, 2), "img_in.weight": tiny(2, 384)},
    "flux2": {"double_blocks.0.img_attn.qkv.weight": tiny(6, 2), "img_in.weight": tiny(2, 128),
              "double_stream_modulation_img.lin.weight": tiny(12, 2)},
    "chroma": {"double_blocks.0.img_attn.qkv.weight": tiny(6, 2), "img_in.weight": tiny(2, 64),
               "distilled_guidance_layer.norms.0.scale": tiny(2)},
    "sd3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": tiny(6, 2)},
    "zimage": {"model.diffusion_model.cap_embedder.1.weight": tiny(8, 4),
               "model.diffusion_model.layers.0.adaLN_modulation.0.weight": tiny(32, 4)},
    "zimage_bare": {"cap_embedder.1.weight": tiny(8, 4), "layers.0.adaLN_modulation.0.weight": tiny(32, 4)},
    "lumina2": {"cap_embedder.1.weight": tiny(8, 4), "layers.0.adaLN_modulation.1.weight": tiny(32, 4)},
    "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": tiny(4, 320)},
    "unrelated": {"encoder.layer.0.weight": tiny(2, 2)},
}
EXPECTED = {
    "sd1": SD1,
    "sd1_inpaint": SD1_INPAINT,
    "sd1_unet_only": SD1,
    "sd2": SD2,
    "sdxl": SDXL,
    "sdxl_unet_only": SDXL,
    "sdxl_distilled": SDXL_DISTILLED,
    "sdxl_refiner": SDXL_REFINER,
    "flux": FLUX,
    "flux_bare": FLUX,
    "flux_fill": FLUX_CONTROL,
    "flux2": FLUX2,
    "chroma": CHROMA,
    "sd3": SD3,
    "zimage": ZIMAGE,
    "zimage_bare": ZIMAGE,
    "lumina2": LUMINA2,
    "lora": LORA,
    "unrelated": UNKNOWN,
}


def write_fake(folder: Path, name: str, suffix: str = ".safetensors", nested: bool = False) -> Path:
    path = folder / f"{name}{suffix}"
    tensors = FAKES[name]
    if suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 10} if nested else tensors, path)
    return path


# ---- fast: recognition ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAKES))
def test_describe_safetensors(tmp_path: Path, name: str) -> None:
    assert describe_checkpoint(write_fake(tmp_path, name)) == EXPECTED[name]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_describe_torch_files(tmp_path: Path, name: str, nested: bool) -> None:
    path = write_fake(tmp_path, name, suffix=".ckpt", nested=nested)
    assert describe_checkpoint(path) == EXPECTED[name]


def test_sd1_is_accepted(tmp_path: Path) -> None:
    require_sd15(write_fake(tmp_path, "sd1"))
    require_sd15(str(write_fake(tmp_path, "sd1", suffix=".ckpt", nested=True)))


@pytest.mark.parametrize(("name", "family"), [("sd1", "sd15"), ("sdxl", "sdxl"), ("flux", "flux"),
                                              ("zimage", "zimage")])
def test_the_family_is_read_from_the_file(tmp_path: Path, name: str, family: str) -> None:
    assert detect_family(write_fake(tmp_path, name)) == family
    require_family(write_fake(tmp_path, name, suffix=".ckpt"), family)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("sdxl", "is an SDXL model, but model.family is 'sd15' (SD 1.5); set model.family to 'sdxl' or 'auto'"),
        ("sdxl_refiner",
         "looks like an SDXL refiner checkpoint; LoRA Foundry trains SD 1.5, SDXL, FLUX.1 and Z-Image LoRAs"),
        ("sdxl_distilled", "looks like a distilled SDXL (SSD-1B, Vega or KOALA) checkpoint"),
        ("sdxl_unet_only", "without VAE, text encoder and second text encoder weights"),
        ("sd2", "looks like an SD 2.x checkpoint"),
        ("sd3", "looks like an SD 3 checkpoint"),
        ("flux", "is a FLUX.1 model, but model.family is 'sd15' (SD 1.5); set model.family to 'flux' or 'auto'"),
        ("flux_fill", "looks like a FLUX.1 Fill, Depth or Canny (extra input channels) checkpoint"),
        ("flux2", "looks like a FLUX.2 checkpoint"),
        ("chroma", "looks like a Chroma checkpoint"),
        ("lumina2", "looks like a Lumina Image 2.0 checkpoint"),
        ("zimage", "is a Z-Image model, but model.family is 'sd15' (SD 1.5); set model.family to 'zimage' or 'auto'"),
        ("sd1_inpaint", "looks like an SD 1.x inpainting checkpoint"),
        ("lora", "looks like a LoRA, not a base model"),
        ("unrelated", "is not a recognisable SD 1.5, SDXL, FLUX.1 or Z-Image checkpoint"),
        ("sd1_unet_only", "without VAE and text encoder weights"),
    ],
)
def test_rejections_name_the_file_and_the_kind(tmp_path: Path, name: str, phrase: str) -> None:
    path = write_fake(tmp_path, name)
    with pytest.raises(UnsupportedModelError) as caught:
        require_sd15(path)
    assert str(path) in str(caught.value)
    assert phrase in str(caught.value)


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("garbage.safetensors", os.urandom(4096)),
        ("empty.safetensors", b""),
        ("notes.ckpt", b"these are my prompt notes, not a model\n" * 20),
        ("empty.ckpt", b""),
        ("random.bin", os.urandom(1000)),
    ],
)
def test_unreadable_files(tmp_path: Path, file_name: str, content: bytes) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    for check in (describe_checkpoint, require_sd15):
        with pytest.raises(UnsupportedModelError, match="cannot be read as a checkpoint") as caught:
            check(path)
        assert str(path) in str(caught.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        describe_checkpoint(tmp_path / "nope.safetensors")


# ---- fast: diffusers folders and the shipped config folder ------------------------------------


def set_config_value(config_path: Path, key: str, value: int) -> None:
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))


def diffusers_folder(
    root: Path, unet_context: int = 768, text_hidden: int = 768, weights: bool = True
) -> Path:
    """The shipped SD 1.5 config folder with placeholder weight files (enough for recognition)."""
    folder = root / "model"
    shutil.copytree(CONFIG_DIR, folder)
    set_config_value(folder / "unet" / "config.json", "cross_attention_dim", unet_context)
    set_config_value(folder / "text_encoder" / "config.json", "hidden_size", text_hidden)
    if weights:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
        (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
        (folder / "text_encoder" / "model.safetensors").write_bytes(b"x")
    return folder


def test_diffusers_folder_sd1(tmp_path: Path) -> None:
    folder = diffusers_folder(tmp_path)
    assert is_diffusers_folder(folder)
    assert describe_checkpoint(folder) == SD1
    require_sd15(folder)


@pytest.mark.parametrize(
    ("context", "hidden", "kind"), [(1024, 1024, SD2), (2048, 768, UNKNOWN), (768, 1024, UNKNOWN)]
)
def test_diffusers_folder_other_kinds(tmp_path: Path, context: int, hidden: int, kind) -> None:
    folder = diffusers_folder(tmp_path, unet_context=context, text_hidden=hidden)
    assert describe_checkpoint(folder) == kind
    with pytest.raises(UnsupportedModelError, match=str(folder)):
        require_sd15(folder)


def test_diffusers_folder_sdxl(tmp_path: Path) -> None:
    """The shipped SDXL config folder with placeholder weights: SDXL's layout (two encoders, size conditioning)."""
    folder = tmp_path / "sdxl"
    shutil.copytree(ROOT / "trainer" / "families" / "sdxl_config", folder)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model"), ("text_encoder_2", "model")):
        (folder / sub / f"{name}.safetensors").write_bytes(b"x")
    assert describe_checkpoint(folder) == SDXL and detect_family(folder) == "sdxl"
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="an SDXL model without second text encoder weights"):
        detect_family(folder)


def test_config_only_folder_is_not_a_model(tmp_path: Path) -> None:
    folder = diffusers_folder(tmp_path, weights=False)
    with pytest.raises(UnsupportedModelError, match="without UNet, VAE and text encoder weights"):
        require_sd15(folder)


def test_plain_folders(tmp_path: Path) -> None:
    assert not is_diffusers_folder(tmp_path)
    assert not is_diffusers_folder(tmp_path / "missing")
    assert not is_diffusers_folder(write_fake(tmp_path, "sd1"))
    with pytest.raises(UnsupportedModelError, match="not a diffusers model"):
        require_sd15(tmp_path)


def test_shipped_config_folder_is_sd15() -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = UNet2DConditionModel.load_config(CONFIG_DIR / "unet")
    assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["sample_size"]) == (768, 8, 64)
    assert list(unet["block_out_channels"]) == [320, 640, 1280, 1280]
    vae = AutoencoderKL.load_config(CONFIG_DIR / "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["sample_size"]) == (4, 0.18215, 512)
    text = CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.hidden_act, text.max_position_embeddings) == (3072, "quick_gelu", 77)
    scheduler = PNDMScheduler.from_pretrained(CONFIG_DIR / "scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    weights = [p for p in CONFIG_DIR.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert weights == [] and not (CONFIG_DIR / "tokenizer").exists()


# ---- fast: the random checkpoint's cache handling -------------------------------------------


def test_cache_location_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from scripts import make_random_sd15 as builder

    monkeypatch.setenv("LORA_FOUNDRY_CACHE", str(tmp_path))
    assert builder.default_path() == tmp_path / "sd15-random-fp16.safetensors"


def test_only_complete_files_of_this_recipe_are_reused(tmp_path: Path) -> None:
    from scripts import make_random_sd15 as builder

    path = tmp_path / "cache" / "model.safetensors"
    tensors = {"a": tiny(2), "b": tiny(3)}
    builder.write_atomically(tensors, path, {"recipe": builder.RECIPE, "tensor_count": "2"})
    assert builder.is_valid(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left
    builder.write_atomically(tensors, path, {"recipe": "older-recipe", "tensor_count": "2"})
    assert not builder.is_valid(path)
    path.write_bytes(path.read_bytes()[:-4])  # truncated
    assert not builder.is_valid(path)
    assert not builder.is_valid(tmp_path / "missing.safetensors")


# ---- slow: the random SD 1.5 checkpoint in diffusers and in ComfyUI ---------------------------


@pytest.fixture(scope="module")
def random_sd15() -> Path:
    from scripts.make_random_sd15 import ensure_random_sd15

    return ensure_random_sd15()


@pytest.fixture(scope="module")
def sd15_pipe(random_sd15: Path, tokenizer_dir: Path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline.from_single_file(
        str(random_sd15),
        config=str(CONFIG_DIR),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        safety_checker=None,
        feature_extractor=None,
        local_files_only=True,
    )
    yield pipe
    del pipe


def diffusers_to_file_names(pipe) -> dict[str, str]:
    """Every diffusers parameter of the pipeline -> the file key the builder wrote it under."""
    from scripts import make_random_sd15 as builder

    prefixes = builder.unet_block_prefixes(pipe.unet.config)
    blocks = len(pipe.vae.config.block_out_channels)
    names = {}
    for name in pipe.unet.state_dict():
        names[f"unet/{name}"] = builder.UNET_PREFIX + builder.ldm_unet_key(name, prefixes)
    for name in pipe.vae.state_dict():
        names[f"vae/{name}"] = builder.VAE_PREFIX + builder.ldm_vae_key(name, blocks)
    for name in pipe.text_encoder.state_dict():
        names[f"text_encoder/{name}"] = builder.TEXT_PREFIX + builder.ldm_text_key(name)
    return names


def encode_with_diffusers(pipe, prompt: str) -> tuple[list[int], torch.Tensor]:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids).last_hidden_state
    return ids.input_ids[0].tolist(), hidden


@pytest.mark.slow
def test_the_builder_still_writes_the_cached_layout(random_sd15: Path) -> None:
    # the cached file outlives changes to the builder; a change to its names or shapes must not go unseen
    from scripts import make_random_sd15 as builder

    assert builder.planned_layout(builder.parts()) == builder.file_layout(random_sd15)


@pytest.mark.slow
def test_random_sd15_is_recognised(random_sd15: Path) -> None:
    assert describe_checkpoint(random_sd15) == SD1
    require_sd15(random_sd15)


@pytest.fixture(scope="module")
def comfy_probe(random_sd15: Path, comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI's view of the checkpoint: a report and the prompt's conditioning (from a subprocess)."""
    out = tmp_path_factory.mktemp("comfy") / "cond.safetensors"
    result = subprocess.run(
        [sys.executable, str(PROBE), str(random_sd15), PROMPT, str(out)],
        cwd=comfy_dir,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, load_file(str(out))["cond"]


# Runs before the other diffusers tests and asks for `comfy_probe` before `sd15_pipe`, so ComfyUI's copy
# of the model is gone before diffusers loads its own: two ~4-7 GiB processes never overlap.
@pytest.mark.slow
def test_comfyui_loads_the_same_model(comfy_probe, sd15_pipe) -> None:
    report, comfy_cond = comfy_probe
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."):
        assert report[prefix]["n_missing"] == 0 and report[prefix]["n_different"] == 0, report[prefix]

    ids, hidden = encode_with_diffusers(sd15_pipe, PROMPT)
    assert report["token_ids"] == ids
    diff = (comfy_cond - hidden).abs().max().item()
    print(f"text encoder max abs diff ComfyUI vs diffusers: {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.slow
def test_diffusers_loads_every_tensor(sd15_pipe, random_sd15: Path) -> None:
    states = {part: getattr(sd15_pipe, part).state_dict() for part in ("unet", "vae", "text_encoder")}
    names = diffusers_to_file_names(sd15_pipe)
    different = []
    with safe_open(str(random_sd15), framework="pt", device="cpu") as handle:
        file_keys = set(handle.keys())
        for qualified, file_key in names.items():
            part, name = qualified.split("/", 1)
            stored = handle.get_tensor(file_key)
            loaded = states[part][name]
            if stored.numel() != loaded.numel() or not torch.equal(loaded.flatten().half(), stored.flatten()):
                different.append(qualified)
    assert different == []
    assert set(names.values()) == file_keys  # every tensor in the file went somewhere, once
    assert len(names) == len(file_keys)


@pytest.mark.slow
def test_diffusers_pipeline_is_sd15(sd15_pipe) -> None:
    assert sd15_pipe.scheduler.config.prediction_type == "epsilon"
    assert type(sd15_pipe.scheduler).__name__ == "PNDMScheduler"
    assert sd15_pipe.vae.config.scaling_factor == 0.18215
    _ids, hidden = encode_with_diffusers(sd15_pipe, PROMPT)
    assert hidden.shape == (1, 77, 768)
    assert torch.isfinite(hidden).all()
