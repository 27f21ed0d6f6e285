"""The LoRA file: every key is read back by diffusers and by the pinned ComfyUI with the trained delta.

The LoRA weights are filled with seeded random values (gaussian init leaves lora_B at zero, where every
check would pass trivially) and alpha != rank, so a scaling mistake shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from adapter_cases import ADAPTERS, CONV_ADAPTERS, merged_deltas, randomize
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tiny_model import build_scheduler, build_text_encoder, build_unet, build_vae

import trainer.lora_file as lora_file
from trainer.adapters import adapter_layers, peft_config
from trainer.config import LoraConfig, ModelConfig, RunConfig
from trainer.families.sd15 import SD15
from trainer.lora_file import (
    kohya_state_dict,
    read_lora_file,
    save_lora_file,
)

COMFYUI_DIR = Path(__file__).absolute().parents[1] / ".runtime" / "ComfyUI"
TOKENIZER_DIR = COMFYUI_DIR / "comfy" / "sd1_tokenizer"
RANK, ALPHA = 4, 2.0
TOLERANCE = 1e-5
# (unet preset, train the text encoder too)
CASES = [("attention", False), ("attention", True), ("attention_ff", True), ("all", True)]
CASE_IDS = [f"{preset}{'+te' if te else ''}" for preset, te in CASES]
# kohya's networks/lora.py: UNET_TARGET_REPLACE_MODULE + UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 (LoCon, conv_dim
# set), and TEXT_ENCODER_TARGET_REPLACE_MODULE
KOHYA_UNET_LOCON = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass
class Module:
    part: str  # "unet" or "text_encoder"
    path: str  # module path in the diffusers UNet / transformers CLIPTextModel
    base: torch.Tensor  # the frozen weight
    delta: torch.Tensor  # what the LoRA adds to it, as peft computes it


@dataclass
class Trained:
    file: Path
    modules: dict[str, Module]  # by kohya name


def _peft_config(targets: list[str] | str) -> PeftLoraConfig:
    return PeftLoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets)


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def _fill_random(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}  # SD 1.5's kohya prefixes


def _kohya_name(part: str, path: str) -> str:
    # the spec: the diffusers / original CLIP module path, "." → "_" (transformers 5 dropped `text_model.`)
    if part == "text_encoder" and not path.startswith("text_model."):
        path = f"text_model.{path}"
    return f"{PREFIXES[part]}_{path.replace('.', '_')}"


def _modules(part: str, model: torch.nn.Module) -> dict[str, Module]:
    return {
        _kohya_name(part, path): Module(
            part, path, layer.base_layer.weight.detach().clone(), layer.get_delta_weight("default").detach()
        )
        for path, layer in _lora_layers(model).items()
    }


def _train(preset: str, with_text_encoder: bool, folder: Path) -> Trained:
    unet = build_unet()
    unet.add_adapter(_peft_config(SD15.targets("lora_unet", preset)))
    _fill_random(unet, seed=10)
    modules = _modules("unet", unet)
    text_encoder = None
    if with_text_encoder:
        # transformers 5's add_adapter wants peft >= 0.22; peft's own injection works with any version
        text_encoder = inject_adapter_in_model(
            _peft_config(SD15.targets("lora_te", preset)), build_text_encoder()
        )
        _fill_random(text_encoder, seed=11)
        modules |= _modules("text_encoder", text_encoder)
    parts = {"lora_unet": unet} | ({"lora_te": text_encoder} if text_encoder is not None else {})
    tensors = kohya_state_dict(parts, SD15, alpha=ALPHA)
    file = folder / f"{preset}_{with_text_encoder}.safetensors"
    save_lora_file(file, tensors, {"ss_network_alpha": str(ALPHA)}, overwrite=False)
    return Trained(file, modules)


# case -> (target preset, train the text encoder too, adapter settings), through the trainer's own adapters
ADAPTER_CASES = {
    "loha+te": ("attention", True, ADAPTERS["loha"]),
    "lokr": ("attention_ff", False, ADAPTERS["lokr"]),
    "lokr_split+te": ("attention", True, ADAPTERS["lokr_split"]),
    "dora+te": ("attention_ff", True, ADAPTERS["dora"]),
    # convolutions: LoCon adds them to a preset; "all" holds them for every adapter type
    "locon": ("attention", False, CONV_ADAPTERS["locon"]),
    "locon_dora": ("attention", False, CONV_ADAPTERS["locon_dora"]),
    "loha_conv": ("all", False, CONV_ADAPTERS["loha_conv"]),
    "lokr_conv": ("all", False, CONV_ADAPTERS["lokr_conv"]),
}


def _train_adapter(preset: str, with_text_encoder: bool, settings: dict, path: Path) -> Trained:
    lo = LoraConfig(rank=RANK, alpha=ALPHA, targets=preset, train_text_encoder=with_text_encoder, **settings)
    parts = {"lora_unet": build_unet()} | ({"lora_te": build_text_encoder()} if with_text_encoder else {})
    for prefix, model in parts.items():
        inject_adapter_in_model(peft_config(lo, SD15.adapter_targets(prefix, lo)), model)
    randomize(parts, seed=12)
    save_lora_file(path, kohya_state_dict(parts, SD15, alpha=ALPHA), {}, overwrite=False)
    part_names = {prefix: part for part, prefix in PREFIXES.items()}
    bases = {SD15.kohya_name(prefix, model, layer_path): (part_names[prefix], layer_path,
                                                          layer.get_base_layer().weight.detach().clone())
             for prefix, model in parts.items() for layer_path, layer in adapter_layers(model, "default")}
    deltas = merged_deltas(parts, SD15)  # (after the bases: merging and unmerging moves them by rounding)
    return Trained(path, {name: Module(*bases[name], delta) for name, delta in deltas.items()})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, comfy_probe) -> dict:
    # comfy_probe only so that the ComfyUI subprocess starts first and its imports overlap these tests
    folder = tmp_path_factory.mktemp("loras")
    return {case: _train(*case, folder) for case in CASES} | {
        case: _train_adapter(*settings, folder / f"{case}.safetensors") for case, settings in ADAPTER_CASES.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# --- the tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_file_holds_down_up_alpha_per_module(trained, case):
    t = trained[case]
    tensors, _ = read_lora_file(t.file)
    expected = {
        f"{name}.{suffix}" for name in t.modules for suffix in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(tensors) == expected
    for name, module in t.modules.items():
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.dtype == up.dtype == alpha.dtype == torch.float32
        assert alpha.shape == () and alpha.item() == ALPHA
        assert down.shape[0] == up.shape[1] == RANK
        assert up.shape[0] == module.base.shape[0] and down.shape[1] == module.base.shape[1]
        # a conv LoRA: down carries the kernel, up is 1x1
        assert down.shape[2:] == module.base.shape[2:] and up.shape[2:] == (1,) * (module.base.dim() - 2)
        kohya_delta = (up.flatten(1) @ down.flatten(1)).reshape(module.base.shape) * alpha / RANK
        assert _max_diff(kohya_delta, module.delta) < TOLERANCE
        assert module.delta.abs().max() > 1e-3  # the check above is not trivial


def _kohya_selects(part: str, model: torch.nn.Module, blocks: tuple[str, ...]) -> set[str]:
    """kohya's module rule (networks/lora.py create_modules): every Linear and Conv2d inside a module whose class
    is one of `blocks`, named by its full path."""
    names = set()
    for path, module in model.named_modules():
        if type(module).__name__ in blocks:
            for child, layer in module.named_modules():
                if type(layer).__name__ in ("Linear", "Conv2d"):
                    names.add(_kohya_name(part, f"{path}.{child}"))
    return names


def _kohya_all_preset(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> set[str]:
    return _kohya_selects("unet", unet, KOHYA_UNET_LOCON) | _kohya_selects("text_encoder", text_encoder, KOHYA_TE)


def test_all_preset_is_kohyas_locon_module_set(trained):
    """"all" adapts exactly what kohya's LoCon (conv_dim set) adapts, so every loader reads every tensor; that
    ComfyUI maps each of these keys is test_comfyui_loads_every_key_with_the_trained_delta[all+te]."""
    modules = trained[("all", True)].modules
    assert set(modules) == _kohya_all_preset(build_unet(), build_text_encoder())
    outside = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding")
    assert not [name for name in modules if name.startswith(outside)]
    assert any(m.base.dim() == 4 and m.base.shape[-1] == 3 for m in modules.values())  # the 3x3 convs


def test_trainer_all_preset_on_the_tiny_model(tiny_model_dir):
    """The trainer's own path: the tiny model loaded from its folder, adapters added as a run adds them."""
    from trainer.loop import add_lora

    components = SD15.load(ModelConfig(path=str(tiny_model_dir)), torch.float32)
    expected = _kohya_all_preset(components.denoiser, components.text_encoders["lora_te"])  # before adapters wrap
    cfg = RunConfig(lora=LoraConfig(rank=RANK, alpha=ALPHA, targets="all", train_text_encoder=True))
    add_lora(cfg, SD15, components)
    tensors = kohya_state_dict(components.parts(), SD15, alpha=ALPHA)
    assert {key.split(".")[0] for key in tensors} == expected


