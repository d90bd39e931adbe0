"""User errors in one line: an error said again with more words (the flag at fault, what was saved),
keeping its type wherever one message rebuilds it, so callers that catch it by type still do."""

from __future__ import annotations

from contextlib import contextmanager


def reworded(error: BaseException, message: str) -> BaseException:
    """``error``'s type with ``message``; a ValueError where that type takes other arguments (e.g.
    JSONDecodeError)."""
    try:
        return type(error)(message)
    except Exception:  # an exception type whose constructor wants more than a message
        return ValueError(message)


@contextmanager
def blame(flag: str):
    """Re-raise a ValueError / TypeError from the block as one line that starts with ``flag``."""
    try:
        yield
    except (ValueError, TypeError) as e:
        message = " ".join(str(e).split())
        if message.startswith("--"):
            raise
        raise reworded(e, f"{flag}: {message}") from None
