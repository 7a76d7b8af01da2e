"""The Hugging Face Hub: the model card of a saved MMDiT pipeline, transformer or LoRA, pushing it with that card,
and loading with errors that say what to do.

    from mmdit_diffusers import hub

    hub.write_model_card("out/pipeline", card_data={"training": {...}})       # README.md in the folder
    hub.push_folder("out/pipeline", "me/my-mmdit", revision="v1")             # the folder, with its card
    hub.push_to_hub(pipe, "me/my-mmdit", private=True)                        # save to a temp dir, then push
    pipe = hub.from_pretrained(MMDiTPipeline, "me/my-mmdit", revision="v1")

Hub failures raise `HubError` (a RuntimeError and OSError) whose message says what to do. The models' and
pipelines' own `push_to_hub` / `from_pretrained` are diffusers' and keep diffusers' behaviour. The command line
is `mmdit-diffusers push PATH REPO_ID`.
"""

from .errors import HubError, redact, translate_hub_error
from .model_card import write_model_card
from .pull import from_pretrained
from .push import push_folder, push_to_hub

__all__ = [
    "HubError",
    "from_pretrained",
    "push_folder",
    "push_to_hub",
    "redact",
    "translate_hub_error",
    "write_model_card",
]
