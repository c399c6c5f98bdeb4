"""Small helpers for the words of messages."""


def count(n, noun, plural=None):
    """'1 worker', '2 workers', '0 rows': a number with its noun in the right form."""
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {plural or noun + 's'}"