def test_rejects_what_kohya_cannot_hold():
    unet = build_unet()
    with pytest.raises(ValueError, match="no LoRA layers"):
        kohya_state_dict({"lora_unet": unet}, SD15, alpha=ALPHA)
    unet.add_adapter(_peft_config(["to_q"]))
    with pytest.raises(ValueError, match="differs from the configured alpha"):
        kohya_state_dict({"lora_unet": unet}, SD15, alpha=ALPHA * 2)
    rslora = build_unet()
    rslora.add_adapter(PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q"], use_rslora=True))
    with pytest.raises(ValueError, match="use_rslora"):
        kohya_state_dict({"lora_unet": rslora}, SD15, alpha=ALPHA)
    olora = build_unet()
    olora.add_adapter(
        PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q"], init_lora_weights="olora")
    )
    with pytest.raises(ValueError, match="changes the base weights"):
        kohya_state_dict({"lora_unet": olora}, SD15, alpha=ALPHA)


# --- diffusers -----------------------------------------------------------------------------------------


def _fresh_pipeline():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True),
        unet=build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_diffusers_load_lora_weights_gives_the_trained_delta(trained, case):
    t = trained[case]
    pipe = _fresh_pipeline()
    pipe.load_lora_weights(str(t.file))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    loaded = {(part, path) for part, model in parts.items() for path in _lora_layers(model)}
    assert loaded == {(m.part, m.path) for m in t.modules.values()}

    pipe.fuse_lora(components=list(parts), lora_scale=1.0)
    worst = 0.0
    for module in t.modules.values():
        fused = _weight(parts[module.part].get_submodule(module.path))
        assert _max_diff(fused.detach() - module.base, module.delta) < TOLERANCE, module.path
        worst = max(worst, _max_diff(fused.detach() - module.base, module.delta))
    print(f"diffusers {case}: {len(t.modules)} modules, max abs diff {worst:.3g}")


