"""A tiny Gemma 3 that tokenizes and chats exactly as the bundled Gemma 3 270M does, for the tests
where the model's weights do not matter (request validation, where llama-server cuts a prompt).

It is the bundled model's own GGUF metadata (its 262,144-token SentencePiece vocabulary, BOS, EOS and
control tokens, sliding window of 512 with llama.cpp's Gemma 3 pattern of five sliding layers to one
global) with small random weights: 6 layers, 64 wide, 2 query heads and 1 KV head of 64. The same
text gives the same token ids and the same chat prompt; a token costs about a tenth of the real
model's, most of it the tied 262,144-row output head. The output head is scaled so next-token
distributions are peaked (logits with a standard deviation of about 3), not flat: its outputs are
noise, but not uniform noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

from tests.arch_models import atomic
from tests.tiny_gguf import add_shape

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_LAYER, N_FF = 64, 2, 1, 64, 6, 128
LOGIT_STD = 3.0

_COPIED_U32 = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
_COPIED_BOOL = ("add_bos_token", "add_eos_token", "add_space_prefix", "add_sep_token")


def write_tiny_gemma3(source: Path, path: Path) -> Path:
    """Write the tiny model to ``path`` (atomically: written aside, then renamed) from the real
    model's tokenizer at ``source``; an existing file is kept."""
    return atomic(path, lambda tmp: _write(source, tmp))


def _write(source: Path, tmp: Path) -> None:
    src = GGUFReader(str(source))

    def field(key: str) -> object:
        return src.fields[key].contents()

    w = GGUFWriter(str(tmp), "gemma3")
    w.add_name("tiny gemma3 (the bundled tokenizer, random weights)")
    add_shape(w, n_embd=N_EMBD, n_layer=N_LAYER, n_ff=N_FF, n_head=N_HEAD, n_head_kv=N_HEAD_KV, eps=1e-6)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(float(field("gemma3.rope.freq_base")))  # type: ignore[arg-type]
    w.add_sliding_window(int(field("gemma3.attention.sliding_window")))  # type: ignore[call-overload]
    w.add_file_type(1)  # mostly f16
    w.add_tokenizer_model(str(field("tokenizer.ggml.model")))
    w.add_tokenizer_pre(str(field("tokenizer.ggml.pre")))
    tokens = list(field("tokenizer.ggml.tokens"))  # type: ignore[call-overload]
    w.add_token_list(tokens)
    w.add_token_scores(list(field("tokenizer.ggml.scores")))  # type: ignore[call-overload]
    w.add_token_types(list(field("tokenizer.ggml.token_type")))  # type: ignore[call-overload]
    for key in _COPIED_U32:
        w.add_uint32(f"tokenizer.ggml.{key}", int(field(f"tokenizer.ggml.{key}")))  # type: ignore[call-overload]
    for key in _COPIED_BOOL:
        w.add_bool(f"tokenizer.ggml.{key}", bool(field(f"tokenizer.ggml.{key}")))

    rng = np.random.default_rng(3)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * std).astype(np.float16))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    # tied output head: a final-normed state has unit RMS, so logits have std LOGIT_STD
    matrix("token_embd.weight", len(tokens), N_EMBD, LOGIT_STD / np.sqrt(N_EMBD))
    ones("output_norm.weight", N_EMBD)
    for i in range(N_LAYER):
        b = f"blk.{i}"
        for norm, n in (("attn_norm", N_EMBD), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM)):
            ones(f"{b}.{norm}.weight", n)
        for norm in ("post_attention_norm", "ffn_norm", "post_ffw_norm"):
            ones(f"{b}.{norm}.weight", N_EMBD)
        matrix(f"{b}.attn_q.weight", N_HEAD * HEAD_DIM, N_EMBD, N_EMBD**-0.5)
        matrix(f"{b}.attn_k.weight", N_HEAD_KV * HEAD_DIM, N_EMBD, N_EMBD**-0.5)
        matrix(f"{b}.attn_v.weight", N_HEAD_KV * HEAD_DIM, N_EMBD, N_EMBD**-0.5)
        matrix(f"{b}.attn_output.weight", N_EMBD, N_HEAD * HEAD_DIM, (N_HEAD * HEAD_DIM) ** -0.5)
        matrix(f"{b}.ffn_gate.weight", N_FF, N_EMBD, N_EMBD**-0.5)
        matrix(f"{b}.ffn_up.weight", N_FF, N_EMBD, N_EMBD**-0.5)
        matrix(f"{b}.ffn_down.weight", N_EMBD, N_FF, N_FF**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
