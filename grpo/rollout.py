"""Rollout engines. Every engine returns `Completion`s and takes new weights through `load_weights`.

The native engine (here) generates with the Hugging Face model's own modules and weights, in plain PyTorch, the
gpt-fast way: a preallocated static KV cache, one decode step of fixed shapes (captured in a CUDA graph on GPUs),
sampling on the device with no host sync per token. It serves the CPU presets and the GPU tests; vLLM
(`grpo.vllm_engine`) serves production. Architectures: the families of `grpo.families` (Llama 3.x, Qwen2/2.5,
Qwen3, Mistral) as transformers writes them: `model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp}`, `model.model.{embed_tokens, norm, rotary_emb}`, `model.lm_head`. Biases live in
the projections themselves; Qwen3's `self_attn.{q,k}_norm` run before the rotary embedding; sliding windows
(Mistral, Qwen with `use_sliding_window`) are masks per block, as transformers applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from grpo import packing
from grpo.families import sliding_windows


@dataclass
class Completion:
    token_ids: list[int]  # the response, ending with EOS when finish_reason == "stop"
    logprobs: list[float]  # the engine's log-prob of each response token (for a train/rollout mismatch check)
    finish_reason: str  # "stop" (EOS) or "length"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _fuse(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input, the modules' own parameters re-pointed to views
    of it: `load_weights`, which copies into the parameters, writes into the fused storage, and no second copy is
    kept."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    row = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = weight[row:row + rows]
        if bias is not None:
            m.bias.data = bias[row:row + rows]
        row += rows
    return weight, bias


class _Decoder:
    """The model's forward over a static KV cache, reusing its modules (so `load_weights` needs no second copy).

    The decode step runs q/k/v as one matmul and gate/up as another: at decode batch sizes a block's small matmuls
    cost their launch and tail more than their bytes (measured on an H200 at 1.5B: ~5 us each for q, k, v and o
    against ~1 us of bytes), so five matmuls become two. Blocks whose linears carry peft adapters keep the modules'
    own forward."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.layers = list(model.model.layers)
        plain = all(type(m) is torch.nn.Linear for layer in self.layers
                    for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                              layer.mlp.gate_proj, layer.mlp.up_proj))
        self.fused = [(_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                       _fuse([layer.mlp.gate_proj, layer.mlp.up_proj])) if plain else None
                      for layer in self.layers]
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.windows = sliding_windows(cfg.to_dict())  # per block: a window width, or None (full attention)
        self.scale = self.head_dim ** -0.5
        self.rope_len = 0
        self.cos = self.sin = None

    def rope_tables(self, length: int, device, dtype) -> None:
        """cos/sin for positions [0, length), from the model's own rotary module (its scaling included)."""
        if length <= self.rope_len:
            return
        pos = torch.arange(length, device=device)[None]
        probe = torch.zeros(1, length, self.head_dim, device=device, dtype=dtype)
        cos, sin = self.model.model.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)  # [length, head_dim]
        self.rope_len = length

    def _qkv(self, layer, h, pos, fused=None):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        B, T, _ = x.shape
        if fused is None:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:
            q, k, v = F.linear(x, *fused).split([self.num_heads * self.head_dim, self.num_kv * self.head_dim,
                                                  self.num_kv * self.head_dim], dim=-1)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv, self.head_dim)
        v = v.reshape(B, T, self.num_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, T, D]
        q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def _finish_layer(self, layer, h, o, fused=None):
        B, T = h.shape[:2]
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        x = layer.post_attention_layernorm(h)
        if fused is None:
            return h + layer.mlp(x)
        gate, up = F.linear(x, *fused).chunk(2, dim=-1)
        return h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _logits(self, h_last):
        return self.model.lm_head(self.model.model.norm(h_last)).float()

    def prefill(self, prompts: list[list[int]], n: int, width: int, cache_k, cache_v) -> torch.Tensor:
        """Logits [len(prompts) * n, V] of each prompt's last token, for its n rows; fills each row's cache columns
        [width - len(prompt), width), the decode step's left-padded layout.

        Packed (grpo.packing): each distinct prompt runs once, the prompts concatenated into one row with no padding
        and attention confined to each prompt (torch's varlen flash kernel on GPUs, a block-diagonal SDPA mask
        elsewhere); its keys and values are then copied to its n rows.
        """
        device = cache_k.device
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.tensor([t for p in prompts for t in p], device=device)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        pos = torch.arange(ids.numel()) - cu[:-1].repeat_interleave(lengths)  # restarts at 0 for each prompt
        # cache destination of every (row, prompt token): rows r = j * n + s hold prompt j
        row_len = lengths.repeat_interleave(n)
        row_of = torch.arange(len(row_len)).repeat_interleave(row_len)
        offset = torch.arange(int(row_len.sum())) - F.pad(row_len.cumsum(0), (1, 0))[:-1].repeat_interleave(row_len)
        src = cu[:-1].repeat_interleave(n).repeat_interleave(row_len) + offset
        col = width - row_len.repeat_interleave(row_len) + offset
        row_of, src, col, pos, cu = (t.to(device) for t in (row_of, src, col, pos, cu.to(torch.int32)))
        h = self.model.model.embed_tokens(ids[None])
        varlen = packing.varlen_supported(h)
        masks = {} if varlen else {w: packing.block_causal_mask(cu, ids.numel(), window=w)
                                   for w in set(self.windows)}
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, pos[None])  # q [1, H, T, D], k/v [1, KV, T, D]
            k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, KV, D]
            cache_k[i][row_of, :, col] = k[src]
            cache_v[i][row_of, :, col] = v[src]
            if varlen:
                o = packing.varlen_attention(q[0].transpose(0, 1), k, v, cu, int(lengths.max()), scale=self.scale,
                                             window=self.windows[i])
                o = o.transpose(0, 1)[None]
            else:
                o = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                   attn_mask=masks[self.windows[i]], scale=self.scale,
                                                   enable_gqa=self.num_heads != self.num_kv)
            h = self._finish_layer(layer, h, o)
        return self._logits(h[0, cu[1:].long() - 1]).repeat_interleave(n, dim=0)

    def decode(self, tok, col, pad, cache_k, cache_v):
        """One token per row at cache column `col` (a 0-dim device tensor): fixed shapes, no host sync."""
        S = cache_k.shape[3]
        keys = torch.arange(S, device=tok.device)
        mask = (keys[None] >= pad[:, None]) & (keys[None] <= col)  # [B, S]
        masks = {w: mask if w is None else mask & (col - keys < w)[None] for w in set(self.windows)}
        pos = (col - pad)[:, None]  # [B, 1]
        h = self.model.model.embed_tokens(tok[:, None])
        layer_step = self.compiled_layer or self.decode_layer
        for i, layer in enumerate(self.layers):
            h = layer_step(layer, self.fused[i], h, pos, col, masks[self.windows[i]], cache_k[i], cache_v[i])
        return self._logits(h[:, -1])

    compiled_layer = None  # `decode_layer` through torch.compile (NativeEngine's `compile`)

    def decode_layer(self, layer, fused, h, pos, col, mask, cache_k, cache_v):
        """One block of the decode step; writes this token's K/V at column `col` of the block's cache. `fused`:
        the block's (qkv, gate_up) weights, or None."""
        B = h.shape[0]
        qkv, gate_up = fused or (None, None)
        q, k, v = self._qkv(layer, h, pos, qkv)  # q [B, H, 1, D], k/v [B, KV, 1, D]
        cache_k.index_copy_(2, col.view(1), k)
        cache_v.index_copy_(2, col.view(1), v)
        qg = q.view(B, self.num_kv, self.num_heads // self.num_kv, self.head_dim)
        scores = torch.matmul(qg, cache_k.transpose(-1, -2)).float() * self.scale  # [B, KV, G, S]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(cache_v.dtype)
        o = torch.matmul(probs, cache_v).view(B, self.num_heads, 1, self.head_dim)
        return self._finish_layer(layer, h, o, gate_up)


class NativeEngine:
    """Batched sampling over a static KV cache; one batch holds every sample of every prompt.

    temperature 0 is greedy decoding (its log-probs are those of the raw logits). `top_k` (0: off) and `top_p` (1.0:
    off) filter the tempered distribution as vLLM does (top-k first, then the smallest set of tokens whose
    probability reaches top_p); the log-prob returned is the token's under that filtered, renormalised
    distribution, the one it was sampled from (vLLM's processed log-probs). The trainer's log-probs stay those of
    the full distribution at the same temperature, as verl's are; with filtering on, the mismatch metric measures
    the filter too. `cuda_graphs` (default: on CUDA)
    captures the decode step once per batch size and cache length and replays it. `check_every` is how many tokens
    pass between the host checks of "every row finished" (the only host syncs of the decode loop). `compile`
    (default: on CUDA) runs each block of the decode step through torch.compile: one compiled graph serves every
    block (the blocks differ only in their weights), and it fuses the norms, rotary embedding and softmax into a few
    kernels. A decode step at small batch is bound by kernel count, not bytes: eager it launches ~40 kernels per block.
    """

    def __init__(self, model, *, pad_id: int, eos_id: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, cuda_graphs: bool | None = None, compile: bool | None = None,
                 check_every: int = 32):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
        self.model = model.eval()
        self.pad_id, self.eos_id = pad_id, eos_id
        self.max_new_tokens = max_new_tokens
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"top_p={top_p}, top_k={top_k}: top_p must be in (0, 1] and top_k >= 0 (0 is off)")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.check_every = check_every
        self.decoder = _Decoder(model)
        if self.device.type == "cuda" if compile is None else compile:
            self.decoder.compiled_layer = torch.compile(self.decoder.decode_layer, dynamic=False)
        self._state = None  # (B, S) -> cache, static inputs, graph

    def _alloc(self, rows: int, length: int) -> dict:
        """The KV cache and the decode step's static inputs for `rows` x `length` (reused while they fit)."""
        st = self._state
        if st is not None and st["rows"] == rows and st["length"] >= length:
            return st
        # drop the old cache (and its graph) first: a batch of another size (validation's last round) would
        # otherwise hold both caches at once
        self._state = st = None
        length = -(-length // 128) * 128
        d = self.decoder
        shape = (len(d.layers), rows, d.num_kv, length, d.head_dim)
        self._state = st = {
            "rows": rows, "length": length, "graph": None,
            # zeros, not empty: masked keys still meet V in the product, and 0 * NaN would be NaN
            "k": torch.zeros(shape, dtype=self.dtype, device=self.device),
            "v": torch.zeros(shape, dtype=self.dtype, device=self.device),
            "tok": torch.zeros(rows, dtype=torch.long, device=self.device),
            "col": torch.zeros((), dtype=torch.long, device=self.device),
            "pad": torch.zeros(rows, dtype=torch.long, device=self.device),
        }
        d.rope_tables(length, self.device, self.dtype)
        return st

    def release_cache(self) -> None:
        """Drop the KV cache and the decode graph captured over it; the next generate allocates them again."""
        self._state = None

    def _step(self, st) -> torch.Tensor:
        return self.decoder.decode(st["tok"], st["col"], st["pad"], st["k"], st["v"])

    def _decode(self, st) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._step(st)
        if st["graph"] is None:
            # warm up on a side stream, then capture; both write the same K/V the real step writes at `col`
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(st)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                st["logits"] = self._step(st)
            st["graph"] = graph
        st["graph"].replay()
        return st["logits"]

    def _filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits outside the top-k and the top-p nucleus set to -inf (the highest logit always stays)."""
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def _sample(self, logits: torch.Tensor, gen: torch.Generator,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its log-prob per row: Gumbel-max through exponential noise, on the device."""
        if temperature == 0:
            logp = torch.log_softmax(logits, dim=-1)
            tok = logits.argmax(dim=-1)
        else:
            logp = torch.log_softmax(self._filter(logits / temperature), dim=-1)
            noise = torch.empty_like(logp).exponential_(generator=gen)
            tok = (logp - noise.log()).argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int,
                 temperature: float | None = None) -> list[list[Completion]]:
        """Sample `n` responses per prompt (at `temperature`, None: the engine's own; 0: greedy). Returns one list
        of `n` completions per prompt."""
        temperature = self.temperature if temperature is None else temperature
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("the native engine got an empty prompt: every prompt needs at least one token")
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        steps = self.max_new_tokens
        st = self._alloc(len(rows), width + steps)
        # left padding: every row's next token is at the same column
        pad = torch.tensor([width - len(p) for p in rows], dtype=torch.long)
        st["pad"].copy_(pad)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out_tok = torch.full((len(rows), steps), self.pad_id, dtype=torch.long, device=self.device)
        out_logp = torch.zeros((len(rows), steps), dtype=torch.float32, device=self.device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        logits = self.decoder.prefill(prompts, n, width, st["k"], st["v"])
        st["col"].fill_(width)
        for t in range(steps):
            tok, logp = self._sample(logits, gen, temperature)
            tok = tok.masked_fill(done, self.pad_id)
            out_tok[:, t] = tok
            out_logp[:, t] = logp.masked_fill(done, 0.0)
            done |= tok == self.eos_id
            if t + 1 == steps or ((t + 1) % self.check_every == 0 and bool(done.all())):
                break
            st["tok"].copy_(tok)
            logits = self._decode(st)
            st["col"].add_(1)
        return self._completions(out_tok.cpu(), out_logp.cpu(), len(prompts), n)

    def _completions(self, toks: torch.Tensor, logps: torch.Tensor, num_prompts: int, n: int):
        results = []
        for row_toks, row_logp in zip(toks.tolist(), logps.tolist()):
            if self.eos_id in row_toks:
                end, reason = row_toks.index(self.eos_id) + 1, "stop"
            else:
                end, reason = len(row_toks), "length"
            results.append(Completion(row_toks[:end], row_logp[:end], reason))
        return [results[i * n:(i + 1) * n] for i in range(num_prompts)]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy named tensors (Hugging Face names) into the model, in place; returns how many were loaded."""
        params = dict(self.model.named_parameters())
        count = 0
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"engine has no parameter {name!r}")
            params[name].copy_(tensor)
            count += 1
        return count
