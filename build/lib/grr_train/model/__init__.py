"""grr_train.model: the CoCa models (Baseline and GRR), presets and summaries.

Imports nothing from data or training code, so a checkpoint's model can be built on its own.
"""

from grr_train.model.coca import CoCa, CocaOutput, DecodeCache, build_model
from grr_train.model.compat import upgrade_state_dict
from grr_train.model.config import PRESETS, ModelConfig, get_config

__all__ = ["CoCa", "CocaOutput", "DecodeCache", "ModelConfig", "PRESETS", "build_model", "get_config",
           "upgrade_state_dict"]
