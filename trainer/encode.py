"""The caching pass: every image through the VAE once (plain and flipped), every caption through the
text encoder once, looked up in and added to the content-keyed cache."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .cache import FileHashes, TensorCache, fingerprint, sha256_file
from .config import RunConfig
from .data import Framing, Item, bucket_for, flip, grey_out, open_image, open_mask, prepare_framed, prepare_mask
from .families import Components, ModelFamily
from .schedule import derive_seed


@dataclass
class Encoded:
    latents: torch.Tensor  # (C, h, w), already scaled by the VAE's scaling factor
    latents_flipped: torch.Tensor | None
    framing: torch.Tensor  # (6,): original size, crop top-left, target size (data.Framing)
    framing_flipped: torch.Tensor | None
    mask: torch.Tensor | None  # (1, h, w) loss weights from the picture's mask; None: every latent counts
    mask_flipped: torch.Tensor | None
    caption: str  # as written (the trigger word included), before any per-step dropout or shuffle
    text: dict[str, torch.Tensor] | None  # the caption's prompt encoding, no batch dimension; None when the
    # captions are encoded every step (a text encoder trains, or the tags are shuffled)


def model_digest(components: Components, cache_root: Path) -> str:
    hashes = FileHashes(cache_root / "file-hashes.json")
    return fingerprint([hashes.digest(p, components.source_hash_prefixes) for p in components.source_hash_inputs])


def encode_dataset(
    cfg: RunConfig,
    family: ModelFamily,
    components: Components,
    items: list[Item],
    device: torch.device,
    progress: Callable[[int, int, int], None],
) -> list[Encoded]:
    """Encode (or fetch from cache) every item. `progress(done, total, hits)` is called per item."""
    data = cfg.data
    digest = model_digest(components, cfg.cache_dir)
    latents_cache = TensorCache(cfg.cache_dir, "latents")
    text_cache = TensorCache(cfg.cache_dir, "text")
    vae = components.vae
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # FLUX's VAE centres its latents as well
    encode_text = not captions_encoded_every_step(cfg, family)
    encoded, hits = [], 0
    for index, item in enumerate(items):
        mask = open_mask(item.mask) if item.mask is not None else None  # read once: greying and loss weights
        image = grey_out(open_image(item.image), mask)
        bucket = bucket_for(image.width, image.height, data)
        image_digest = sha256_file(item.image)
        crop_rng = random.Random(derive_seed(cfg.train.seed, int(_crop_digest(item, image, image_digest)[:15], 16)))
        key_parts = [digest, image_digest, bucket, data.crop, data.random_flip, cfg.train.seed]
        if item.mask is not None:  # the mask greys pixels out and weights the loss: part of the key
            key_parts.append(sha256_file(item.mask))
        key = fingerprint("latents-v2", *key_parts)
        cached = latents_cache.get(key)
        if cached is None:
            pixels, framing = prepare_framed(image, bucket, data.crop, crop_rng if data.crop == "random" else None)
            variants = {"plain": pixels} | ({"flipped": flip(pixels)} if data.random_flip else {})
            cached = {name: (latents - shift) * scaling
                      for name, latents in _encode_images(vae, variants, device).items()}
            cached["framing"] = framing.as_tensor()
            if data.random_flip:
                cached["framing_flipped"] = framing.flipped().as_tensor()
            if mask is not None:
                cached |= _mask_weights(mask, framing, tuple(cached["plain"].shape[-2:]), data.random_flip)
            latents_cache.put(key, cached)
        else:
            hits += 1
        text = _text_encoding(family, components, item.caption, device, digest, text_cache) if encode_text else None
        encoded.append(Encoded(cached["plain"], cached.get("flipped"), cached["framing"],
                               cached.get("framing_flipped"), cached.get("mask"), cached.get("mask_flipped"),
                               item.caption, text))
        progress(index + 1, len(items), hits)
    return encoded


def _crop_digest(item: Item, image: Image.Image, image_digest: str) -> str:
    """What a random crop is drawn from: the file's bytes, or for a masked picture the pixels its mask keeps, so
    that what lies under black cannot move the crop either."""
    if item.mask is None:
        return image_digest
    return hashlib.sha256(image.tobytes()).hexdigest()


def _mask_weights(mask: Image.Image, framing: Framing, latent_size: tuple[int, int], flipped: bool) -> dict:
    weights = prepare_mask(mask, framing, latent_size)
    return {"mask": weights} | ({"mask_flipped": flip(weights)} if flipped else {})


def captions_encoded_every_step(cfg: RunConfig, family: ModelFamily) -> bool:
    """A text encoder that trains, or captions whose tags are shuffled, need encoding at every step (a shuffled
    caption is new nearly every step: a cache of its variants would not be read again)."""
    return bool(family.trained_text_encoders(cfg.lora)) or cfg.data.shuffle_tags


def empty_caption_encoding(
    cfg: RunConfig, family: ModelFamily, components: Components, device: torch.device
) -> dict[str, torch.Tensor]:
    """The encoding of the empty caption, which a dropped caption trains with (cached like any other)."""
    digest = model_digest(components, cfg.cache_dir)
    return _text_encoding(family, components, "", device, digest, TensorCache(cfg.cache_dir, "text"))


def _text_encoding(family: ModelFamily, components: Components, caption: str, device: torch.device,
                   digest: str, text_cache: TensorCache) -> dict[str, torch.Tensor]:
    """One caption's prompt encoding, from the cache or encoded now and added to it."""
    tokens = {prefix: ids[0] for prefix, ids in family.tokenize(components, [caption]).items()}
    text_key = fingerprint("text-v2", family.name, digest, {p: ids.tolist() for p, ids in tokens.items()})
    text = text_cache.get(text_key)
    if text is None:
        encoders = {prefix: encoder.to(device) for prefix, encoder in components.text_encoders.items()}
        with torch.no_grad():
            batch = family.encode_prompt(encoders, {p: ids[None].to(device) for p, ids in tokens.items()})
        text_cache.put(text_key, {name: value[0] for name, value in batch.items()})
        text = text_cache.get(text_key)  # as a later run reads it: fp32, on the CPU
    return text


def _encode_images(vae: torch.nn.Module, variants: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The variants of one picture (plain, flipped) through the VAE as one batch: name -> latents (C, h, w)."""
    vae.to(device)
    with torch.no_grad():
        batch = torch.stack(list(variants.values())).to(device, vae.dtype)
        latents = vae.encode(batch).latent_dist.mode()
    latents = latents.float()
    return dict(zip(variants, latents, strict=True))
