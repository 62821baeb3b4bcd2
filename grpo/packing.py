"""Packed sequences: a micro-batch's sequences concatenated into one row with no padding (verl's
`use_remove_padding`), position ids restarting at 0 for each sequence, attention confined to each sequence.

Two attention paths, both torch's own kernels (no flash-attn build):
- `varlen_attention`: torch.nn.attention.varlen_attn, the FlashAttention-2 varlen kernel that ships inside torch
  (CUDA, bf16/fp16, sm80+). It reads the sequence boundaries (`cu_seqlens`) and computes only the causal
  lower triangle of each sequence: no mask tensor, no work across sequences. Registered in transformers'
  AttentionInterface as `VARLEN`, so a Hugging Face model runs it through its own modules.
- elsewhere (the CPU; float32 on a GPU): transformers' SDPA path with the packed `position_ids` and no attention mask;
  transformers then builds the block-diagonal causal mask itself (masking_utils.find_packed_sequence_indices). That
  mask is dense [T, T], so it is the portable fallback, not the fast path.

The native engine's prefill uses `varlen_attention` / `block_causal_mask` directly (its attention is its own).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # older torch: the SDPA fallback serves
    _varlen_attn = None

VARLEN = "grpo_varlen"  # the name of `hf_varlen_attention` in transformers' AttentionInterface
# Which attention a packed forward runs: "auto" (the varlen kernel where it runs, else transformers' SDPA with the
# block-diagonal mask), "sdpa" (always the latter) or "flex_attention" (transformers' flex path, a block-sparse
# document mask; compiles). grpo.bench.packing sets it to compare them; the product leaves it at "auto".
ATTENTION = "auto"
# Grouped-query attention in the varlen kernel: "native" (the kernel reads the KV heads of each group) or "repeat"
# (KV heads repeated to the query heads first). grpo.bench.packing compares them.
GQA = "native"
_PARAMS = inspect.signature(_varlen_attn).parameters if _varlen_attn is not None else {}


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right-padded [B, L] batch go in the packed row of T tokens."""

    index: torch.Tensor  # [T] flat index into [B, L] of each real token, row by row
    slot: torch.Tensor  # [B, L] position in the packed row of each padded position (meaningless at padding)
    position_ids: torch.Tensor  # [1, T] 0, 1, ... restarting for each sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32 sequence boundaries in the packed row
    max_len: int  # the longest sequence (the varlen kernel sizes its grid by it)


def pack(attention_mask: torch.Tensor) -> Packing:
    """The packing of a right-padded batch (each row's real tokens contiguous from column 0). Two host syncs: the
    token count and the longest row (the kernel takes it as a Python int)."""
    keep = attention_mask.bool()
    flat = keep.flatten()
    lengths = keep.sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return Packing(index=flat.nonzero().squeeze(1), slot=(flat.cumsum(0) - 1).view_as(keep),
                   position_ids=(keep.cumsum(1) - 1)[keep][None], cu_seqlens=cu, max_len=int(lengths.max()))


def varlen_supported(x: torch.Tensor) -> bool:
    """Whether torch's varlen flash kernel runs for activations like `x`."""
    return (_varlen_attn is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(x.device)[0] >= 8)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, *,
                     scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention inside each packed sequence: q [T, H, D], k and v [T, KV, D] -> [T, H, D]. `window`: a
    sliding window of that many keys (the query's own included), as transformers' sliding layers mean it."""
    kwargs = {}
    if "window_size" in _PARAMS:  # torch >= 2.11; (-1, 0) is plain causal
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif window:
        raise ValueError("this torch's varlen_attn has no sliding window; use torch >= 2.11 or train.pack=false")
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if GQA == "repeat":  # KV heads repeated up to the query heads: more bytes, any kernel takes it
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        elif "enable_gqa" in _PARAMS:  # torch >= 2.12 asks for the flag
            kwargs["enable_gqa"] = True
        # else torch 2.10/2.11: the wrapper passes grouped KV heads to the flash kernel, which reads them as GQA
    # rotary embeddings leave q and k strided as [H, T, D]; the kernel wants [T, H, D] rows (transformers' own
    # flash path makes them contiguous too)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **kwargs)


def hf_varlen_attention(module, query, key, value, attention_mask, *, scaling=None, sliding_window=None,
                        cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention-function signature over `varlen_attention`: query [1, H, T, D] and key/value
    [1, KV, T, D] of one packed row -> ([1, T, H, D], None). The boundaries come in as transformers'
    flash-attention keyword arguments (`cu_seq_lens_q`, `max_length_q`), passed to the model's forward."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention serves one packed row with cu_seq_lens_q; call the model with them")
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           cu_seq_lens_q, max_length_q, scale=scaling, window=sliding_window)
    return out[None], None


def padded_hidden(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N, H] of the positions `sel` [B, L-1] selects (position t predicts token t+1), from the
    right-padded rows with their padding mask: the unpacked path."""
    _use_attention(lm, _unpacked(lm))
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[:, :-1][sel]


def packed_hidden(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """The same from one packed row of the real tokens: no compute on padding."""
    packing = pack(attention_mask)
    # embedded first: the compute dtype (FSDP2 mixed precision) decides which attention kernel can run
    embeds = lm.get_input_embeddings()(input_ids.flatten()[packing.index][None])
    extra = {}
    if ATTENTION == "auto" and varlen_supported(embeds):
        _use_attention(lm, VARLEN)
        cu, m = packing.cu_seqlens, packing.max_len
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    else:  # transformers builds the block-diagonal causal mask (SDPA) or block mask (flex) from the position ids
        _use_attention(lm, ATTENTION if ATTENTION == "flex_attention" else _unpacked(lm))
    hidden = lm.model(inputs_embeds=embeds, position_ids=packing.position_ids, use_cache=False,
                      **extra).last_hidden_state[0]
    return hidden[packing.slot[:, :-1][sel]]


def _unpacked(lm) -> str:
    """The attention the model was built with (SDPA in grpo.policy), or SDPA when the packed path switched it."""
    current = lm.config._attn_implementation
    return "sdpa" if current in (VARLEN, "flex_attention") else current


def _use_attention(lm, name: str) -> None:
    """Switch the model's attention implementation (its AttentionInterface name) only when it changes."""
    if lm.config._attn_implementation != name:
        lm.set_attn_implementation(name)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, *, window: int | None = None) -> torch.Tensor:
    """[T, T] boolean mask for SDPA over a packed row: query i sees key j <= i of its own sequence (and within
    `window` keys of it, when given). Dense: the fallback where `varlen_attention` does not run."""
    seq = torch.bucketize(torch.arange(total, device=cu_seqlens.device), cu_seqlens[1:].long(), right=True)
    pos = torch.arange(total, device=cu_seqlens.device)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, hf_varlen_attention)


_register()
