"""The model families this package trains, and what each needs: one table for the login node and the ranks.

No torch here: `hpc` (the memory model, the login-node checks) and `grpo` (the policy, LoRA, the native engine)
both read this module, so the two sides cannot disagree about which checkpoints are supported.

Every family here is a dense decoder as transformers writes it: `model.embed_tokens`, `model.layers[i]` with
`input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then
`model.norm` and `lm_head`. They differ in biases, q/k norms, head_dim and sliding windows, read from config.json.
Qwen2.5 checkpoints say `model_type: qwen2` (there is no `qwen2_5` model type); Llama 3.x says `llama`.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCKS = "model.layers"  # the transformer blocks: one FSDP2 group and one activation checkpoint each
ATTENTION_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEAR = ("gate_proj", "up_proj", "down_proj")
LINEAR = ATTENTION_LINEAR + MLP_LINEAR  # in block order; LoRA's `all-linear` is these (never the LM head)
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Family:
    """What one `model_type` needs beyond the shared layout."""

    model_type: str
    name: str
    qkv_bias: bool | None  # q/k/v projections carry a bias; None: config.json's `attention_bias` says
    o_bias: bool | None  # o_proj carries a bias; None: `attention_bias` says
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary embedding (self_attn.q_norm / k_norm)
    mlp_bias: bool | None = False  # None: config.json's `mlp_bias` says
    example: str = ""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="llama", name="Llama 3.x", qkv_bias=None, o_bias=None, mlp_bias=None,
           example="meta-llama/Llama-3.1-8B-Instruct"),
    Family(model_type="qwen2", name="Qwen2 / Qwen2.5", qkv_bias=True, o_bias=False,
           example="Qwen/Qwen2.5-72B-Instruct"),
    Family(model_type="qwen3", name="Qwen3 (dense)", qkv_bias=None, o_bias=None, qk_norm=True,
           example="Qwen/Qwen3-8B"),
    Family(model_type="mistral", name="Mistral", qkv_bias=False, o_bias=False, example="mistralai/Mistral-7B-v0.3"),
)}

LORA_TARGETS = LINEAR  # every family: the seven linears of a block


def supported() -> str:
    """'llama (Llama 3.x), qwen2 (Qwen2 / Qwen2.5), ...' for error messages."""
    return ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())


def family_of(config: dict, *, where: str = "model") -> Family:
    """The family of a config.json dict; a one-line ValueError naming the supported ones otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: config.json has model_type={model_type!r}; supported model types: {supported()}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Layout:
    """The per-block facts of one checkpoint that the memory model and the native engine need (from config.json)."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    head_dim: int
    windows: tuple[int | None, ...]  # per block: the sliding-window width, None for full attention


def layout_of(config: dict, *, where: str = "model") -> Layout:
    """Resolve a family's config-dependent fields for one config.json dict."""
    fam = family_of(config, where=where)
    attention_bias = bool(config.get("attention_bias", False))
    pick = lambda fixed, from_config: from_config if fixed is None else fixed  # noqa: E731
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Layout(qkv_bias=pick(fam.qkv_bias, attention_bias), o_bias=pick(fam.o_bias, attention_bias),
                  mlp_bias=pick(fam.mlp_bias, bool(config.get("mlp_bias", False))), qk_norm=fam.qk_norm,
                  head_dim=head_dim, windows=sliding_windows(config))


def sliding_windows(config: dict) -> tuple[int | None, ...]:
    """Each block's sliding-window width (None: full attention), as transformers applies it: Qwen2/Qwen3 list
    `layer_types` ("sliding_attention" from `max_window_layers` on, only with `use_sliding_window`); Mistral
    slides every block when `sliding_window` is set."""
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" and window else None for t in types)
    if config.get("model_type") in ("qwen2", "qwen3"):
        if not config.get("use_sliding_window") or not window:
            return (None,) * layers
        start = config.get("max_window_layers", layers)
        return tuple(window if i >= start else None for i in range(layers))
    return (window,) * layers if window else (None,) * layers
