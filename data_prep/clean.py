"""Normalisation and quality filters. Each document is kept or dropped for one counted reason."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from data_prep.sources import CleanConfig

# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalise(text: str) -> tuple[str, int]:
    """NFC, CRLF → LF, control characters removed. Returns the text and how many controls were removed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    cleaned, removed = _CONTROL.subn("", text)
    return cleaned, removed


def rejection_reason(text: str, removed_controls: int, original_length: int, config: CleanConfig) -> str | None:
    if len(text.strip()) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if original_length and removed_controls / original_length > config.max_control_char_fraction:
        return "control_characters"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) >= 4:
        counts = Counter(lines)
        duplicated = sum(n for n in counts.values() if n > 1)
        if duplicated / len(lines) > config.max_duplicate_line_fraction:
            return "repeated_lines"
    return None


def clean_text(text: str, config: CleanConfig, counts: Counter) -> str | None:
    """One document normalised, or None when a filter drops it; `counts` gets docs_in and removed_<reason>."""
    counts["docs_in"] += 1
    cleaned, removed = normalise(text)
    reason = rejection_reason(cleaned, removed, len(text), config)
    if reason:
        counts[f"removed_{reason}"] += 1
        return None
    return cleaned


def clean_texts(texts, config: CleanConfig, counts: Counter) -> list[str]:
    return [cleaned for text in texts if (cleaned := clean_text(text, config, counts)) is not None]
