"""Rewards: a function you bring as ``"module:function"`` (veRL's signature), or a built-in one, run safely.

    [reward]
    function = "my_rewards:compute_score"    # my_rewards.py beside the spec or where `plait run` starts
    timeout_s = 5.0                          # one sample's limit; a sample past it scores on_error
    on_error = 0.0

    def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict) -> float | dict

A dict result carries ``"score"`` (the reward) and anything else (logged as the sample's extras). Built in:

  exact_match   1 when the completion, stripped, equals the ground truth (stripped), else 0
  math          a math answer verifier: the completion's answer (after ``####``, inside the last ``\\boxed{}``,
                or else its last number) equals the ground truth's as a number (integers, decimals, fractions
                a/b, thousands separators; relative tolerance 1e-6). Parsed, never ``eval``-ed
  format        1 when the completion ends with a ``#### <number>`` line (or holds a ``\\boxed{}``), else 0
  task          the built-in tasks' own check (rl/tasks.py: digit_sum, addition, reversal, countdown)

A function you bring runs in a separate process (one per generator, started once, the function imported before
any sample is timed; a module that is a local file goes there as source): a function that raises, or
runs past ``timeout_s`` (its process is killed and a fresh one started), scores ``on_error`` for that sample,
and the failure is counted and kept with its sample (``RewardRunner.failures``) for the logs. When more than
``max_error_share`` of a batch fails the job stops with the first error: a broken reward is not training
signal. Built-ins run in the generator itself.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import numbers
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

BUILTIN = ("exact_match", "math", "format", "task")
START_S = 120.0  # the reward process's start and first import of the function (no sample's time)
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


@dataclass
class RewardConfig:
    function: str = "task"  # a built-in name, or "module:function"
    timeout_s: float = 5.0  # one sample's limit (a function you bring)
    on_error: float = 0.0  # the score of a sample whose reward raised or timed out
    max_error_share: float = 0.5  # a batch with more failures than this stops the job

    def check(self) -> None:
        if ":" not in self.function and self.function not in BUILTIN:
            raise ValueError(f"reward.function={self.function!r}: a built-in ({', '.join(BUILTIN)}) or "
                             "'module:function' (e.g. 'my_rewards:compute_score', my_rewards.py beside the spec)")
        if self.timeout_s <= 0 or not 0 <= self.max_error_share <= 1:
            raise ValueError(f"reward.timeout_s={self.timeout_s} (> 0), reward.max_error_share="
                             f"{self.max_error_share} (in [0, 1]) out of range")


def parse_number(text: str) -> Fraction | None:
    """A number written as an integer, a decimal, a fraction a/b or with thousands separators; None otherwise."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)(/\d+)?", text):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: after the last ``####``, inside the last ``\\boxed{...}``, or its last
    number; None when it gives none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        return tail[0].strip() if tail else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def math_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    answer, truth = extract_answer(solution_str), extract_answer(str(ground_truth)) or str(ground_truth)
    if answer is None:
        return 0.0
    a, b = parse_number(answer), parse_number(truth)
    if a is None or b is None:
        return float(answer.strip() == truth.strip())
    return float(abs(a - b) <= abs(b) * Fraction(1, 10**6) or a == b)


def exact_match(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    return float(solution_str.strip() == str(ground_truth).strip())


def format_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    text = solution_str.strip()
    last = text.splitlines()[-1] if text else ""
    return float(bool(re.fullmatch(rf"####\s*({_NUMBER})", last.strip())) or _last_boxed(text) is not None)


def task_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    from plait.rl.tasks import Task, reward

    info = extra_info or {}
    task = Task(data_source, info.get("prompt", ""), str(ground_truth), info.get("meta", {}))
    return reward(task, solution_str, format_reward=float(info.get("format_reward", 0.0)))


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "math": math_score, "format": format_score,
                                 "task": task_score}


def load_reward(name: str, search: list[str] | None = None) -> Callable:
    """The reward function ``name`` (a built-in, or ``module:function`` found on ``search`` + sys.path);
    ValueError naming what is missing and how to give it."""
    if name in BUILTINS:
        return BUILTINS[name]
    module_name, _, attr = name.partition(":")
    for folder in search or []:
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward.function={name!r}: cannot import {module_name!r} ({e}); put {module_name}.py "
                         "beside the spec or in the directory `plait run` starts in") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function={name!r}: {module_name} has no function {attr!r} (it has "
                         f"{sorted(n for n in dir(module) if not n.startswith('_'))[:8]})")
    return fn


def reward_code(name: str) -> dict[str, tuple[str, str]]:
    """``{module: (path, source)}`` of a reward module that is a single local .py file (found where the driver
    imports it: beside the spec or in the directory `plait run` starts in), shipped to the generator actors with
    the job's code, so cluster nodes need not have the file; {} for a built-in or an installed package."""
    import importlib.util

    if name in BUILTINS:
        return {}
    module_name = name.partition(":")[0]
    found = importlib.util.find_spec(module_name)
    origin = Path(found.origin) if found is not None and found.origin else None
    if origin is None or origin.name == "__init__.py" or "site-packages" in origin.parts or "." in module_name:
        return {}
    return {module_name: (str(origin), origin.read_text())}


