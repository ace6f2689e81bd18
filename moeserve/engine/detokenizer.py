"""Incremental detokenization and stop strings.

Text is emitted only once the tokens decode to complete characters: byte-level BPE splits a
multi-byte character over tokens, and a partial one decodes to U+FFFD, which is held back
until the next token completes it. Stop strings end the output without being emitted; while
streaming, the last len(longest stop) - 1 characters are held back so a stop string that
arrives over several tokens is never half-sent.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        # Decode a few prompt tokens as context so the first output token's leading space and
        # merges come out as they would in the full text.
        self.ids = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.sent = 0  # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string if one now ends the output (text truncated)."""
        for token in new_token_ids:
            self.ids.append(token)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                start = len(self.text)
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                hit = self._find_stop(start)
                if hit is not None:
                    return hit
        return None

    def _find_stop(self, new_from: int) -> str | None:
        best = None
        for s in self.stop:
            idx = self.text.find(s, max(0, new_from - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s) if self.include_stop else idx]
        return s

    def take(self, finished: bool) -> str:
        """The text not handed out yet (holding back a possible partial stop string)."""
        end = len(self.text) if finished or not self.stop else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent:end]
        self.sent = end
        return out
