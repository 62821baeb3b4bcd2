"""Model shapes for planning, read from a checkpoint's config.json or taken from a catalogue of known models.

No torch: the planner runs on a login node, often before the checkpoint is reachable from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # of a Qwen2 block


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_params(self) -> int:
        """One Qwen2 decoder block: q/k/v (with biases), o, gate/up/down, two norms."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (self.hidden + 2 * kv) + (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return attn + mlp + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embed_params

    def linear_params(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block, in LINEAR_NAMES order: what LoRA `all-linear` adapts."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def linear_weights(self, targets: tuple[str, ...] = ()) -> int:
        """Weight elements of the named linear layers (LINEAR_NAMES; () = all) over every block: what a LoRA run
        with those targets changes in the merged model."""
        return self.layers * sum(a * b for name, (a, b) in zip(LINEAR_NAMES, self.linear_params())
                                 if not targets or name in targets)

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_params())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


CATALOGUE = {
    s.name: s
    for s in [
        ModelShape(name="Qwen2-72B", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568, vocab=152064),
        ModelShape(name="Qwen2.5-72B", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568,
                   vocab=152064),
        ModelShape(name="Qwen2.5-7B", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                   vocab=152064),
        ModelShape(name="Qwen2.5-1.5B", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                   vocab=151936, tied_embeddings=True),
        ModelShape(name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=20),
    ]
}


def shape_from_config(path: Path) -> ModelShape:
    """Shape from a Hugging Face config.json (Qwen2 family)."""
    cfg = json.loads(Path(path).read_text())
    return ModelShape(
        name=Path(path).parent.name,
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        tied_embeddings=cfg.get("tie_word_embeddings", False),
    )


def resolve_shape(path: str, arch: str) -> ModelShape:
    """The checkpoint's own config.json when readable here, else the catalogue entry named by `arch`."""
    if path == "tiny":
        return CATALOGUE["tiny"]
    config = Path(path) / "config.json"
    if config.is_file():
        return shape_from_config(config)
    if arch in CATALOGUE:
        return CATALOGUE[arch]
    raise ValueError(f"model.path={path!r} has no readable config.json and model.arch={arch!r} is not one of: "
                     f"{', '.join(CATALOGUE)}; set model.arch to plan without the checkpoint")