def _call(name: str, search: list[str], args: tuple) -> Any:
    """In the reward process: load (once, cached by the import system) and call."""
    return load_reward(name, search)(*args)


def _load(name: str, search: list[str], code: dict[str, tuple[str, str]]) -> None:
    """In the reward process, as it starts: install the module's shipped source (``code``, as the generator
    actor got it with the job's code) and import the function (its import time counts against no sample)."""
    import importlib.util

    for module_name, (path, source) in code.items():
        if module_name in sys.modules:
            continue
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader=None,
                                                                                 origin=path))
        module.__file__ = path
        sys.modules[module_name] = module
        try:
            exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - the user's own reward module
        except BaseException:
            del sys.modules[module_name]
            raise
    load_reward(name, search)


@dataclass
class Failure:
    sample: dict  # data_source, solution_str, ground_truth
    error: str


@dataclass
class RewardRunner:
    """Scores completions with one reward function; a function you bring runs in its own process."""

    cfg: RewardConfig
    search: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # this runner's, oldest first (the caller drains them)
    _pool: cf.ProcessPoolExecutor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.builtin = BUILTINS.get(self.cfg.function)
        self._code: dict[str, tuple[str, str]] = {}
        if self.builtin is None:
            load_reward(self.cfg.function, self.search)  # fail here, in the generator's start, not per sample
            try:  # a local module goes to the reward process as source: in a generator actor it was installed
                self._code = reward_code(self.cfg.function)  # from the job's code, on no path a process imports from
            except (OSError, ValueError):
                pass  # its file is not on this node: the reward process imports it from the path, if it can

    def score(self, samples: list[tuple[str, str, str, dict]]) -> tuple[list[float], list[dict]]:
        """(scores, extras) of ``(data_source, solution_str, ground_truth, extra_info)`` samples."""
        scores, extras, failed = [], [], []
        for sample in samples:
            try:
                value = self.builtin(*sample) if self.builtin is not None else self._isolated(sample)
                score, extra = _as_score(value)
            except Exception as e:  # noqa: BLE001 - the user's function: counted, logged, scored on_error
                failed.append(Failure({"data_source": sample[0], "solution_str": sample[1],
                                       "ground_truth": sample[2]}, f"{type(e).__name__}: {e}"))
                score, extra = self.cfg.on_error, {"reward_error": 1.0}
            scores.append(score)
            extras.append(extra)
        self.failures.extend(failed)
        if samples and len(failed) / len(samples) > self.cfg.max_error_share:
            raise RuntimeError(f"reward.function={self.cfg.function!r} failed on {len(failed)} of {len(samples)} "
                               f"samples (more than reward.max_error_share={self.cfg.max_error_share}); the first: "
                               f"{failed[0].error} on {failed[0].sample!r}")
        return scores, extras

    def _start(self) -> None:
        """A fresh reward process with the function imported: reward.timeout_s is one sample's limit, so the
        process's start (seconds on a loaded machine) and the module's imports are not charged to a sample."""
        self._pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            self._pool.submit(_load, self.cfg.function, self.search, self._code).result(
                timeout=max(START_S, self.cfg.timeout_s))
        except cf.TimeoutError:
            self.close()
            raise TimeoutError(f"the reward's process did not start and import {self.cfg.function!r} within "
                               f"{max(START_S, self.cfg.timeout_s):g} s") from None
        except BaseException:
            self.close()
            raise

    def _isolated(self, sample: tuple) -> Any:
        if self._pool is None:
            self._start()
        future = self._pool.submit(_call, self.cfg.function, self.search, sample)
        try:
            return future.result(timeout=self.cfg.timeout_s)
        except cf.TimeoutError:
            self.close()  # the process may be stuck in the function: kill it, start afresh next time
            raise TimeoutError(f"the reward took more than reward.timeout_s={self.cfg.timeout_s} s") from None
        except cf.process.BrokenProcessPool:
            self.close()
            raise RuntimeError("the reward's process died (a crash or a sys.exit in the function)") from None

    def close(self) -> None:
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _as_score(value: Any) -> tuple[float, dict]:
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward dict needs a 'score' key, got keys {sorted(value)}")
        extra = {k: float(v) for k, v in value.items() if k != "score" and isinstance(v, numbers.Real)}
        return float(value["score"]), extra
    if isinstance(value, numbers.Real):  # bool, int, float, and numpy's scalars (np.float32 is no float)
        return float(value), {}
    raise TypeError(f"a reward returns a number or a dict with 'score', got {type(value).__name__}: {value!r}")
