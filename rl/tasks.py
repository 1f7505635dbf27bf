"""Tasks with verifiable rewards, generated offline and deterministic under a seed.

    tasks = make_tasks("digit_sum", 512, seed=0)        # Task(prompt="3+4=", answer="7", ...)
    r = reward(tasks[0], tok.decode(completion_ids))    # 1.0 correct, else 0.0 (or format_reward)

Tasks (``**difficulty`` options, defaults in brackets):
  digit_sum   "3+4=" -> "7": two digits whose sum is a single digit, so a policy answering a uniformly
              random digit scores 10% and learning is visible within a few steps (but the sums are not
              uniform: always answering "9" scores about 29%, the first thing RL finds).
  addition    "12+345=" -> "357": operands of 1..``digits`` [2] digits.
  reversal    "rev abc=" -> "cba": ``min_len``..``max_len`` [3..6] lowercase letters.
  countdown   "3 5 7:22=" -> "(3*5)+7": reach the target from ``count`` [3] numbers in 1..``max_number`` [10]
              with + - * and parentheses, each number used at most once (not all need be used). The
              target is built from a random expression over the numbers, so one solution always exists.

Task ``i`` of a (name, seed, difficulty) depends on nothing else: ``make_tasks(..., n=10)`` is the first ten
of ``make_tasks(..., n=1000)``, so a resumed run that knows its position gets the same stream.

``reward`` compares the completion TEXT (decode the completion ids with the tokenizer, which stops at the
first eos; surrounding spaces are ignored). Countdown answers are checked by a small recursive-descent
parser over integers, + - * and parentheses: no ``eval``, nothing else is accepted. ``format_reward`` (default
0) is given to a well-formed but wrong answer (only digits for the sums, only letters for reversal, a
parsable expression over the given numbers for countdown): a small shaping term for cold starts.
"""

from __future__ import annotations

import inspect
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

MAX_EXPRESSION_CHARS = 128


@dataclass(frozen=True)
class Task:
    name: str  # which task family ("digit_sum", "addition", "reversal", "countdown")
    prompt: str  # what the policy is given (append nothing: the prompt ends with its cue, e.g. "=")
    answer: str  # one correct completion (for a supervised warm start; countdown accepts any solution)
    meta: dict = field(default_factory=dict)  # countdown: {"numbers": [...], "target": int}


def _digit_sum(rng: random.Random) -> Task:
    a = rng.randint(0, 9)
    b = rng.randint(0, 9 - a)
    return Task("digit_sum", f"{a}+{b}=", str(a + b))


def _addition(rng: random.Random, digits: int = 2) -> Task:
    if digits < 1:
        raise ValueError(f"addition digits={digits}: give 1 or more")
    a, b = (rng.randint(0, 10 ** rng.randint(1, digits) - 1) for _ in range(2))
    return Task("addition", f"{a}+{b}=", str(a + b))


def _reversal(rng: random.Random, min_len: int = 3, max_len: int = 6) -> Task:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"reversal min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
    return Task("reversal", f"rev {word}=", word[::-1])


def _countdown(rng: random.Random, count: int = 3, max_number: int = 10) -> Task:
    if count < 2 or max_number < 1:
        raise ValueError(f"countdown count={count}, max_number={max_number}: need count >= 2 and max_number >= 1")
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        pool = [(n, str(n)) for n in rng.sample(numbers, rng.randint(2, count))]  # a random subset, shuffled
        while len(pool) > 1:  # combine two random operands until one expression is left
            (x, ex), (y, ey) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            op = rng.choice("+-*")
            value = x + y if op == "+" else x - y if op == "-" else x * y
            pool.append((value, f"({ex}{op}{ey})"))
        target, expression = pool[0]
        if target > 0:
            answer = expression[1:-1]  # the outermost parentheses are redundant
            prompt = f"{' '.join(map(str, numbers))}:{target}="
            return Task("countdown", prompt, answer, {"numbers": numbers, "target": target})


