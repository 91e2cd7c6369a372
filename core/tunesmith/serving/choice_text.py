"""One choice's text as its tokens arrive: what can be sent so far, and where a stop string ends it."""

from __future__ import annotations

from collections.abc import Sequence


class ChoiceText:
    """Turns a growing list of token ids into text pieces that are safe to send.

    Text is decoded without special tokens. A piece is held back while it could still turn out
    to be the start of a stop string, or while it ends inside a character split over byte-level
    tokens (decoded as U+FFFD), so that nothing sent ever has to be taken back. The text ends
    before the first stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.sent = ""

    def advance(self, token_ids: Sequence[int], finished: bool) -> tuple[str, bool]:
        """The text to send now that the choice has ``token_ids``, and whether a stop string ended it.

        ``finished`` says that no more tokens will come, so nothing is held back.
        """
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        positions = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        stopped = bool(positions)
        if stopped:
            ready = text[: min(positions)]
        elif finished:
            ready = text
        else:
            ready = text[: len(text) - self._held_back(text)]
        if not ready.startswith(self.sent) or len(ready) == len(self.sent):
            return "", stopped
        piece, self.sent = ready[len(self.sent) :], ready
        return piece, stopped

    def _held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` to keep back for now: an unfinished
        character, and before it whatever could be the start of a stop string."""
        whole = text.rstrip("\ufffd")
        stop_start = max((k for s in self.stop for k in range(1, len(s)) if whole.endswith(s[:k])), default=0)
        return len(text) - len(whole) + stop_start
