"""The product's errors: one base, and the exit code each kind ends a command with.

Every error raised on purpose derives from ``ErasureError`` (and, where callers already
catch a builtin, from that builtin too). Its message says what happened and what to do
next; the command line prints it and exits with ``exit_code``:

- 1: a concept leaked (the audited model breaks the policy);
- 2: bad input, a refused operation, or a service, worker or store that failed;
- 3: nothing could be judged (no judge, a judge that does not load or calibrate, an
  inconclusive audit): neither a pass nor a leak;
- 4 (the command line's own): anything else, a bug or an environment problem, with its traceback.

``retry_helps`` says whether running the same step again can succeed: a service or worker
that failed may be back, while bad input or a missing judge fails the same way again (the
pipeline's stages are retried only in the first case).
"""

from __future__ import annotations


class ErasureError(Exception):
    """Base of every error the product raises on purpose."""

    exit_code = 2
    retry_helps = True


class NoVerdict(ErasureError):
    """Nothing was judged, so nothing was proved: never a pass, never a leak."""

    exit_code = 3
    retry_helps = False


class LeakFound(ErasureError):
    """A model draws what its policy says it must not."""

    exit_code = 1
    retry_helps = False


class NoJudgeError(NoVerdict, ValueError):
    """The base model has no judge: nothing can say whether its images show a concept."""