TASKS: dict[str, Callable[..., Task]] = {
    "digit_sum": _digit_sum, "addition": _addition, "reversal": _reversal, "countdown": _countdown,
}


def make_tasks(name: str, n: int, seed: int = 0, **difficulty) -> list[Task]:
    """``n`` tasks of family ``name``; task i is drawn from its own RNG seeded by (name, seed, i)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}")
    options = list(inspect.signature(TASKS[name]).parameters)[1:]
    unknown = sorted(set(difficulty) - set(options))
    if unknown:
        raise ValueError(f"task {name!r} has no option {unknown}: its options are {options}")
    return [TASKS[name](random.Random(f"{name}:{seed}:{i}"), **difficulty) for i in range(n)]


def reward(task: Task, completion: str, *, format_reward: float = 0.0) -> float:
    """1.0 for a correct completion, ``format_reward`` for a well-formed wrong one, 0.0 otherwise."""
    text = completion.strip()
    if task.name == "countdown":
        try:
            value = evaluate_countdown(text, task.meta["numbers"])
        except ValueError:
            return 0.0
        return 1.0 if value == task.meta["target"] else format_reward
    if text == task.answer:
        return 1.0
    if task.name in ("digit_sum", "addition"):
        return format_reward if text.isdigit() and text.isascii() else 0.0
    if task.name == "reversal":
        return format_reward if text and all(c in string.ascii_lowercase for c in text) else 0.0
    raise ValueError(f"task {task.name!r} has no reward: use a task from make_tasks ({sorted(TASKS)})")


def evaluate_countdown(expression: str, numbers: list[int]) -> int:
    """The value of an expression over integers, + - * and parentheses in which every integer is one of
    ``numbers``, each used at most as often as it appears there. Raises ValueError (naming the offending
    part) on anything else: other characters, unary minus, empty or unbalanced parentheses, reuse."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(expression)} characters is longer than {MAX_EXPRESSION_CHARS}")
    parser = _Parser(_lex(expression), Counter(numbers))
    value = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ValueError(f"unexpected {parser.tokens[parser.pos]!r} after a complete expression in {expression!r}")
    return value


def _lex(expression: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(expression):
        c = expression[i]
        if c.isdigit() and c.isascii():
            j = i
            while j < len(expression) and expression[j].isdigit() and expression[j].isascii():
                j += 1
            tokens.append(expression[i:j])
            i = j
        elif c in "+-*()":
            tokens.append(c)
            i += 1
        elif c == " ":
            i += 1
        else:
            raise ValueError(f"character {c!r} at position {i} is not allowed in a countdown expression "
                             "(integers, + - * and parentheses only)")
    return tokens


class _Parser:
    """expr := term (('+' | '-') term)* ; term := factor ('*' factor)* ; factor := INT | '(' expr ')'."""

    def __init__(self, tokens: list[str], available: Counter):
        self.tokens, self.pos, self.available = tokens, 0, available

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> int:
        value = self.term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> int:
        value = self.factor()
        while self._peek() == "*":
            self.pos += 1
            value *= self.factor()
        return value

    def factor(self) -> int:
        tok = self._peek()
        if tok is None:
            raise ValueError("the expression ends where a number or '(' was expected")
        self.pos += 1
        if tok == "(":
            value = self.expr()
            if self._peek() != ")":
                raise ValueError(f"'(' without a matching ')' (found {self._peek()!r})")
            self.pos += 1
            return value
        if not tok.isdigit():
            raise ValueError(f"{tok!r} where a number or '(' was expected")
        if len(tok) > 1 and tok[0] == "0":
            raise ValueError(f"number {tok!r} has a leading zero")
        number = int(tok)
        if number not in self.available:
            raise ValueError(f"number {number} is not among the given numbers {sorted(self.available.elements())}")
        if self.available[number] <= 0:
            raise ValueError(f"number {number} is used more often than it is given")
        self.available[number] -= 1
        return number
