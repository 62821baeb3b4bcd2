"""Model shapes for planning, read from a checkpoint's config.json or taken from a catalogue of known models.

No torch: the planner runs on a login node, often before the checkpoint is reachable from it. What differs between
families (biases, q/k norms, head_dim) comes from the one table in `grpo.families`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grpo.families import LINEAR as LINEAR_NAMES  # noqa: F401  (re-exported: the planner's LoRA target names)
from grpo.families import layout_of


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
    family: str = "qwen2"
    qkv_bias: bool = True  # Qwen2's layout unless config.json says otherwise (grpo.families)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    explicit_head_dim: int = 0  # config.json's head_dim where given (Qwen3: not hidden / heads); 0 = hidden / heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def block_params(self) -> int:
        """One decoder block: q/k/v/o (biases as the family has them), q/k norms, gate/up/down, two norms."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        attn = h * (q + 2 * kv) + q * h + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
        attn += self.qk_norm * 2 * self.head_dim
        mlp = 3 * h * i + self.mlp_bias * (2 * i + h)
        return attn + mlp + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embed_params

    def linear_params(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block, in LINEAR_NAMES order: what LoRA `all-linear` adapts."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

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
        ModelShape(name="Llama-3.1-70B", family="llama", hidden=8192, layers=80, heads=64, kv_heads=8,
                   intermediate=28672, vocab=128256, qkv_bias=False),
        ModelShape(name="Llama-3.1-8B", family="llama", hidden=4096, layers=32, heads=32, kv_heads=8,
                   intermediate=14336, vocab=128256, qkv_bias=False),
        ModelShape(name="Qwen3-32B", family="qwen3", hidden=5120, layers=64, heads=64, kv_heads=8,
                   intermediate=25600, vocab=151936, qkv_bias=False, qk_norm=True, explicit_head_dim=128),
        ModelShape(name="Qwen3-8B", family="qwen3", hidden=4096, layers=36, heads=32, kv_heads=8,
                   intermediate=12288, vocab=151936, qkv_bias=False, qk_norm=True, explicit_head_dim=128),
        ModelShape(name="Mistral-7B", family="mistral", hidden=4096, layers=32, heads=32, kv_heads=8,
                   intermediate=14336, vocab=32768, qkv_bias=False),
        ModelShape(name="tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=20),
    ]
}


def shape_from_config(path: Path) -> ModelShape:
    """Shape from a Hugging Face config.json of a supported family (grpo.families); ValueError otherwise."""
    cfg = json.loads(Path(path).read_text())
    layout = layout_of(cfg, where=f"model.path={str(Path(path).parent)!r}")
    return ModelShape(
        name=Path(path).parent.name,
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        tied_embeddings=cfg.get("tie_word_embeddings", False),
        family=cfg["model_type"],
        qkv_bias=layout.qkv_bias,
        o_bias=layout.o_bias,
        mlp_bias=layout.mlp_bias,
        qk_norm=layout.qk_norm,
        explicit_head_dim=layout.head_dim,
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
