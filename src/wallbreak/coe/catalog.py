"""What the HTTP layer offers: the names clients use, the version of the weights serving each name
now, each version's tokenizer facts, and the router.

A name maps to a version key: the name itself for what the server started with, `name@N` for a
later version (`@` is never part of a name, so a key cannot be mistaken for one). A request binds
to one key when it arrives (`bind`) and keeps it to the end, so a replace never gives it a mix of
two versions; new requests bind to the new key. `coe/live.py` makes the changes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from wallbreak.coe.tokenization import ExpertTokenizer

if TYPE_CHECKING:
    from wallbreak.coe.router import Router


class Catalog:
    def __init__(
        self, names: Sequence[str], tokenizers: dict[str, ExpertTokenizer], router: Router | None
    ) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, str] = {n: n for n in names}
        self.tokenizers = tokenizers  # by version key: the engine's own mapping
        self.router = router

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._current)

    def key(self, name: str) -> str | None:
        """The version serving `name` now (None: no such expert)."""
        with self._lock:
            return self._current.get(name)

    def bind(self, name: str) -> tuple[str, ExpertTokenizer | None]:
        """The version a new request for `name` gets, with its tokenizer (None: it is damaged);
        KeyError when no expert has that name."""
        with self._lock:
            key = self._current[name]
            return key, self.tokenizers.get(key)

    def set(self, name: str, key: str) -> None:
        with self._lock:
            self._current[name] = key

    def drop(self, name: str) -> None:
        with self._lock:
            self._current.pop(name, None)

    def public_tokenizers(self) -> Mapping[str, ExpertTokenizer]:
        return _ByName(self)


class _ByName(Mapping[str, ExpertTokenizer]):
    """Each name's current tokenizer, read through the catalog at every lookup."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def __getitem__(self, name: str) -> ExpertTokenizer:
        tok = self.catalog.bind(name)[1]
        if tok is None:
            raise KeyError(name)
        return tok

    def __iter__(self) -> Iterator[str]:
        with self.catalog._lock:
            have = self.catalog.tokenizers
            return iter([n for n, k in self.catalog._current.items() if k in have])

    def __len__(self) -> int:
        return len(list(iter(self)))
