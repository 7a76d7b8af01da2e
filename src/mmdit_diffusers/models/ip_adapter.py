"""SD3.5's IP-Adapter on the MMDiT transformer, in diffusers' weight layout.

An IP-Adapter prompts with an image: `image_proj` (diffusers' `IPAdapterTimeImageProjection`, a timestep-conditioned
resampler) turns the image encoder's features into image-prompt tokens `ip_hidden_states`, and in every double-stream
block the joint attention's processor (diffusers' `SD3IPAdapterJointAttnProcessor2_0`) adds
`scale * attention(image queries -> [image keys; image-prompt keys])` to the image stream before its output
projection. A file holds `image_proj.*` (the resampler) and `ip_adapter.<block>.*` (block `<block>`'s processor).

`MMDiTIPAdapterLoadersMixin` gives the transformer what diffusers' `SD3IPAdapterMixin` (`load_ip_adapter`) calls:
`_load_ip_adapter_weights`; the pipeline side is `mmdit_diffusers.pipelines.ip_adapter`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from diffusers.loaders import SD3Transformer2DLoadersMixin
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.modeling_utils import _LOW_CPU_MEM_USAGE_DEFAULT

from ..errors import InputError
from .attention import MMDiTAttnProcessor

IMAGE_EMBEDS_KEY = "ip_adapter_image_embeds"


class MMDiTIPAdapterAttnProcessor(SD3IPAdapterJointAttnProcessor2_0):
    """diffusers' SD3 IP-Adapter processor (same weights, same numbers), which computes without a text mask: it
    refuses one rather than ignore it. A mask reaches it only from a model trained with masked text
    (`use_text_attention_mask`) whose batch mixes prompts of different lengths; SD3 / SD3.5 weights never pass one."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ip_hidden_states=None,
                 temb=None, **kwargs):
        if attention_mask is not None:
            raise InputError(
                "An IP-Adapter cannot mask text padding (diffusers' SD3 IP-Adapter attention takes no mask), and "
                "this batch needs a mask: its prompts have different text padding. Use one prompt per batch without "
                "classifier-free guidance, prompts of equal length, or a transformer with "
                "use_text_attention_mask=False."
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, None, ip_hidden_states, temb)


class MMDiTIPAdapterLoadersMixin(SD3Transformer2DLoadersMixin):
    """IP-Adapter loading for `MMDiTTransformer2DModel`: diffusers' SD3 loader (the same files, and diffusers'
    image-projection conversion, InstantX's key names included), with block `i`'s processor set on the joint
    attention `transformer_blocks.<i>.attn` (other attentions, such as SD3.5 Medium's `attn2`, keep theirs)."""

    def _convert_ip_adapter_attn_to_diffusers(
        self, state_dict: dict, low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT
    ) -> dict:
        """`ip_adapter.*` weights (without the prefix) -> a processor for every attention of the model: an IP-Adapter
        processor for each joint attention, the current one for the others (the dict `set_attn_processor` takes)."""
        per_block: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            index, _, name = key.partition(".")
            per_block.setdefault(int(index), {})[name] = tensor
        depth = len(self.transformer_blocks)
        if sorted(per_block) != list(range(depth)):
            raise InputError(
                f"The IP-Adapter has processor weights for blocks {sorted(per_block)}; this transformer has {depth} "
                f"double-stream blocks (0..{depth - 1}). The adapter was made for another model."
            )
        processors = self.attn_processors
        head_dim = self.config.hidden_size // self.config.num_heads
        for index, weights in per_block.items():
            with torch.device("meta") if low_cpu_mem_usage else nullcontext():
                processor = MMDiTIPAdapterAttnProcessor(
                    hidden_size=self.config.hidden_size,
                    ip_hidden_states_dim=self.config.hidden_size,
                    head_dim=head_dim,
                    timesteps_emb_dim=weights["norm_ip.linear.weight"].shape[1],
                )
            processor.load_state_dict(weights, strict=True, assign=low_cpu_mem_usage)
            processors[f"transformer_blocks.{index}.attn.processor"] = processor.to(self.device, self.dtype)
        return processors

    def _load_ip_adapter_weights(self, state_dict: dict, low_cpu_mem_usage: bool = _LOW_CPU_MEM_USAGE_DEFAULT) -> None:
        """Set the IP-Adapter processors and the image projection from `state_dict` = `{"image_proj": {...},
        "ip_adapter": {...}}` (the file's two prefixes removed), as SD3's loader does."""
        self.set_attn_processor(self._convert_ip_adapter_attn_to_diffusers(state_dict["ip_adapter"], low_cpu_mem_usage))
        image_proj = self._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"], low_cpu_mem_usage)
        unfilled = [name for name, tensor in image_proj.state_dict().items() if tensor.is_meta]
        if unfilled:  # diffusers builds a 4-layer resampler whatever the file holds
            more = " ..." if len(unfilled) > 6 else ""
            raise InputError(f"The IP-Adapter's `image_proj` weights do not fill diffusers' "
                             f"IPAdapterTimeImageProjection: missing {unfilled[:6]}{more}.")
        self.image_proj = image_proj.to(self.device, self.dtype)

    def _unload_ip_adapter_weights(self) -> None:
        """Remove the image projection and give each IP-Adapter attention our default processor back."""
        self.image_proj = None
        self.set_attn_processor({
            name: MMDiTAttnProcessor() if isinstance(processor, SD3IPAdapterJointAttnProcessor2_0) else processor
            for name, processor in self.attn_processors.items()
        })

    def _project_ip_adapter_image_embeds(self, attention_kwargs: dict[str, Any], timestep: torch.Tensor) -> None:
        """As SD3's forward: the image-encoder features `attention_kwargs["ip_adapter_image_embeds"]` are replaced, in
        the forward's own copy of `joint_attention_kwargs`, by the processors' inputs `ip_hidden_states` and `temb`
        (`image_proj` at this call's `timestep`)."""
        if IMAGE_EMBEDS_KEY not in attention_kwargs:
            return
        if getattr(self, "image_proj", None) is None:
            raise InputError(
                f"`joint_attention_kwargs[{IMAGE_EMBEDS_KEY!r}]` needs an IP-Adapter: load one first "
                "(`pipe.load_ip_adapter(...)`)."
            )
        ip_hidden_states, temb = self.image_proj(attention_kwargs.pop(IMAGE_EMBEDS_KEY), timestep)
        attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=temb)
