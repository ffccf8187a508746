"""User-facing errors.

Every bad input in pdd_ray raises :class:`PddError` with a single line that names the
bad value and says what is accepted. The CLI prints that line (no traceback) and exits 2,
so users see the problem rather than a stack dump from deep inside torch or Ray.
"""

from __future__ import annotations


class PddError(ValueError):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str) -> None:
        # Keep it to one line: multi-line messages get folded so logs stay greppable.
        super().__init__(" ".join(str(message).split()))
