"""Errors about stored data whose message is a problem and then its fix, so that a caller who knows more can
restate the fix.

    raise FeatureFileError(f"{path}: data block 7 fails its checksum", "rewrite it with write_features", path)
    except FeatureFileError as e:
        raise e.with_fix("regenerate it: plait run SPEC data.rebuild=true") from None

Storage code knows the file and what is wrong with it; only the job knows the command that rebuilds the dataset
or the packs the file belongs to. ``user_error = True``: the problem is in the user's data, not in Plait (the CLI
prints the message in one line and exits 2).
"""

from __future__ import annotations

from pathlib import Path


class ProblemAndFix(Exception):
    """``str(e)`` is ``"<problem>; <fix>"``; ``path`` is the file or folder at fault (or None)."""

    user_error = True

    def __init__(self, problem: str, fix: str = "", path: str | Path | None = None):
        super().__init__(problem, fix, None if path is None else str(path))  # args: what pickling rebuilds it from
        self.problem, self.fix = problem, fix
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem

    def with_fix(self, fix: str) -> ProblemAndFix:
        """The same error (same class, problem and path) with ``fix`` in place of the original one."""
        return type(self)(self.problem, fix, self.path)
