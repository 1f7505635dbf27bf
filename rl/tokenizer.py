"""A character-level tokenizer that ships with Plait: a fixed vocabulary, no files to download.

    tok = CharTokenizer()
    ids = tok.encode("3+4=", bos=True)                 # [bos, '3', '+', '4', '=']
    tok.decode(ids + [tok.eos_id, tok.encode("9")[0]])  # '3+4=': decoding stops at eos, specials dropped
    batch = left_pad([tok.encode(p, bos=True) for p in prompts], tok.pad_id)

Ids 0, 1, 2 are the special tokens pad, bos and eos; then digits, lowercase letters, space and the
characters in ``SYMBOLS``. The vocabulary never changes, so ids stay valid across runs and checkpoints;
``vocab_size`` (54) is what ``GPTConfig.vocab_size`` must at least be.

Generation wants prompts LEFT-padded (the last prompt token of every row in the last column, so one
decode step serves the whole batch); ``left_pad`` returns the tokens with the mask of real tokens and the
RoPE position of each (0 at a row's first real token), which is what ``plait.rl.generate`` uses.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import ClassVar

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>")
SYMBOLS = "+-*=()" + " " + ".,:;?!'/"
CHARACTERS = string.digits + string.ascii_lowercase + SYMBOLS


@dataclass(frozen=True)
class CharTokenizer:
    """Characters of ``CHARACTERS`` map to ids ``3 ..``; pad/bos/eos are 0/1/2."""

    characters: str = CHARACTERS
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if len(set(self.characters)) != len(self.characters):
            raise ValueError(f"characters {self.characters!r} repeat a character: give each once")
        object.__setattr__(self, "_ids", {c: i + len(SPECIALS) for i, c in enumerate(self.characters)})

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.characters)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text``'s characters (with bos first / eos last when asked). Upper case is not folded."""
        ids = []
        for pos, char in enumerate(text):
            if char not in self._ids:
                raise ValueError(f"character {char!r} at position {pos} of {text!r} is not in the tokenizer's "
                                 f"vocabulary {self.characters!r}: remove it or map it to one of those")
            ids.append(self._ids[char])
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        """The text of ``ids`` (a list or 1-D tensor): pad and bos are dropped, and the text ends at the first
        eos (``stop_at_eos=False`` drops eos like the others and reads on)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = []
        for pos, i in enumerate(ids):
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i < len(SPECIALS):
                continue
            if i >= self.vocab_size:
                raise ValueError(f"id {i} at position {pos} is outside the vocabulary (size {self.vocab_size}): "
                                 "the ids come from another tokenizer or a model with a larger vocab_size")
            chars.append(self.characters[i - len(SPECIALS)])
        return "".join(chars)


@dataclass
class PaddedBatch:
    """Left-padded prompts: ``tokens`` (B, P) long, ``mask`` (B, P) bool (True at real tokens),
    ``positions`` (B, P) long (0 at each row's first real token; 0 at padding too, which is masked) and
    ``lengths`` (B,) long, the real tokens per row."""

    tokens: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor


def left_pad(sequences: list[list[int]], pad_id: int) -> PaddedBatch:
    """Stack id lists into one (B, max length) batch, padding on the left so the last tokens align."""
    if not sequences:
        raise ValueError("left_pad got no sequences: pass at least one id list")
    empty = [i for i, s in enumerate(sequences) if len(s) == 0]
    if empty:
        raise ValueError(f"sequences {empty[:8]} are empty: every prompt needs at least one token (e.g. bos)")
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tokens[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = True
    return PaddedBatch(tokens=tokens, mask=mask, positions=(mask.cumsum(1) - 1).clamp(min=0),
                       lengths=mask.sum(1))
