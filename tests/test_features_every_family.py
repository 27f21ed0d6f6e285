"""The training features on every family's tiny model: an adapter type, an optimizer, the caption tricks and
loss masks together train through the real trainer, and the file says what it holds. The exact checks of each
feature are in their own modules (test_adapter_training, test_optimizers, test_captions, test_masks, and the
ComfyUI probes of each family); this is the plumbing of each family's own text encoding, latents and writer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_events, run_trainer, tiny_config
from safetensors import safe_open
from test_masks import masked_folder
from test_trainer import assert_ok

# every adapter type and optimizer appears in one of them
RUNS = {
    "loha+schedulefree": ({"adapter": "loha"}, {"optimizer": "adamw_schedulefree", "learning_rate": 1e-3}),
    "dora+prodigy": ({"dora": True}, {"optimizer": "prodigy", "learning_rate": 1.0}),
    "lokr+adafactor": ({"adapter": "lokr", "lokr_factor": 4}, {"optimizer": "adafactor", "lr_scheduler": "adafactor"}),
}
CAPTIONS = {"trigger_word": "zxq", "caption_dropout": 0.5, "shuffle_tags": True, "random_flip": True}
TENSOR_KIND = {"loha+schedulefree": ".hada_w1_a", "dora+prodigy": ".dora_scale", "lokr+adafactor": ".lokr_w1"}


def model_section(request: pytest.FixtureRequest, family: str) -> tuple[Path, dict]:
    if family == "sd15":
        return request.getfixturevalue("tiny_model_dir"), {}
    if family == "sdxl":
        return request.getfixturevalue("tiny_sdxl_dir"), {}
    tiny = request.getfixturevalue("tiny_flux" if family == "flux" else "tiny_zimage")
    return Path(tiny["model"]["path"]), dict(tiny["model"])


# one run per family (the suite's time): each adapter type and optimizer on at least one DiT and one UNet
FAMILY_RUNS = {"sd15": "lokr+adafactor", "sdxl": "loha+schedulefree", "flux": "dora+prodigy",
               "zimage": "loha+schedulefree"}


@pytest.mark.parametrize(("family", "run"), list(FAMILY_RUNS.items()))
def test_features_train_together_on_every_family(tmp_path, request, family, run) -> None:
    path, model = model_section(request, family)
    lora, train = RUNS[run]
    data = masked_folder(tmp_path / "data", None)
    cfg = tiny_config(tmp_path / "run", path, data, lora=lora, train={"max_steps": 3, **train}, data=CAPTIONS,
                      **({"model": model} if model else {}))
    assert_ok(run_trainer(cfg))
    start = next(e for e in read_events(tmp_path / "run") if e["type"] == "start")
    assert start["masked_images"] == 2
    with safe_open(cfg["output"]["lora_path"], "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert any(key.endswith(TENSOR_KIND[run]) for key in keys)
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_shuffle_caption"] == "True"
