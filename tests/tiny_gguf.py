"""A second architecture for llama.cpp to load: a tiny Llama (GQA, 4 layers) with random weights,
written with the ``gguf`` package's own writer. Its outputs are noise; its KV cache is real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_FF = 256, 8, 2, 4, 512


def add_shape(
    w: GGUFWriter, *, n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int, eps: float
) -> None:
    """The hyper-parameters every tiny model states (context 32,768)."""
    w.add_context_length(32768)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(eps)


def write_tiny_llama(path: Path) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    add_shape(w, n_embd=N_EMBD, n_layer=N_LAYER, n_ff=N_FF, n_head=N_HEAD, n_head_kv=N_HEAD_KV, eps=1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁the", "▁a", "▁of"]
    types = (
        [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
        + [TokenType.BYTE] * 256
        + [TokenType.NORMAL] * 3
    )
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    vocab, head_dim = len(tokens), N_EMBD // N_HEAD

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    tensor("output.weight", vocab, N_EMBD)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        tensor(f"blk.{i}.attn_q.weight", N_HEAD * head_dim, N_EMBD)
        tensor(f"blk.{i}.attn_k.weight", N_HEAD_KV * head_dim, N_EMBD)
        tensor(f"blk.{i}.attn_v.weight", N_HEAD_KV * head_dim, N_EMBD)
        tensor(f"blk.{i}.attn_output.weight", N_EMBD, N_HEAD * head_dim)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
