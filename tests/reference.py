"""What llama.cpp itself feeds a model for a conversation, the reference the tests hold phi_console.py's tokens to.

llama-cli, llama-server and Ollama render the GGUF's chat template with llama.cpp (llama_chat_apply_template) and
tokenize the result with special tokens parsed, so that Phi-3's rstrip rule applies: the whitespace right after
`<|user|>`, `<|end|>` and `<|assistant|>` is dropped.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp

from phi3_models import QUIET_LOG


@functools.cache
def vocabulary_of(path: Path) -> tuple[llama_cpp.llama_model_p, llama_cpp.llama_vocab_p]:
    """The model's vocabulary alone (no weights), loaded once per file."""
    llama_cpp.llama_log_set(QUIET_LOG, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp cannot read {path}"
    return model, llama_cpp.llama_model_get_vocab(model)


def llama_cpp_tokens(path: Path, messages: list[tuple[str, str]], *, reply_next: bool = True) -> list[int]:
    """The tokens llama.cpp feeds the model at `path` for these (role, text) messages; with reply_next, the
    template's opening of the assistant's turn ends them, as before a reply."""
    model, vocab = vocabulary_of(path)
    template = llama_cpp.llama_model_chat_template(model, None)
    contents = [text.encode() for _, text in messages]  # kept alive while llama.cpp reads them
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(role.encode(), text) for (role, _), text in zip(messages, contents)))
    size = 1 << 20
    buffer = ctypes.create_string_buffer(size)
    length = llama_cpp.llama_chat_apply_template(template, chat, len(messages), reply_next, buffer, size)
    assert 0 <= length <= size, "llama.cpp does not know this template"
    rendered = buffer.raw[:length]
    tokens = (llama_cpp.llama_token * (length + 8))()
    count = llama_cpp.llama_tokenize(vocab, rendered, length, tokens, length + 8, True, True)
    assert count >= 0
    return list(tokens[:count])
