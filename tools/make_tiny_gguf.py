#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF model that llama.cpp really loads (for tests).

The weights are seeded random numbers, so the text is gibberish, but the file goes through
the same loader, tokenizer, sampler and chat template as a real model. Nothing is
downloaded: a test can build its model in a few milliseconds.

Token suppression (on by default): a random model would sample EOS, ``<|im_end|>`` and raw
byte tokens at random, so generations would end early, overshoot ``max_tokens`` and
stall streams (llama-cpp-python holds back bytes that are not valid UTF-8). Hidden
channel 0 is reserved to prevent that: every embedding holds 1.0 there, no layer writes
to it, the final norm scales it by 8 and ``output.weight`` has -1 in column 0 for every
token that is not a normal text piece. Those tokens get a large negative logit, so every
generation runs to exactly ``max_tokens`` tokens of printable ASCII, one stream chunk
per token.

Same arguments (and the same numpy version) give the same bytes.

    python tools/make_tiny_gguf.py OUT.gguf [--seed 0] [--dtype f32] [--check]

Needs ``numpy`` and ``gguf`` (``.ci/install-llama-cpp`` installs the pinned versions).
"""

import argparse
import itertools
import os
import random
import string
import sys

import numpy as np
import gguf

SPACE = "\u2581"   # SentencePiece's marker for a space
CHATML_TEMPLATE = (   # exactly llama-cpp-python's CHATML_CHAT_TEMPLATE, so it picks "chatml"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FIRST_WORDS = ("hello", "world", "the", "edge", "model")
DTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
NORMAL = gguf.TokenType.NORMAL
SUPPRESSED_LOGIT_SCALE = 8.0   # final-norm gain on channel 0: the suppression margin
INIT_STD = 0.02


# -- vocabulary ------------------------------------------------------------------------

def build_vocab(vocab_size, seed):
    """Return (tokens, token_types): specials, 256 byte tokens, chars, words, pseudo-words.

    SentencePiece only reaches a word by merging left to right, so every word comes with
    all its prefixes ("▁h", "▁he", ...). All multi-character pieces start with "▁", which
    keeps the merge path unique.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += ["<0x%02X>" % b for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2
    chars = [SPACE] + list(string.printable[:94])   # the 94 visible ASCII characters
    minimum = len(tokens) + len(chars) + 1
    if vocab_size < minimum:
        raise ValueError("vocab_size=%d is too small: it must be at least %d"
                         % (vocab_size, minimum))
    known = set(tokens)
    prefixes = (SPACE + w[:i] for w in _words(seed) for i in range(1, len(w) + 1))
    for piece in itertools.chain(chars, prefixes):
        if len(tokens) == vocab_size:
            break
        if piece not in known:
            known.add(piece)
            tokens.append(piece)
            types.append(NORMAL)
    return tokens, types


def _words(seed):
    """The fixed first words, then an endless seeded stream of lowercase pseudo-words."""
    yield from FIRST_WORDS
    rng = random.Random(seed)   # Python's Random is stable across versions, numpy's is not
    while True:
        yield "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))


# -- tensors ---------------------------------------------------------------------------

def tensor_plan(dim, layers, heads, kv_heads, ff, vocab_size):
    """(name, numpy shape) of every tensor, in file order."""
    head_dim = dim // heads
    plan = [("token_embd.weight", (vocab_size, dim)), ("output_norm.weight", (dim,)),
            ("output.weight", (vocab_size, dim))]
    for n in range(layers):
        b = "blk.%d." % n
        plan += [(b + "attn_norm.weight", (dim,)),
                 (b + "attn_q.weight", (heads * head_dim, dim)),
                 (b + "attn_k.weight", (kv_heads * head_dim, dim)),
                 (b + "attn_v.weight", (kv_heads * head_dim, dim)),
                 (b + "attn_output.weight", (dim, heads * head_dim)),
                 (b + "ffn_norm.weight", (dim,)),
                 (b + "ffn_gate.weight", (ff, dim)),
                 (b + "ffn_up.weight", (ff, dim)),
                 (b + "ffn_down.weight", (dim, ff))]
    return plan


def make_tensor(name, shape, rng, suppressed_ids, suppress):
    """Seeded float32 weights for one tensor, with the channel-0 suppression applied."""
    if len(shape) == 1:   # norm weights
        data = np.ones(shape, dtype=np.float32)
        if suppress and name == "output_norm.weight":
            data[0] = SUPPRESSED_LOGIT_SCALE
        return data
    data = (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(np.float32)
    if not suppress:
        return data
    if name == "token_embd.weight":
        data[:, 0] = 1.0
    elif name.endswith(("attn_output.weight", "ffn_down.weight")):
        data[0, :] = 0.0   # no layer writes to channel 0
    elif name == "output.weight":
        data[:, 0] = 0.0
        data[suppressed_ids, 0] = -1.0
    return data


def encode(data, qtype):
    """The bytes-to-be of a tensor: float arrays as is, quantized ones as uint8 blocks."""
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def encoded_info(shape, qtype):
    """(dtype, shape, nbytes) that add_tensor_info needs before any data exists."""
    if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return np.float32, shape, int(np.prod(shape)) * 4
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.float16, shape, int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return np.uint8, byte_shape, int(np.prod(byte_shape))


# -- file ------------------------------------------------------------------------------

def add_metadata(writer, dim, layers, heads, kv_heads, ff, ctx, tokens, types, chat_template):
    writer.add_name("fm-edge-tiny")
    writer.add_context_length(ctx)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(CHATML_TEMPLATE)


def check_shape(dim, layers, heads, kv_heads, ff, ctx, dtype):
    if dtype not in DTYPES:
        raise ValueError("dtype=%r is not supported: use one of %s" % (dtype, ", ".join(DTYPES)))
    if dim % heads or heads % kv_heads:
        raise ValueError("dim=%d must be a multiple of heads=%d, and heads of kv_heads=%d"
                         % (dim, heads, kv_heads))
    if dtype in ("q8_0", "q4_0") and (dim % 32 or ff % 32):
        raise ValueError("dtype=%s needs dim and ff to be multiples of 32 (got %d, %d)"
                         % (dtype, dim, ff))
    if min(dim, layers, heads, kv_heads, ff, ctx) < 1:
        raise ValueError("dim, layers, heads, kv_heads, ff and ctx must all be >= 1")


def make_tiny_gguf(path, seed=0, dim=64, layers=2, heads=4, kv_heads=None, ff=None,
                   ctx=256, vocab_size=512, dtype="f32", suppress=True, chat_template=True):
    """Write the model to ``path`` (atomically) and return ``path``.

    ``chat_template=False`` leaves out the ChatML template, for code paths that handle a
    base model without one.

    Tensors are streamed one at a time, so large shapes (for benchmarks) need little RAM.
    """
    kv_heads = kv_heads or heads
    ff = ff or 3 * dim
    check_shape(dim, layers, heads, kv_heads, ff, ctx, dtype)
    qtype = DTYPES[dtype]
    tokens, types = build_vocab(vocab_size, seed)
    suppressed_ids = [i for i, t in enumerate(types) if t != NORMAL]
    plan = tensor_plan(dim, layers, heads, kv_heads, ff, vocab_size)

    tmp_path = "%s.tmp-%d" % (path, os.getpid())
    writer = gguf.GGUFWriter(tmp_path, "llama")
    try:
        add_metadata(writer, dim, layers, heads, kv_heads, ff, ctx, tokens, types,
                     chat_template)
        for name, shape in plan:
            np_dtype, enc_shape, nbytes = encoded_info(shape, qtype)
            raw = None if np_dtype != np.uint8 else qtype
            writer.add_tensor_info(name, enc_shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for name, shape in plan:
            writer.write_tensor_data(encode(make_tensor(name, shape, rng, suppressed_ids,
                                                        suppress), qtype))
    finally:
        writer.close()
    os.replace(tmp_path, path)
    return path


# -- command line ----------------------------------------------------------------------

def check_model(path, n_ctx, max_tokens=64):
    """Load the model with llama_cpp and show that generations have the promised length."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=os.cpu_count(),
                          verbose=False)
    out = llm.create_completion("hello world", max_tokens=max_tokens, seed=1,
                                temperature=1.0, top_k=0)
    got = out["usage"]["completion_tokens"]
    print("check: %d of %d tokens, finish_reason=%s, text=%r"
          % (got, max_tokens, out["choices"][0]["finish_reason"], out["choices"][0]["text"][:60]))
    llm.close()
    return got == max_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--ff", type=int, default=None, help="default: 3 * --dim")
    parser.add_argument("--ctx", type=int, default=256, help="training context length")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    parser.add_argument("--no-suppress", dest="suppress", action="store_false",
                        help="do not bake the EOS/control/byte-token suppression in")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="leave out the ChatML chat template")
    parser.add_argument("--check", action="store_true",
                        help="load the result with llama_cpp and generate 64 tokens")
    args = parser.parse_args(argv)
    make_tiny_gguf(args.out, seed=args.seed, dim=args.dim, layers=args.layers,
                   heads=args.heads, kv_heads=args.kv_heads, ff=args.ff, ctx=args.ctx,
                   vocab_size=args.vocab_size, dtype=args.dtype, suppress=args.suppress,
                   chat_template=args.chat_template)
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))
    if args.check and not check_model(args.out, n_ctx=args.ctx):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
