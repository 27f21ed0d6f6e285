"""The SDXL family on the tiny SDXL-architecture model (tests/tiny_model.py): real `accelerate launch` runs.

What SDXL adds over SD 1.5 and what each test holds it to: two text encoders (penultimate hidden states side
by side, the second's pooled output) encoded as diffusers' SDXL pipeline encodes them; each picture's
original size, crop and bucket as the UNet's size conditioning, mirrored for the flipped picture; kohya's
SGM-named keys (`lora_unet_input_blocks_...`, `lora_te1_`, `lora_te2_`) that diffusers' SDXL loader maps onto
every adapted module; and the proofs the SD 1.5 family passes (it learns, two processes equal one, a killed
run resumes to the same LoRA).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import draw_image, read_events, run_trainer, tiny_config
from safetensors import safe_open
from test_trainer import (
    assert_ok,
    assert_resumed_run_matches_uninterrupted,
    assert_two_processes_match_one,
)

from trainer.config import ModelConfig, parse_config
from trainer.data import Framing, prepare_framed
from trainer.families import family_for, get_family

SIZE = 64


def pipeline(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)


def lora_layer_count(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def denoising_loss(pipe, data_folder: Path) -> float:
    """Mean denoising MSE of the pipeline's UNet on the two training pictures, over fixed (noise, t) pairs,
    conditioned as diffusers' SDXL pipeline conditions it (its encode_prompt, its time ids)."""
    g = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for name in ("red", "blue"):
            from trainer.data import open_image

            pixels, _ = prepare_framed(open_image(data_folder / f"{name}.png"), (SIZE, SIZE), "center", None)
            latents = pipe.vae.encode(pixels[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
            caption = (data_folder / f"{name}.txt").read_text()
            embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
            time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=embeds.dtype)
            for _ in range(16):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.randint(0, 1000, (1,), generator=g)
                noisy = pipe.scheduler.add_noise(latents, noise, t)
                pred = pipe.unet(noisy, t, encoder_hidden_states=embeds,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


# ---- what the family reads and computes ------------------------------------------------------------


def test_the_family_is_read_from_the_model(tiny_sdxl_dir, tiny_model_dir) -> None:
    assert family_for(ModelConfig(path=str(tiny_sdxl_dir))).name == "sdxl"
    assert family_for(ModelConfig(path=str(tiny_model_dir))).name == "sd15"
    with pytest.raises(ValueError, match="is an SDXL model, but model.family is 'sd15'"):
        family_for(ModelConfig(path=str(tiny_sdxl_dir), family="sd15"))


def test_prompt_encoding_equals_the_diffusers_sdxl_pipeline(tiny_sdxl_dir) -> None:
    family = get_family("sdxl")
    components = family.load(ModelConfig(path=str(tiny_sdxl_dir)), torch.float32)
    caption = "lfstyle, a red circle, flat colour"
    ours = family.encode_prompt(components.text_encoders, family.tokenize(components, [caption]))
    embeds, _, pooled, _ = pipeline(tiny_sdxl_dir).encode_prompt(caption, device="cpu",
                                                                  do_classifier_free_guidance=False)
    assert ours["hidden"].shape == embeds.shape == (1, 77, 80)
    assert torch.allclose(ours["hidden"], embeds, atol=1e-6) and torch.allclose(ours["pooled"], pooled, atol=1e-6)
    tokens = family.tokenize(components, [caption])
    # the second encoder pads with "!" (id 0) after the end token, the first with the end token itself
    assert tokens["lora_te2"][0, -1] == 0 and tokens["lora_te1"][0, -1] == 49407


def test_framing_follows_the_crop_and_mirrors_for_the_flip() -> None:
    from PIL import Image

    image = Image.new("RGB", (300, 200), (10, 20, 30))
    pixels, framing = prepare_framed(image, (128, 128), "center", None)
    assert pixels.shape == (3, 128, 128)
    # resized to cover 128 x 128: 192 x 128, the crop centred 32 px from the left
    assert framing == Framing(original=(200, 300), crop_top_left=(0, 32), target=(128, 128), resized_width=192)
    assert framing.flipped().crop_top_left == (0, 192 - 32 - 128)
    assert framing.as_tensor().tolist() == [200, 300, 0, 32, 128, 128]


def test_kohya_names_are_sgm_names_comfyui_and_kohya_read() -> None:
    from trainer.families.sdxl import sgm_path

    config = json.loads((Path(__file__).parent.parent / "trainer/families/sdxl_config/unet/config.json").read_text())
    unet = type("Config", (), config)
    assert sgm_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", unet) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_path("down_blocks.0.downsamplers.0.conv", unet) == "input_blocks.3.0.op"
    assert sgm_path("mid_block.resnets.1.time_emb_proj", unet) == "middle_block.2.emb_layers.1"
    assert sgm_path("up_blocks.0.upsamplers.0.conv", unet) == "output_blocks.2.2.conv"
    assert sgm_path("up_blocks.1.resnets.2.conv_shortcut", unet) == "output_blocks.5.0.skip_connection"
    assert sgm_path("up_blocks.2.resnets.0.conv1", unet) == "output_blocks.6.0.in_layers.2"


def test_each_text_encoder_has_its_own_learning_rate() -> None:
    family = get_family("sdxl")
    cfg = parse_config({"run_dir": "r", "model": {"path": "m"}, "data": {"folder": "d"},
                        "lora": {"train_text_encoder": False, "train_text_encoder_2": True},
                        "train": {"learning_rate": 1e-4, "text_encoder_learning_rate": 5e-5,
                                  "text_encoder_2_learning_rate": 2e-5},
                        "output": {"lora_path": "x.safetensors"}})
    assert family.trained_text_encoders(cfg.lora) == ["lora_te2"]
    assert [family.learning_rate(p, cfg.train) for p in ("lora_unet", "lora_te1", "lora_te2")] == [1e-4, 5e-5, 2e-5]
    with pytest.raises(ValueError, match="SD 1.5 has one text encoder"):
        get_family("sd15").trained_text_encoders(cfg.lora)


# ---- real runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoders", [(False, False), (True, True)], ids=["unet", "unet+both-encoders"])
def test_it_learns_and_diffusers_adapts_every_module(tmp_path, tiny_sdxl_dir, two_image_folder, encoders) -> None:
    first, second = encoders
    cfg = tiny_config(tmp_path / "run", tiny_sdxl_dir, two_image_folder,
                      lora={"train_text_encoder": first, "train_text_encoder_2": second, "targets": "all"},
                      train={"max_steps": 60, "learning_rate": 1e-2})
    assert_ok(run_trainer(cfg))
    lora = Path(cfg["output"]["lora_path"])
    with safe_open(str(lora), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    stems = {key.split(".")[0] for key in keys}
    assert any(stem.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for stem in stems)
    assert not any("down_blocks" in stem for stem in stems)  # SGM names only, as kohya writes SDXL
    assert any(stem.startswith("lora_te1_text_model_encoder_layers_0_") for stem in stems) == first
    assert any(stem.startswith("lora_te2_text_model_encoder_layers_0_") for stem in stems) == second
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(metadata["lora_foundry.config"])["model"]["family"] == "sdxl"

    base = pipeline(tiny_sdxl_dir)
    before = denoising_loss(base, two_image_folder)
    tuned = pipeline(tiny_sdxl_dir)
    tuned.load_lora_weights(str(lora.parent), weight_name=lora.name)
    adapted = lora_layer_count(tuned.unet) + lora_layer_count(tuned.text_encoder) + \
        lora_layer_count(tuned.text_encoder_2)
    assert adapted == len(stems), f"diffusers adapted {adapted} of the file's {len(stems)} modules"
    after = denoising_loss(tuned, two_image_folder)
    assert after <= 0.7 * before, f"loss {before:.4f} -> {after:.4f}: not 30% lower"


def test_two_processes_match_one(tmp_path, tiny_sdxl_dir, two_image_folder) -> None:
    assert_two_processes_match_one(tmp_path, tiny_sdxl_dir, two_image_folder, data={"random_flip": True})


def test_killed_run_resumes_to_the_same_lora(tmp_path, tiny_sdxl_dir, two_image_folder) -> None:
    assert_resumed_run_matches_uninterrupted(tmp_path, tiny_sdxl_dir, two_image_folder,
                                             lora={"train_text_encoder_2": True})


def test_a_portrait_trains_and_samples_at_its_own_bucket(tmp_path, tiny_sdxl_dir) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    draw_image(folder / "tall.png", (128, 256), (200, 40, 40))
    (folder / "tall.txt").write_text("a tall red picture")
    cfg = tiny_config(tmp_path / "run", tiny_sdxl_dir, folder, data={"resolution": 128, "bucket_step": 32},
                      train={"batch_size": 1, "max_steps": 2}, sample={"prompts": ["a red circle"], "steps": 2})
    assert_ok(run_trainer(cfg))
    events = read_events(tmp_path / "run")
    start = next(e for e in events if e["type"] == "start")
    ((bucket, count),) = start["buckets"].items()
    width, height = map(int, bucket.split("x"))
    assert start["family"] == "SDXL" and count == 1 and width < height
    (sample,) = [e for e in events if e["type"] == "sample"]
    assert Path(sample["path"]).is_file()
