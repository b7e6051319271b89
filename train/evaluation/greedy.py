"""lm-eval's generate_until requests answered greedily, several at once: under FSDP every forward all-gathers the
model, so a token at a time for one request at a time would be max_gen_toks all-gathers per request.

Each request's window (its last max_len ids) sits on the left of a row, padded on the right to the longest, and
its next token is read at its own last position: causal attention keeps that position blind to the padding, so a
row gets the token it would get alone. A request ends at an end token, at max_gen_toks, or once its text holds one
of its stop strings (the text before the first of them is then what the whole budget would have given, as greedy
tokens do not depend on later ones); the finished leave the batch.
"""

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """One generate_until request: BOS + context ids, the stop strings, the budget; what it has generated."""

    ids: list[int]
    stops: list[str]
    budget: int
    new: list[int] = field(default_factory=list)
    text: str = ""
    ended: bool = False

    def add(self, token: int, end_ids: list[int], decode: Callable[[list[int]], str]) -> None:
        self.new.append(token)
        self.text = decode(self.new)
        self.ended = (token in end_ids or len(self.new) >= self.budget
                      or any(s in self.text for s in self.stops))

    def answer(self) -> str:
        """The text cut at the first of its stop strings."""
        return self.text[:min([self.text.find(s) for s in self.stops if s in self.text], default=len(self.text))]


def request(ids: list[int], settings: dict) -> Request:
    """A Request from lm-eval's generation settings ("until": a string or a list of them; "max_gen_toks")."""
    stops = settings.get("until") or []
    stops = [stops] if isinstance(stops, str) else stops
    budget = int(settings.get("max_gen_toks", 64))
    return Request(ids, [s for s in stops if s], budget, ended=budget <= 0)


def generate_together(requests: list[Request], next_tokens: Callable[[list[list[int]]], list[int]], max_len: int,
                      end_ids: list[int], decode: Callable[[list[int]], str]) -> None:
    """Generate each of `requests` (a forward's rows) to its end; next_tokens(windows) -> the greedy token after
    each window."""
    live = [r for r in requests if not r.ended]
    while live:
        windows = [(r.ids + r.new)[-max_len:] for r in live]
        for r, token in zip(live, next_tokens(windows)):
            r.add(token, end_ids, decode)
        live = [r for r in live if not r.ended]