@pytest.mark.parametrize("case", ["locon", "loha+te", "lokr", "dora+te"])
def test_what_diffusers_makes_of_each_adapter_type(trained, case, caplog):
    """As the README's adapter table says: diffusers loads LoCon with its trained delta, refuses LoHa and LoKr
    files outright, and loads a DoRA file as its LoRA part only, with a warning (its kohya reader drops
    `dora_scale`)."""
    t = trained[case]
    pipe = _fresh_pipeline()
    if case in ("loha+te", "lokr"):
        with pytest.raises(ValueError):
            pipe.load_lora_weights(str(t.file))
        return
    pipe.load_lora_weights(str(t.file))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    pipe.fuse_lora(components=list(parts), lora_scale=1.0)
    worst = max(_max_diff(_weight(parts[m.part].get_submodule(m.path)).detach() - m.base, m.delta)
                for m in t.modules.values())
    if case == "locon":
        assert worst < TOLERANCE
    else:
        assert worst > 100 * TOLERANCE and "dora_scale" in caplog.text


# --- ComfyUI -------------------------------------------------------------------------------------------

PROBE = Path(__file__).absolute().parent / "comfy_lora_probe.py"
# The tiny UNet in ComfyUI's unet_config form; the probe returns what ComfyUI's own detection makes of it.
TINY_COMFY_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
BOGUS_KEY = "lora_unet_no_such_layer.lora_down.weight"


def _base_weights() -> dict[str, torch.Tensor]:
    unet = {f"unet.{k}": v for k, v in build_unet().state_dict().items()}
    # checkpoints (and transformers 4) name the CLIP weights text_model.*; transformers 5 drops the prefix
    te = {
        f"text_encoder.{k if k.startswith('text_model.') else 'text_model.' + k}": v
        for k, v in build_text_encoder().state_dict().items()
    }
    return {k: v.contiguous() for k, v in (unet | te).items()}


def _clip_config() -> dict:
    config = build_text_encoder().config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")
    return {key: getattr(config, key) for key in keys}


def _with_bogus_key(source: Path, dest: Path) -> Path:
    tensors, metadata = read_lora_file(source)
    tensors[BOGUS_KEY] = torch.zeros(RANK, 4)
    save_lora_file(dest, tensors, metadata, overwrite=False)
    return dest


