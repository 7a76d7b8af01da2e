"""The Hugging Face Hub: push MMDiT pipelines, transformers and LoRAs with a model card, pull them back.

    from mmdit_diffusers.hub import push_pipeline_folder, push_to_hub, HubError

    push_pipeline_folder("out/pipeline", "me/my-mmdit", revision="v1", card_data={"datasets": ["shapes"]})
    push_to_hub(pipe, "me/my-mmdit", private=True)        # save to a temp dir, then push
    pipe.push_to_hub("me/my-mmdit", revision="v1")         # the same, through MMDiTHubMixin

Hub failures raise `HubError` (a RuntimeError and OSError) whose message says what to do. The command line is
`mmdit-diffusers push PATH REPO_ID`.
"""

from .errors import HubError, hub_errors, redact, translate_hub_error
from .mixin import MMDiTHubMixin, from_pretrained_with_hub_errors
from .model_card import build_model_card, detect_folder_kind
from .push import push_folder, push_pipeline_folder, push_to_hub

__all__ = [
    "HubError",
    "MMDiTHubMixin",
    "build_model_card",
    "detect_folder_kind",
    "from_pretrained_with_hub_errors",
    "hub_errors",
    "push_folder",
    "push_pipeline_folder",
    "push_to_hub",
    "redact",
    "translate_hub_error",
]
