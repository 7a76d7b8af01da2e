"""Foreign checkpoints <-> MMDiT, as functions on configs and state dicts (this package never imports the model)."""

from .flux import (
    flux_config_to_mmdit,
    flux_module_name_to_mmdit,
    flux_state_dict_to_mmdit,
    flux_tensor_to_mmdit,
    is_flux_module_name,
    mmdit_config_to_flux,
    mmdit_module_name_to_flux,
    mmdit_state_dict_to_flux,
)
from .legacy import is_legacy_layout, legacy_module_name_to_current, legacy_state_dict_to_current
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
    "flux_config_to_mmdit",
    "flux_module_name_to_mmdit",
    "flux_state_dict_to_mmdit",
    "flux_tensor_to_mmdit",
    "is_flux_module_name",
    "is_legacy_layout",
    "legacy_module_name_to_current",
    "legacy_state_dict_to_current",
    "is_sd3_module_name",
    "mmdit_config_to_flux",
    "mmdit_config_to_sd3",
    "mmdit_module_name_to_flux",
    "mmdit_module_name_to_sd3",
    "mmdit_state_dict_to_flux",
    "mmdit_state_dict_to_sd3",
    "sd3_config_to_mmdit",
    "sd3_module_name_to_mmdit",
    "sd3_state_dict_to_mmdit",
    "sd3_tensor_to_mmdit",
]
