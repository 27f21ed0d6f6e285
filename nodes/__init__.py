"""The pack's ComfyUI nodes (V3 schema). Every node id starts with LoraFoundry."""

from .compare import LoraFoundryCompareGrid
from .dataset import LoraFoundryDataset
from .load_lora import LoraFoundryLoadLora
from .lora_config import LoraFoundryLoraConfig
from .train import LoraFoundryTrain

NODES = [LoraFoundryDataset, LoraFoundryLoraConfig, LoraFoundryTrain, LoraFoundryLoadLora, LoraFoundryCompareGrid]