@pytest.fixture(scope="module")
def comfy_probe():
    """comfy_lora_probe.py, started at once: importing ComfyUI is most of its run time."""
    if not (COMFYUI_DIR / "comfy" / "lora.py").is_file():
        yield None
        return
    process = subprocess.Popen(
        [sys.executable, str(PROBE)],
        cwd=COMFYUI_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    yield process
    if process.poll() is None:  # the ComfyUI tests were not selected
        process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def comfy_report(trained, comfy_probe, tmp_path_factory) -> dict:
    """What ComfyUI made of every case's file (and of one with a key ComfyUI cannot place)."""
    if comfy_probe is None:
        pytest.fail(f"ComfyUI not found at {COMFYUI_DIR}: run scripts/setup.sh")
    folder = tmp_path_factory.mktemp("comfy")
    save_file(_base_weights(), str(folder / "base.safetensors"))
    loras = {case_id: str(trained[case].file) for case_id, case in zip(CASE_IDS, CASES, strict=True)}
    loras |= {case: str(trained[case].file) for case in ADAPTER_CASES}
    loras["bogus"] = str(_with_bogus_key(trained[CASES[0]].file, folder / "bogus.safetensors"))
    request = {
        "unet_config": TINY_COMFY_UNET,
        "clip_config": _clip_config(),
        "base": str(folder / "base.safetensors"),
        "loras": loras,
        "out_dir": str(folder),
    }
    _, stderr = comfy_probe.communicate(json.dumps(request), timeout=300)
    assert comfy_probe.returncode == 0, stderr[-4000:]
    report = json.loads((folder / "report.json").read_text())
    report["tensors"] = {case: load_file(str(folder / f"{case}.safetensors")) for case in loras}
    return report


def test_comfyui_sees_the_tiny_models_as_intended(comfy_report):
    assert comfy_report["unet_config"] == TINY_COMFY_UNET
    assert comfy_report["clip_load"] == {"missing": ["text_projection.weight"], "unexpected": []}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_comfyui_loads_every_key_with_the_trained_delta(trained, comfy_report, case):
    assert_comfyui_applies(trained[case], comfy_report, CASE_IDS[CASES.index(case)])


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_comfyui_applies_each_adapter_type_exactly(trained, comfy_report, case):
    assert_comfyui_applies(trained[case], comfy_report, case)


def assert_comfyui_applies(t: Trained, comfy_report: dict, case_id: str) -> None:
    """ComfyUI places every module of the file on the layer peft trained, uses every key, and changes each
    weight by the trained delta."""
    report, tensors = comfy_report["loras"][case_id], comfy_report["tensors"][case_id]
    assert report["warnings"] == [] and report["unconsumed"] == []
    assert set(report["key_map"]) == set(t.modules)
    assert len(report["patched"]) == len(t.modules)
    assert set(report["patched"]) == set(report["key_map"].values())
    worst = 0.0
    for name, module in t.modules.items():
        # ComfyUI's key for the name resolves to the very layer peft trained: the same frozen weight
        assert torch.equal(tensors[f"{name}.base"], module.base), f"{name} → {report['key_map'][name]}"
        worst = max(worst, _max_diff(tensors[f"{name}.delta"], module.delta))
    assert worst < TOLERANCE
    print(f"ComfyUI {case_id}: {len(t.modules)} patches, max abs diff {worst:.3g}")


def test_comfyui_reports_a_key_it_cannot_place(comfy_report):
    # the probe's leftover-key detection works: the one key no layer matches is reported
    assert comfy_report["loras"]["bogus"]["unconsumed"] == [BOGUS_KEY]


# --- the atomic write ----------------------------------------------------------------------------------


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"lora_unet_x.alpha": torch.tensor(value)}


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_existing_file_without_overwrite_raises_before_writing(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    save_lora_file(path, _tensors(1.0), {"a": "1"}, overwrite=False)
    before = path.read_bytes()

    def no_serializing(*args, **kwargs):
        raise AssertionError("serialized although the file exists")

    monkeypatch.setattr(lora_file, "safetensors_bytes", no_serializing)
    with pytest.raises(FileExistsError, match="out.safetensors"):
        save_lora_file(path, _tensors(2.0), {"a": "2"}, overwrite=False)
    assert path.read_bytes() == before
    assert not _temp_files(tmp_path)


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "out.safetensors"
    save_lora_file(path, _tensors(1.0), {"a": "1"}, overwrite=False)
    save_lora_file(path, _tensors(2.0), {"a": "2"}, overwrite=True)
    tensors, metadata = read_lora_file(path)
    assert tensors["lora_unet_x.alpha"].item() == 2.0 and metadata == {"a": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_temp_file_is_hidden_in_the_same_folder(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(lora_file.os, "replace", recording_replace)
    save_lora_file(tmp_path / "sub" / "out.safetensors", _tensors(1.0), {}, overwrite=False)
    ((src, dst),) = renames
    assert src.parent == dst.parent == tmp_path / "sub"
    assert src.name.startswith(".") and src.name.endswith(".tmp")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "out.safetensors"
    save_lora_file(path, _tensors(1.0), {"a": "1"}, overwrite=False)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_file.os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(path, _tensors(2.0), {"a": "2"}, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not _temp_files(tmp_path)
