"""`compressed`: attention matching. A full-attention layer keeps about R entries per key/value head (keys, values
and a score bias), fitted so that attention over them reproduces attention over the whole prompt for reference
queries (ops/compress.py fits, summaries.py splits the budget across layers or heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import IclcaError
from ..families import SOFTMAX_KINDS
from .base import Param, Trained, training_params
from .evict import BUDGET

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Compressed(Trained):
    name = "compressed"
    help = "softmax attention: fitted summaries of the prompt (constant size, approximate)"
    kinds = SOFTMAX_KINDS
    on_cache = "attention"
    summarises = True
    preference = 2
    params = (
        BUDGET,
        Param("queries", "--reference", "summary_queries", str, "the queries a summary is fitted to: the prompt's own "
              "(own), or also those of a repeat of the prompt read after it (repeat)", choices=("own", "repeat")),
        Param("keys", "--keys", "summary_keys", str, "a summary's keys: the prompt keys that receive most attention "
              "(attention), or k-means centroids (kmeans)", choices=("attention", "kmeans")),
        Param("split", "--split", "summary_split", str, "the same budget for every head (uniform), or the total split "
              "by fitted error across layers (layers), across heads up to 4x the budget each (heads), or across heads "
              "from one entry to the whole prompt kept as it is (free)", choices=("uniform", "layers", "heads", "free")),
        Param("search", "--search", "summary_search", str, "the error a split weighs: fitted up to half the budget or "
              "64 entries, above that evict's error scaled to meet it, and only the budgets taken fitted (ranked); or "
              "each head's fitted error at every budget it may take (fitted: several times slower on long prompts)",
              choices=("ranked", "fitted"), was="fitted"),
        Param("weigh", "--weigh", "summary_weigh", str, "how a split weighs a head's error: by how much it moves the "
              "residual stream its layer adds to, relative to the stream leaving the layer (leaving) or entering it "
              "(residual), or as it is (none)", choices=("leaving", "residual", "none"), was="none"),
        Param("refine", "--refine", "refine", bool, "train the fitted summary toward the prompted model on inputs made "
              "from the prompt (distill.py); the sink entries stay"),
        *training_params("refine"),
    )
    TRAINING = Trained.FIELDS  # recorded, and allowed to differ from their defaults, only with refine

    budget: int = 0
    queries: str = "repeat"  # chosen on development tasks, as the other defaults
    keys: str = "attention"
    split: str = "heads"
    search: str = "ranked"
    weigh: str = "leaving"
    refine: bool = False

    def validate(self) -> None:
        super().validate()
        changed = [self.param(f).flag for f in self.TRAINING if getattr(self, f) != self.default(self.param(f))]
        if changed and not self.refine:
            raise IclcaError(f"{', '.join(changed)} apply to --refine", "add --refine, or drop them")

    def metadata(self) -> dict[str, str]:
        """Training parameters only for a refined summary: an unrefined patch's metadata is as before --refine."""
        meta = super().metadata()
        if not self.refine:
            for key in ("refine", *(self.param(f).key for f in self.TRAINING)):
                meta.pop(key)
        return meta

    @classmethod
    def from_metadata(cls, extra: dict[str, str], where: str) -> Compressed:
        """An unrefined patch records no training parameters: they read as the defaults (not, as a refined patch's
        missing keys do, as what older refined patches were made with)."""
        if extra.get("refine") != "True":
            extra = {**{cls.param(f).key: str(cls.default(cls.param(f))) for f in cls.TRAINING}, **extra}
        return super().from_metadata(extra, where)

    def trained(self, model, patch, tensors, prompt_ids, progress=None, tokenizer=None, messages=None):
        if not self.refine:
            return tensors
        from ..distill import refine_summary

        return refine_summary(model, patch, tensors, prompt_ids, self.training(messages is not None), progress,
                              tokenizer, messages)

    def capture_ids(self, prompt_ids: list[int], positions_left: int | None) -> list[int]:
        from ..summaries import repeat_ids

        return list(prompt_ids) if self.queries == "own" else repeat_ids(prompt_ids, positions_left)

    def summary_tensors(self, captured: dict, prompt_tokens: int) -> dict[str, dict[str, torch.Tensor]]:
        from ..summaries import compressed_tensors

        return compressed_tensors(captured, prompt_tokens, self.budget, self.keys, self.split, self.search,
                                  self.weigh)

    def full_layer_shapes(self, patch, path: str, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Uniform budgets: R = min(budget, P) per key/value head. A split by layers: the layer's R, as its tensor
        says, up to the grid's top; by heads: the same, or the heads' entries in one list, (1, E, D) with E up to
        Hkv x the grid's top (summaries.layer_tensors); a bias per head."""
        from ..ops import compress

        R = min(self.budget, patch.prompt_tokens)
        keys = patch.tensors.get(f"{path}.prefix_keys")
        shared = 1 if keys is not None and keys.dim() == 3 and keys.shape[0] == 1 else kv_heads
        if self.split != "uniform" and keys is not None:
            held = keys.shape[-2] if keys.dim() == 3 else -1
            top = compress.budget_grid(self.budget, patch.prompt_tokens, self.split == "free")[-1] * (kv_heads // shared)
            R = held if 1 <= held <= top else R
        return {f"{path}.prefix_keys": (shared, R, head_dim), f"{path}.prefix_values": (shared, R, head_dim),
                f"{path}.prefix_bias": (kv_heads, R)}


METHOD = Compressed
