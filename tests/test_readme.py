"""The README's numbers cannot drift: each claim links to its row of bench/RESULTS.md's current-numbers
table, and every number the claim states is in that row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\(bench/RESULTS\.md#(row-[\w-]+)\)")
# a number as the prose writes it: 1,048,576  0.80-0.90x  3.85  231K  2K  1e-4 ...
NUMBER = re.compile(r"(?<![\w.#-])\d[\d,.]*(?:e-?\d+)?[KMG]?(?:-\d[\d,.]*[KMG]?)?x?(?![\w])")


def rows() -> dict[str, str]:
    """id -> the text of its row in RESULTS.md's current-numbers table."""
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    table = text.split("## Current numbers", 1)[1].split("\n# ", 1)[0]
    out = {}
    for line in table.splitlines():
        m = re.search(r'<a id="(row-[\w-]+)"></a>', line)
        if m:
            out[m.group(1)] = line
    return out


def claims() -> list[tuple[str, list[str]]]:
    """(the text of a claim up to its link, the rows it links), for each linked claim of the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What it measures", 1)[1].split("\n```", 1)[0]
    out = []
    for bullet in re.split(r"\n- ", section)[1:]:
        bullet = " ".join(bullet.split())
        start = 0
        for m in LINK.finditer(bullet):
            out.append((bullet[start : m.start()], [m.group(1)]))
            start = m.end()
    return out


def numbers(text: str) -> list[str]:
    text = re.sub(r"\[[^\]]*\]\([^)]*\)", "", text)  # not the links themselves
    return [n.rstrip(".,") for n in NUMBER.findall(text)]


def test_every_linked_row_exists():
    found = rows()
    linked = [r for _, ids in claims() for r in ids]
    assert linked, "the README links no row"
    assert sorted(set(linked) - set(found)) == []


def test_every_number_of_a_claim_is_in_its_row():
    found = rows()
    missing = []
    for text, ids in claims():  # a claim is the text since the previous link
        for n in numbers(text):
            if not any(n in found[r] for r in ids):
                missing.append(f"{n} ({ids[0]})")
    assert missing == []


def test_the_checks_catch_a_drift():
    """A number that is not in its row is caught (the test above could otherwise pass vacuously)."""
    found = rows()
    assert "3.85" in found["row-laptop"] and "3.95" not in found["row-laptop"]
    assert numbers("reaches 3.95 nats/token at 3,882 tokens/s, 1.84-2.06x (231K-237K)") == [
        "3.95", "3,882", "1.84-2.06x", "231K-237K"]  # fmt: skip
