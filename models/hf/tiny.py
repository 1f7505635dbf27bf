"""A small Hugging Face Llama folder and a Parquet text file, made offline, for examples, tests and benches.

    make_tiny_llama("models/tiny-llama")        # config.json + model.safetensors + tokenizer.json
    write_sample_text("data/stdlib_text.parquet")  # a "text" column of documents

Nothing is downloaded. The text is the Python standard library's own source files (sorted, each cut into
documents at blank-line paragraphs and grouped to a few KiB), read from this interpreter's installation,
so every machine with the same Python makes the same file. The tokenizer is a byte-level BPE trained on
that text with the ``tokenizers`` library; the model is a randomly initialised ``LlamaForCausalLM``
(seeded) of the tokenizer's vocabulary. Both are written atomically (temporary file or folder, fsync,
rename); an existing folder or file is never overwritten.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

MARKER = "plait_tiny.json"  # a folder made here (make_tiny_llama replaces only its own, never another)


def stdlib_documents(max_docs: int = 2000, doc_chars: int = 3000) -> list[str]:
    """Documents of Python source text: the standard library's files in sorted order, cut into ~doc_chars
    pieces at paragraph boundaries."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece = ""
        for para in text.split("\n\n"):
            piece = f"{piece}\n\n{para}" if piece else para
            if len(piece) >= doc_chars:
                docs.append(piece)
                piece = ""
                if len(docs) >= max_docs:
                    return docs
        if piece.strip():
            docs.append(piece)
            if len(docs) >= max_docs:
                return docs
    return docs


def write_sample_text(path: str | Path, max_docs: int = 2000) -> Path:
    """A Parquet file with one ``text`` column of stdlib documents at ``path`` (kept if it exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from plait.storage.folders import write_atomic

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": stdlib_documents(max_docs)}), sink)
    return write_atomic(path, sink.getvalue().to_pybytes())


def train_tokenizer(vocab_size: int = 512, max_docs: int = 600):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on stdlib text, with ``<s>`` / ``</s>`` specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_documents(max_docs), trainer=trainer)
    return tok


def char_tokenizer(alphabet: str):
    """A ``tokenizers.Tokenizer`` with one id per character of ``alphabet`` after ``<s>`` / ``</s>`` (ids 0, 1): a
    task's own small vocabulary (digits and signs for arithmetic), so every answer is one token per character.
    Encoding a text starts it with ``<s>``, as Llama's tokenizers do (a document's first token then has a
    position to attend to besides itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(dict.fromkeys(alphabet))
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def hf_tokenizer(tok):
    """A transformers fast tokenizer over ``tok`` with ``<s>`` / ``</s>`` as bos / eos (and pad) and a small chat
    template, so ``AutoTokenizer.from_pretrained`` on the folder knows them, as on a real model's folder."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_llama_config(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      max_positions: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=max_positions, bos_token_id=0,
                       eos_token_id=1, tie_word_embeddings=False)


def make_tiny_llama(folder: str | Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0, chars: str = "", max_positions: int = 256) -> Path:
    """Save a random ``LlamaForCausalLM`` (float32, safetensors) and its tokenizer (tokenizer.json,
    tokenizer_config.json with bos/eos and a chat template) at ``folder``: the stdlib BPE of ``vocab_size``, or
    with ``chars`` a character tokenizer of that alphabet (``char_tokenizer``).
    An existing folder is kept as it is (made here or not); returns ``folder``."""
    import torch
    from plait.storage.folders import write_folder
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if folder.is_dir() and os.listdir(folder):
        return folder

    def build(tmp: Path) -> None:
        tok = char_tokenizer(chars) if chars else train_tokenizer(vocab_size)
        cfg = tiny_llama_config(tok.get_vocab_size(), hidden, layers, heads, kv_heads, max_positions)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        hf_tokenizer(tok).save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json (specials, chat template)
        (tmp / MARKER).write_text(json.dumps({"written_by": "plait.models.hf.tiny.make_tiny_llama", "seed": seed,
                                              "chars": chars}))

    write_folder(folder, build, lambda p: (Path(p) / MARKER).is_file(), "tiny Llama")
    return folder


def tiny_mixtral_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                        experts: int = 4, top_k: int = 2, max_positions: int = 64):
    """A tiny random ``MixtralConfig`` (offline; float64 capable through torch's default dtype)."""
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, num_local_experts=experts, num_experts_per_tok=top_k,
                         max_position_embeddings=max_positions, router_aux_loss_coef=0.02, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False, attn_implementation="sdpa")


def tiny_qwen3_moe_config(vocab_size: int = 128, hidden: int = 32, layers: int = 3, heads: int = 4, kv_heads: int = 2,
                          experts: int = 4, top_k: int = 2, max_positions: int = 64, norm_topk_prob: bool = False,
                          mlp_only_layers: tuple[int, ...] = (1,), decoder_sparse_step: int = 1):
    """A tiny random ``Qwen3MoeConfig``: by default layer 1 is dense (``mlp_only_layers``), top-k not renormalised."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          moe_intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=hidden // heads, num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                          mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=decoder_sparse_step,
                          max_position_embeddings=max_positions, router_aux_loss_coef=0.02, bos_token_id=0,
                          eos_token_id=1, tie_word_embeddings=False, attn_implementation="sdpa")
