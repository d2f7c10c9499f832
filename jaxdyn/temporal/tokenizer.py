"""A small syllable tokenizer for TCG-Synth text, with a byte fallback for anything else.

Entity names in TCG-Synth are 2–3 CV(C) syllables, so a name is 2–3 tokens ("Vornex" →
" Vor" "nex"), each syllable token is shared by many names (unseen names are made of seen
tokens), and a question is ~40 tokens instead of ~120 bytes. Template words are single tokens
(with and without a leading space); every other character falls back to its UTF-8 bytes, so any
text round-trips. Ids: 0–255 bytes (0 doubles as padding), then words, then syllables.
"""

from __future__ import annotations

import functools
import re

from jaxdyn.data.tokenizer import Tokenizer, register_tokenizer
from jaxdyn.temporal.world import CODAS, CONSONANTS, TEMPLATES, VOWELS

PAD = 0
KIND = "tcg_syllable"
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9 ]| ")
_WORDS = ("Question Answer Date Who What Which How A the of is by leads head runs hit hardest "
          "most disruption hits fails suffers shock at spreads many active suppliers does have "
          "firms supply now Count or")


class SyllableTokenizer(Tokenizer):
    """encode(text) -> ids and decode(ids) -> text; `vocab_size` is a multiple of 128. The
    "\\n" that ends every answer doubles as EOS; id 0 (byte NUL) is padding."""

    kind = KIND

    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id = None, ord("\n"), PAD
        words = set(_WORDS.split())
        for fam in TEMPLATES.values():
            for t in fam:
                words |= set(re.findall(r"[A-Za-z]+", t))
        syl = sorted({c + v + k for c in CONSONANTS for v in VOWELS for k in CODAS})
        pieces = sorted(words | {" " + w for w in words})
        pieces += syl + [" " + s.capitalize() for s in syl]
        pieces += [s.capitalize() for s in syl if s.capitalize() not in words]
        pieces += [" " + d for d in "0123456789"]
        pieces = list(dict.fromkeys(pieces))
        self.pieces = [bytes([b]).decode("latin-1") for b in range(256)] + pieces
        self.ids = {p: i + 256 for i, p in enumerate(pieces)}
        self.vocab_size = -(-len(self.pieces) // 128) * 128
        self._syl = re.compile(f"(?:[{CONSONANTS}][{VOWELS}](?:[{''.join(k for k in CODAS if k)}]"
                               f"(?![{VOWELS}]))?)")

    def _syllables(self, word: str) -> list[str] | None:
        """Split a lowercase word into CV(C) syllables, or None if it is not one."""
        parts = self._syl.findall(word)
        return parts if parts and "".join(parts) == word else None

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in _PIECE.findall(text):
            if piece in self.ids:
                out.append(self.ids[piece])
                continue
            space = piece.startswith(" ")
            word = piece[1:] if space else piece
            low = word.lower()
            syl = self._syllables(low) if word in (low, low.capitalize()) else None
            if syl:
                first = syl[0].capitalize() if word[:1].isupper() else syl[0]
                toks = [(" " if space else "") + first] + syl[1:]
                if all(t in self.ids for t in toks):
                    out += [self.ids[t] for t in toks]
                    continue
            out += list(piece.encode("utf-8"))
        return out

    def decode(self, ids: list[int]) -> str:
        raw, text = bytearray(), []
        for i in ids:
            if i < 256:
                raw.append(i)
                continue
            if raw:
                text.append(raw.decode("utf-8", errors="replace"))
                raw = bytearray()
            text.append(self.pieces[i])
        if raw:
            text.append(raw.decode("utf-8", errors="replace"))
        return "".join(text)


    def save(self, directory: str) -> None:
        """Writes only `jaxdyn_tokenizer.json` (the vocabulary is fixed by the generator)."""
        self._write_meta(directory)

    def fingerprint(self) -> str:
        return "tcg-syllable-v1"


@functools.lru_cache(maxsize=1)
def tokenizer() -> SyllableTokenizer:
    return SyllableTokenizer()


register_tokenizer(KIND, tokenizer)
