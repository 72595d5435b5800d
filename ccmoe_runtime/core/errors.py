"""The one error type users see: a problem and its fix, printed on one line."""

from __future__ import annotations

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_USAGE = 2          # bad input: path, name, option value
EXIT_ENGINE = 3         # the llama.cpp engine is missing, too old or failed
EXIT_RESOURCE = 4       # not enough memory, disk or budget
EXIT_SERVER = 5         # llama-server failed to start or died
EXIT_REGRESSION = 6     # `bench`: tokens/s fell more than --max-regression below the baseline


class CcmoeError(Exception):
    """A user-facing failure: `problem` says what is wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str = "", exit_code: int = EXIT_USAGE):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        self.exit_code = exit_code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem}; {self.fix}"
        return " ".join(text.split())
