"""Our blocks and attention processors in diffusers' hook registries.

diffusers' cache hooks (First Block Cache, LayerSkip, ...) read a block's inputs and outputs through
`TransformerBlockRegistry`, and LayerSkip's `skip_attention` asks `AttentionProcessorRegistry` what a skipped
attention returns. Our entries are written when a model is built (`MMDiTTransformer2DModel.__init__`), not at import:
importing a module changes nothing in diffusers. They are written into the tables directly: the registries' `register`
would first import every model diffusers registers itself (~1 s); the tables keep our entries when diffusers fills in
its own on first use.
"""

from __future__ import annotations

from diffusers.hooks._helpers import (
    AttentionProcessorMetadata,
    AttentionProcessorRegistry,
    TransformerBlockMetadata,
    TransformerBlockRegistry,
)

from .attention import MMDiTAttnProcessor, skip_attention_output
from .blocks import MMDiTBlock
from .single_stream import SingleStreamBlock


def register_processor_for_hooks(processor_class: type) -> None:
    """Make `processor_class` (an `MMDiTAttnProcessor` or one like it) known to diffusers' hooks; idempotent."""
    if processor_class not in AttentionProcessorRegistry._registry:
        AttentionProcessorRegistry._registry[processor_class] = AttentionProcessorMetadata(skip_attention_output)


def register_block_for_hooks(block_class: type) -> None:
    """Make `block_class` known to diffusers' hooks: it returns (image, text), image first (diffusers' FLUX
    single-stream block returns them the other way round); idempotent."""
    if block_class not in TransformerBlockRegistry._registry:
        metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1)
        metadata._cls = block_class
        TransformerBlockRegistry._registry[block_class] = metadata


def register_with_diffusers_hooks() -> None:
    """Our blocks and default attention processor in diffusers' hook registries; idempotent."""
    register_block_for_hooks(MMDiTBlock)
    register_block_for_hooks(SingleStreamBlock)
    register_processor_for_hooks(MMDiTAttnProcessor)
