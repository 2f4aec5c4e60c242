"""Small Phi-3-architecture GGUF models whose next-token distribution is known exactly.

Every layer's weights are zero and every token embedding is the same vector, so the hidden state
is identical at every position and the logits are simply the rows of `output.weight` times that
vector: a row of constant value v / n_embd gives its token the logit v, every other token gets 0.
The vocabulary has Phi-3's size (32064) and its special tokens at their real ids; text pieces and
byte-fallback tokens make it a working SentencePiece vocabulary for llama.cpp.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from pathlib import Path

import gguf
import numpy as np

N_VOCAB = 32064
SPECIAL_TOKENS = {  # Phi-3-mini's special tokens and their ids
    "<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
    "<|placeholder1|>": 32002, "<|placeholder2|>": 32003, "<|placeholder3|>": 32004,
    "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
WORDS = ["puck", "goal", "hello", "world", "write", "haiku", "about", "ice", "hockey", "the", "a", "why",
         "is", "sky", "blue", "say", "something", "quick", "brown", "fox"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def byte_token(value: int) -> int:
    """Id of the byte-fallback token <0xNN>."""
    return 3 + value


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a 32064-token SentencePiece vocabulary laid out like Phi-3's."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    # Whole words plus every prefix on the way to them: SentencePiece only merges into known pieces.
    text = list(dict.fromkeys(form[:k] for w in WORDS for form in ("▁" + w, w) for k in range(len(form), 1, -1)))
    text += ["▁"] + [chr(c) for c in range(33, 127) if chr(c) not in text]
    text += [f"▁w{i}" for i in range(32000 - len(pieces) - len(text))]
    pieces += text
    types += [gguf.TokenType.NORMAL] * len(text)
    scores = [0.0] * 259 + [float(len(p)) for p in text]  # SentencePiece prefers the longer merge
    by_id = {i: name for name, i in SPECIAL_TOKENS.items() if i >= 32000}
    for i in range(32000, N_VOCAB):
        pieces.append(by_id.get(i, f"<|pad{i}|>"))
        types.append(gguf.TokenType.CONTROL if i in by_id else gguf.TokenType.UNUSED)
        scores.append(0.0)
    assert len(pieces) == N_VOCAB
    return pieces, scores, [int(t) for t in types]


def real_vocabulary(path: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a vocabulary-only GGUF: Phi-3's own, llama.cpp's models/ggml-vocab-phi-3.gguf."""
    fields = gguf.GGUFReader(path).fields
    pieces, scores, types = (fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "scores", "token_type"))
    return pieces, [float(score) for score in scores], [int(kind) for kind in types]


def token_id(piece: str) -> int:
    return vocabulary()[0].index(piece)


def write_gguf(path: Path, *, logits: dict[int, float], n_embd: int = 256, n_ff: int = 256, n_layer: int = 2,
               n_head: int = 4, context: int = 4096, eos: int = 32000, random_weights: bool = False,
               dtype: type = np.float32, vocab: Path | None = None) -> Path:
    """Write a Phi-3 GGUF whose next-token logits are `logits` (token id -> value, every other token 0).

    With random_weights every tensor gets random values instead (the cost of a real model, not its
    behaviour); tensors of one shape share one random block, so even Phi-3-mini's size writes quickly.
    Special tokens keep logit 0 there, so a greedy reply never stops early. `vocab` takes the vocabulary from a
    vocabulary-only GGUF (real_vocabulary()) instead of the crafted one.
    """
    pieces, scores, types = real_vocabulary(vocab) if vocab else vocabulary()
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_name("phi3-crafted")
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(32000)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(PHI3_CHAT_TEMPLATE)

    rng = np.random.default_rng(0)
    blocks: dict[tuple[int, int], np.ndarray] = {}

    def weights(rows: int, cols: int) -> np.ndarray:
        if not random_weights:
            return np.zeros((rows, cols), dtype=dtype)
        if (rows, cols) not in blocks:
            blocks[rows, cols] = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)
        return blocks[rows, cols]

    def ones(*shape: int) -> np.ndarray:
        return np.ones(shape, dtype=np.float32)  # norms stay F32, as in the real file

    if random_weights:
        output = weights(N_VOCAB, n_embd).copy()
        output[sorted(set(SPECIAL_TOKENS.values()))] = 0
        embedding = weights(N_VOCAB, n_embd)
    else:
        output = np.zeros((N_VOCAB, n_embd), dtype=dtype)
        for token, value in logits.items():
            output[token, :] = value / n_embd
        embedding = np.ones((N_VOCAB, n_embd), dtype=dtype)
    writer.add_tensor("token_embd.weight", embedding)
    writer.add_tensor("output_norm.weight", ones(n_embd))
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(n_embd))
        writer.add_tensor(f"blk.{i}.attn_qkv.weight", weights(3 * n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(2 * n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_q4_k_m(source: Path, target: Path) -> Path:
    """Quantize with llama.cpp itself to Q4_K_M, the type of the real Phi-3 file."""
    import llama_cpp

    llama_cpp.llama_log_set(QUIET_LOG, ctypes.c_void_p(0))  # its per-tensor report would flood pytest's output
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"quantizing {source} failed")
    return target


def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


QUIET_LOG = None
try:
    import llama_cpp as _llama_cpp

    QUIET_LOG = _llama_cpp.llama_log_callback(_quiet_log)
except ImportError:  # quantizing needs it; writing F32 models does not
    pass


def tokenizer_json(specials: dict[str, int] = SPECIAL_TOKENS) -> bytes:
    """A tokenizer.json in Hugging Face's layout, listing the special tokens as Phi-3's does."""
    pieces = vocabulary()[0]
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": name != "<s>",
              "normalized": False, "special": True} for name, i in sorted(specials.items(), key=lambda kv: kv[1])]
    model = {"type": "BPE", "byte_fallback": True, "vocab": {p: i for i, p in enumerate(pieces[:32000])}, "merges": []}
    return json.dumps({"version": "1.0", "added_tokens": added, "model": model}, ensure_ascii=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hostile_ggufs(model: bytes) -> dict[str, bytes]:
    """Files that start like a GGUF and then lie: each must be refused without a crash, hang or huge allocation."""

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()

    header = b"GGUF" + struct.pack("<I", 3)
    return {
        "huge-string.gguf": header + struct.pack("<QQ", 0, 1) + text("general.architecture")
        + struct.pack("<IQ", 8, 2**62) + b"phi3",  # a string that claims 4 EiB
        "huge-array.gguf": header + struct.pack("<QQ", 0, 1) + text("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2**61) + text("a"),  # an array of 2**61 strings
        "huge-counts.gguf": header + struct.pack("<QQ", 2**60, 2**60),  # 2**60 tensors and keys
        "truncated.gguf": model[: len(model) // 2],  # a download cut in half
        "wrong-magic.gguf": b"GGML" + model[4:],
    }
