"""The policy: a model of any registered family and its tokenizer, what generators and the trainer both build.

    [model]
    path = "runs/sft/outputs/hf_export"  # a local HF folder (config.json, safetensors, tokenizer): any family
                                         # plait.models knows; "" = Plait's GPT with the sizes below and the
                                         # built-in character tokenizer (rl/tokenizer.py)
    chat_template = true                 # chat-message prompts go through the tokenizer's chat template
    stop = ["\\n\\n"]                     # more strings that end a completion (besides the eos token)

``Tokens`` is what the RL code asks of a tokenizer, the same for both: ``prompt_ids(prompt)`` (text, or chat
messages rendered by the chat template with the generation cue), ``answer_ids(text)`` (for a supervised warm start:
the text and eos), ``decode(ids)`` (up to the first eos, specials dropped), ``eos_id``, ``pad_id``,
``stop_ids`` (every id that ends a completion) and ``vocab_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from plait.models.gpt import GPTConfig
from plait.rl.tokenizer import CharTokenizer
from plait.runtime.config import ConfigError
from torch import nn

DTYPES = ("float32", "bfloat16", "float64")


@dataclass
class PolicyConfig:
    path: str = ""  # a local HF folder; "" = Plait's GPT with the sizes below and the character tokenizer
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    chat_template: bool = True  # chat messages (and, with apply_to_text, text prompts) through the chat template
    apply_to_text: bool = False  # render a text prompt as one user message too
    stop: list[str] = field(default_factory=list)  # strings that end a completion besides eos
    vocab_size: int = 54  # Plait's GPT (no path): models/gpt.py's GPTConfig
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    max_seq_len: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"model.stop={self.stop!r}: a list of non-empty strings")

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, ffn_hidden=self.ffn_hidden,
                         max_seq_len=self.max_seq_len, rope_theta=self.rope_theta, norm_eps=self.norm_eps)


class CharTokens:
    """The built-in character tokenizer behind the Tokens interface (bos before a prompt, eos after an answer)."""

    def __init__(self, stop: list[str] | None = None):
        self.tok, self.stop = CharTokenizer(), list(stop or [])
        self.eos_id, self.pad_id, self.vocab_size = self.tok.eos_id, self.tok.pad_id, self.tok.vocab_size
        self.stop_ids = (self.eos_id,)

    def prompt_ids(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            prompt = "".join(m["content"] for m in prompt)  # no chat template: the messages' text in order
        return self.tok.encode(prompt, bos=True)

    def answer_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, eos=True)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i < self.vocab_size]  # ids past the vocabulary: a model with a larger vocab_size
        return cut_at_stop(self.tok.decode(ids), self.stop)


class HFTokens:
    """A HF folder's tokenizer (transformers' AutoTokenizer, local files only) behind the Tokens interface."""

    def __init__(self, folder: str | Path, chat_template: bool = True, apply_to_text: bool = False,
                 stop: list[str] | None = None):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers' error, restated with the fix
            raise ConfigError(f"model.path={folder}: its tokenizer does not load ({type(e).__name__}: {e}); the folder "
                              "needs tokenizer.json (+ tokenizer_config.json), as save_pretrained writes") from None
        if self.tok.eos_token_id is None:
            raise ConfigError(f"model.path={folder}: the tokenizer names no eos token, so completions could not end: "
                              "set eos_token in its tokenizer_config.json")
        self.chat, self.apply_to_text, self.stop = chat_template, apply_to_text, list(stop or [])
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self.tok)
        ends = {self.eos_id} | generation_eos(folder)
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):  # chat templates' end-of-turn tokens
            if token in self.tok.get_vocab():
                ends.add(self.tok.convert_tokens_to_ids(token))
        self.stop_ids = tuple(sorted(ends))

    def prompt_ids(self, prompt: Any) -> list[int]:
        messages = prompt if not isinstance(prompt, str) else (
            [{"role": "user", "content": prompt}] if self.apply_to_text else None)
        if messages is not None and self.chat and self.tok.chat_template:
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # transformers 5: a BatchEncoding
        if messages is not None:
            prompt = "".join(m["content"] for m in messages)
        return list(self.tok(prompt, add_special_tokens=True)["input_ids"])

    def answer_ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        for at, i in enumerate(ids):
            if i in self.stop_ids:
                ids = ids[:at]
                break
        return cut_at_stop(self.tok.decode(ids, skip_special_tokens=True), self.stop)


def generation_eos(folder: str | Path) -> set[int]:
    """The eos ids a folder's generation_config.json names (one id or a list, as Llama 3 writes); none without."""
    import json

    try:
        eos = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first stop string (the stop string dropped)."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@dataclass
class Policy:
    """The family's spec, its model config and the tokenizer: what every generator and trainer rank builds.

    With ``lora`` (the job's ``[train.lora]``, rank > 0) the model is the family's with peft adapters on the
    target modules (``plait.models.lora``): ``spec`` is then the adapted model's (its ``load_weights`` reads
    the folder's base weights and initialises the adapters from ``seed``), ``base_spec`` the family's, and
    ``synced`` names what a weight sync carries (the adapters)."""

    cfg: PolicyConfig
    spec: Any = None
    config: Any = None
    lora: Any = None  # plait.models.lora.LoraSettings
    seed: int = 0  # the adapters' initial values (trainer)
    base_spec: Any = None

    def __post_init__(self) -> None:
        self._family()
        self.base_spec = self.spec
        if self.lora is not None and self.lora.rank:
            from plait.models.lora import lora_spec

            self.spec = lora_spec(self.spec, self.lora, self.seed)

    def _family(self) -> None:
        from plait.models import model_spec, spec_for_config

        if not self.cfg.path:
            self.spec, self.config = model_spec("gpt"), self.cfg.gpt()
            return
        folder = Path(self.cfg.path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path={folder} has no config.json: point it at a local Hugging Face model folder "
                              "(an SFT run's outputs/hf_export, save_pretrained ...)")
        from plait.models.hf.family import read_config

        self.config = read_config(folder, self.cfg.attn_implementation)
        try:
            self.spec = spec_for_config(self.config)
        except ValueError as e:
            raise ConfigError(f"model.path={folder}: {e}") from None

    def tokens(self) -> CharTokens | HFTokens:
        if not self.cfg.path:
            return CharTokens(self.cfg.stop)
        return HFTokens(self.cfg.path, self.cfg.chat_template, self.cfg.apply_to_text, self.cfg.stop)

    @property
    def vocab_size(self) -> int:
        return self.spec.shape(self.config).vocab_size

    @property
    def max_positions(self) -> int:
        return getattr(self.config, "max_seq_len", None) or getattr(self.config, "max_position_embeddings", 1 << 30)

    def build(self, dtype: torch.dtype | None = None, base: bool = False) -> nn.Module:
        """The model in ``dtype`` (default: the config's ``model.dtype``), randomly initialised (its weights:
        ``spec.load_weights(model, weights)``, or ``parallelize(..., weights=)``); ``base``: without adapters."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or getattr(torch, self.cfg.dtype))
        try:
            return (self.base_spec if base else self.spec).build(self.config)
        finally:
            torch.set_default_dtype(previous)

    @property
    def synced(self):
        """Which parameters (by name) a weight sync carries: None = all; a LoRA policy's adapters only."""
        from plait.models.lora import synced_names

        return synced_names(self.lora)

    @property
    def weights(self) -> str | None:
        """The folder to load weights from (None: Plait's GPT, initialised from the seed)."""
        return self.cfg.path or None
