"""Official checkpoints -> starkit directories: ``starkit convert {star-t2i,star-sampler-head,var,var-vae}``.

Python::

    from starkit.convert import convert_star_t2i, add_star_sampler_head, convert_var, convert_var_vae
    convert_star_t2i("star-1024.pth", "vae_ch160v4096z32.pth", "stable-diffusion-2-1", "models/star-1024")
"""
from .common import CheckpointMismatchError, load_state_dict
from .loading import ModelParts, load_parts
from .star import MissingSamplerHeadWarning, add_star_sampler_head, convert_star_t2i, map_star_keys
from .var import convert_var, convert_var_vae, map_var_keys

__all__ = ["CheckpointMismatchError", "MissingSamplerHeadWarning", "ModelParts", "add_star_sampler_head",
           "convert_star_t2i", "convert_var", "convert_var_vae", "load_parts", "load_state_dict", "map_star_keys",
           "map_var_keys"]
