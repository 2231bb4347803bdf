"""`lora`: the prompt baked into the weights. Low-rank updates W + B A of the model's linear projections, trained by
the distillation engine (distill.py) so that the model reading a query alone, from position 0, says what it says
after the prompt (after Prompt Baking, arXiv 2409.13697). Any family: the update is of weights, not of a state
(lora_layers.py). `merge` folds it into the weights, so the merged folder is a stock checkpoint; `export-peft`
writes it as a PEFT LoRA adapter. `--objective ce` trains the same update by next-token cross-entropy on the
prompt's text instead (fine-tuning on the demonstrations, the baseline ICL is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from ..families import CACHE_KINDS, LINEAR_KINDS, SOFTMAX_KINDS
from .base import Param, Trained, training_params

ALL_TARGETS = "all-linear"  # every linear projection of the decoder layers (PEFT's name for it)


@dataclass(frozen=True)
class Lora(Trained):
    name = "lora"
    help = "any model: low-rank weight updates trained toward the prompted model (constant size, approximate; " \
           "merges into a stock checkpoint)"
    kinds = tuple(dict.fromkeys(SOFTMAX_KINDS + LINEAR_KINDS + CACHE_KINDS))
    on_cache = "all"
    handler = "weights"
    in_context = False
    preference = 9
    params = (
        Param("rank", "--rank", "lora_rank", int, "the rank of each weight update", minimum=1),
        Param("targets", "--targets", "lora_targets", str, f"the projections updated: {ALL_TARGETS} (every linear "
              "layer of the decoder layers), or their names joined by commas (q_proj,v_proj)"),
        Param("objective", "--objective", "lora_objective", str, "what lora trains on: the prompted model's "
              "predictions (kl: distillation), or the prompt's own next tokens (ce: fine-tuning on the text)",
              choices=("kl", "ce")),
        *training_params("lora"),
    )

    rank: int = 8
    targets: str = ALL_TARGETS
    objective: str = "kl"
    # chosen on development tasks (docs/lora.md); the other training fields are the engine's
    steps: int = 400
    top_k: int = 1000
    loss_from: int = 1

    def validate(self) -> None:
        super().validate()
        names = self.target_names()
        if names is not None and (not all(names) or any(not n.replace("_", "").isalnum() for n in names)):
            from ..errors import IclcaError

            raise IclcaError(f"--targets {self.targets!r} is not {ALL_TARGETS} or module names joined by commas",
                             f"pass --targets {ALL_TARGETS}, or e.g. --targets q_proj,v_proj")

    def target_names(self) -> tuple[str, ...] | None:
        """The module names updated (the last part of their paths); None: every linear projection."""
        return None if self.targets == ALL_TARGETS else tuple(n.strip() for n in self.targets.split(","))

    def part(self, buffer: str) -> str:
        return "weights"

    def trained(self, model, patch, tensors, prompt_ids, progress=None, tokenizer=None, messages=None):
        from ..distill import train_patch

        # every update trained; the student reads its inputs from position 0 as the teacher reads them after the
        # prompt (after a chat prompt: after the chat template's own start, as a server renders a query)
        return train_patch(model, patch, tensors, prompt_ids, self.training(messages is not None), sorted(tensors),
                           None, self.objective, progress, tokenizer, self.name, messages)


METHOD = Lora
