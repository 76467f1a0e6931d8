"""A tiny Gemma 4 (``gemma4``) with random weights, written with the ``gguf`` package.

The pinned llama.cpp's ``test-llama-archs`` writes no gemma4 model (its saver skips the architecture:
"ISWA KV cache initialization needs more fixture params"), so this one follows the tensor list
llama.cpp loads for it (src/models/gemma4.cpp, ``load_arch_tensors`` and ``load_arch_hparams``):

* per layer ``attn_norm``, ``attn_q``, ``attn_q_norm``, ``attn_output``, ``post_attention_norm``,
  ``ffn_norm``, ``ffn_gate``/``ffn_up``/``ffn_down``, ``post_ffw_norm``; ``attn_k``, ``attn_k_norm``
  (and an optional ``attn_v``: without it V is K, Gemma 4's "k_eq_v") only on layers that keep KV;
* one ``rope_freqs`` (proportional RoPE of the full-attention layers), ``token_embd``,
  ``output_norm`` (the output head is tied to the embeddings);
* ``embedding_length_per_layer_input`` 0, so no per-layer embeddings (E2B/E4B have them; they do not
  touch the KV cache).

What it exercises is what the real models have and Gemma 3 lacks: sliding-window layers with their
own head size (``key_length_swa`` 64 against 128 on full layers) and their own KV-head count (4
against 1), and ``shared_kv_layers`` 2: the last two layers keep no KV and read layers 2 (sliding)
and 3 (full), as E2B/E4B do (llama.cpp: ``n_layer_kv_from_start - (is_swa ? 2 : 1)``). The
tokenizer is a small SentencePiece ("llama") vocabulary with Gemma 4's control tokens, BOS added,
so ``<turn|>`` ends generation as in the real model. Outputs are noise; the KV cache is real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD, N_HEAD, N_LAYER, N_FF = 128, 4, 6, 192
HEAD_FULL, HEAD_SWA = 128, 64
KV_HEADS_FULL, KV_HEADS_SWA = 1, 4
SLIDING_WINDOW = 32
SWA = [True, True, True, False, True, False]  # layer 3 and 5 full attention
SHARED_KV_LAYERS = 2  # layers 4 and 5 keep no KV of their own

SPECIAL = [
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
    "<|image|>", "<|audio|>", "<|video|>",
]  # fmt: skip
WORDS = ["▁the", "▁a", "▁of", "▁user", "▁model", "▁system", "▁thought", "\n"]


def write_tiny_gemma4(path: Path, chat_template: str | None = None) -> Path:
    w = GGUFWriter(str(path), "gemma4")
    w.add_name("tiny gemma4")
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv([KV_HEADS_SWA if s else KV_HEADS_FULL for s in SWA])
    w.add_key_length(HEAD_FULL)
    w.add_value_length(HEAD_FULL)
    w.add_uint32("gemma4.attention.key_length_swa", HEAD_SWA)
    w.add_uint32("gemma4.attention.value_length_swa", HEAD_SWA)
    w.add_rope_dimension_count(HEAD_FULL)
    w.add_uint32("gemma4.rope.dimension_count_swa", HEAD_SWA)
    w.add_rope_freq_base(1_000_000.0)
    w.add_float32("gemma4.rope.freq_base_swa", 10_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(SLIDING_WINDOW)
    w.add_array("gemma4.attention.sliding_window_pattern", SWA)
    w.add_uint32("gemma4.attention.shared_kv_layers", SHARED_KV_LAYERS)
    w.add_uint32("gemma4.embedding_length_per_layer_input", 0)
    w.add_final_logit_softcapping(30.0)
    w.add_file_type(0)

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIAL]
    types = [TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL, TokenType.UNKNOWN]
    types += [TokenType.CONTROL] * len(SPECIAL)
    tokens += [f"<0x{i:02X}>" for i in range(256)] + WORDS
    types += [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(WORDS)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.default_rng(0)
    vocab = len(tokens)

    def tensor(name: str, *shape: int) -> None:  # numpy order: ggml's ne reversed
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    tensor("token_embd.weight", vocab, N_EMBD)
    ones("output_norm.weight", N_EMBD)
    ones("rope_freqs.weight", HEAD_FULL // 2)
    n_kv_layers = N_LAYER - SHARED_KV_LAYERS
    for i, swa in enumerate(SWA):
        head = HEAD_SWA if swa else HEAD_FULL
        kv_heads = KV_HEADS_SWA if swa else KV_HEADS_FULL
        ones(f"blk.{i}.attn_norm.weight", N_EMBD)
        tensor(f"blk.{i}.attn_q.weight", N_HEAD * head, N_EMBD)
        ones(f"blk.{i}.attn_q_norm.weight", head)
        if i < n_kv_layers:
            tensor(f"blk.{i}.attn_k.weight", kv_heads * head, N_EMBD)
            ones(f"blk.{i}.attn_k_norm.weight", head)
            if swa:  # full-attention layers read V as K (no attn_v), as Gemma 4's k_eq_v layers
                tensor(f"blk.{i}.attn_v.weight", kv_heads * head, N_EMBD)
        tensor(f"blk.{i}.attn_output.weight", N_EMBD, N_HEAD * head)
        ones(f"blk.{i}.post_attention_norm.weight", N_EMBD)
        ones(f"blk.{i}.ffn_norm.weight", N_EMBD)
        tensor(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
        ones(f"blk.{i}.post_ffw_norm.weight", N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
