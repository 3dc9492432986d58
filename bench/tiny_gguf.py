"""The ``tiny`` pair as GGUF files, so that llama.cpp (``llama-server``) can run it where the real Qwen
models are absent (CI): tests and ``sqs-bench llama-server --quick``.

The weights are written as they are (F32, HF tensor names mapped to llama.cpp's by gguf's own name
map); the architecture is llama.cpp's ``qwen2``, the tiny models' own. The 128-token ASCII tokenizer
becomes a byte-level BPE vocabulary ("gpt2") of the 128 single bytes in id order, so llama.cpp
tokenizes ASCII text to the same ids as :class:`sqs_models.tokenizer.AsciiTokenizer` (id = byte).
llama.cpp needs at least one merge; the one written ("~ ~") makes a token that is not in the
vocabulary, which llama.cpp splits back into its bytes, so it changes no tokenization.

The pair has no EOS; llama.cpp assigns one anyway (a BPE vocabulary's default, id 11), so requests
to a tiny model should set ``ignore_eos`` to generate their full length.
"""

from __future__ import annotations

from pathlib import Path


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode(): the printable character that stands for each byte 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: str | Path, role: str = "target", seed: int = 0) -> Path:
    """Write the tiny model of `role` (target | draft, :func:`sqs_models.tiny.build_tiny`) to `path`."""
    import gguf

    from sqs_models.tiny import TINY_SPEC, _config, build_tiny

    spec = TINY_SPEC
    cfg = _config(spec)
    model = build_tiny(role, seed)
    path = Path(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, spec.num_layers)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name(f"sqs-tiny-{role}-seed{seed}")
    w.add_context_length(spec.max_positions)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_chars()[: spec.vocab_size])
    w.add_token_types([gguf.TokenType.NORMAL] * spec.vocab_size)
    w.add_token_merges(["~ ~"])
    w.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        w.add_tensor(new, tensor.detach().to("cpu").float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
