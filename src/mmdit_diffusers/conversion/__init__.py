"""Foreign checkpoints <-> MMDiT, as functions on configs and state dicts (this package never imports the model)."""

from .sd3 import (
    is_sd3_module_name,
    mmdit_config_to_sd3,
    mmdit_module_name_to_sd3,
    mmdit_state_dict_to_sd3,
    sd3_config_to_mmdit,
    sd3_module_name_to_mmdit,
    sd3_state_dict_to_mmdit,
    sd3_tensor_to_mmdit,
)

__all__ = [
    "is_sd3_module_name",
    "mmdit_config_to_sd3",
    "mmdit_module_name_to_sd3",
    "mmdit_state_dict_to_sd3",
    "sd3_config_to_mmdit",
    "sd3_module_name_to_mmdit",
    "sd3_state_dict_to_mmdit",
    "sd3_tensor_to_mmdit",
]
