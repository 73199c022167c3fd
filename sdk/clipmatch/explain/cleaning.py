"""A language model's answer, cut to the look it describes.

The entity heads and the towers read an explanation best as a bare noun
phrase about the look ("a blue circle with yellow stripes"). Language models
answer in sentences: "Sure! The Kestrel-7 valve is typically a blue circle
with yellow stripes. It is used in boilers." Measured on the default model
(README, "Explanations"), the framing words and a name the towers never saw
took held-out entity R@1 from 0.73 to 0.00.

``clean_explanation`` keeps the look:

1. markdown emphasis, a leading "Sure!" / "Here is ..." and list markers go;
2. the answer is split into sentences (not after "St.", "e.g.", "1." and the
   like), and the first sentence that names a colour, shape or pattern is
   kept; failing that, the first that says anything the query does not;
3. a leading subject and verb about the query's thing go ("The Kestrel-7
   valve is typically", "It looks like", "It's"): only where the subject is
   a pronoun or made of the query's own words, so "a green pump that is ..."
   keeps its colour;
4. a short label before a colon goes ("Kestrel-7 valve: ...", "Colour: ...")
   when it is made of the query's words or a label word;
5. the query's names go: words with a digit and a letter ("Kestrel-7"), or a
   capital inside ("iPhone"), in any case; capitalised words only where the
   answer capitalises them too, and never a colour, shape or pattern word
   ("in Red" stays a colour).

What is left must say something the query does not; else the result is empty.
"""
from __future__ import annotations

import re

__all__ = ["clean_explanation", "query_names", "VISUAL_WORDS", "CLEANING_VERSION"]

# Bumped whenever the rules change: cached explanations are keyed on it.
CLEANING_VERSION = 1

_WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")
_ARTICLES = frozenset("a an the of in on at for with and or to its their".split())
_PRONOUNS = frozenset("it this that they these those item thing object one".split())
_LABELS = frozenset("description answer appearance look looks shape colour color colours colors pattern "
                    "patterns mark marks body".split())
VISUAL_WORDS = frozenset("""
    red orange yellow green blue purple violet pink brown black white grey gray silver gold golden beige
    cyan magenta teal navy maroon turquoise cream ivory bronze copper dark light pale bright
    circle circles circular round square squares cube cubes triangle triangles triangular star stars cross
    crosses ring rings disc disk sphere ball cylinder cylindrical cone oval rectangle rectangular hexagon
    stripe stripes striped dot dots dotted spot spots spotted check checks checked checkered chequered plaid
    pattern patterned rim notch band bands swirl zigzag
""".split())
_PREAMBLE = re.compile(r"^(?:(?:sure|certainly|of course|okay|ok|yes|absolutely|great question)\b[^.!?:]{0,40}"
                       r"[.!?:,]\s*|here(?:'s| is| are)\b[^.!?:]{0,80}[.!?:]\s*)+", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+")
_ABBREVIATIONS = frozenset("st dr mr mrs ms mt jr sr vs etc approx e.g i.e no inc ltd co fig".split())
_ADVERB = r"(?:typically|usually|generally|often|basically|mostly|normally|essentially)"
# Within one sentence a "." is an abbreviation's ("St. Mary's bell is"), so the subject may hold one.
_LEAD = re.compile(rf"^(?:(?P<subject>[^,;:]{{0,80}}?)\s+(?:{_ADVERB}\s+)?(?:is|are|was|were|has|have|features|"
                   r"looks like|look like|looks|appears to be|appears as|appears|resembles|is shaped like|comes as)"
                   r"|(?P<contraction>it's|it is|they're|they are|that's|this is|looks like|look like|resembles))"
                   rf"\s+(?:{_ADVERB}\s+)?", re.IGNORECASE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def query_names(query: str, answer: str = "") -> list[str]:
    """The words of ``query`` that look like names: with a digit and a letter ("Kestrel-7",
    "XM5"), a capital inside ("iPhone"), or capitalised after the first word ("the Orrin
    pump"); a capitalised first word counts where ``answer`` capitalises it mid-sentence too.
    Colour, shape and pattern words never count ("in Red")."""
    names = []
    for i, w in enumerate(_words(query)):
        if w.lower() in _ARTICLES or w.lower() in VISUAL_WORDS:
            continue
        if _strong(w) or (w[0].isupper() and (i > 0 or re.search(rf"[^\s.!?]\s+{re.escape(w)}\b", answer))):
            names.append(w)
    return names


def _strong(word: str) -> bool:
    """A name by its shape alone: a digit and a letter ("Kestrel-7"), or a capital inside ("iPhone")."""
    return (any(c.isdigit() for c in word) and any(c.isalpha() for c in word)) or any(c.isupper() for c in word[1:])


def _sentences(text: str) -> list[str]:
    """Sentences, not cut after an abbreviation, an initial or a list number."""
    out, start = [], 0
    for m in re.finditer(r"[.!?]+(?=\s|$)", text):
        before = text[start:m.start()].split()
        last = before[-1].lower() if before else ""
        if m.group() == "." and (last in _ABBREVIATIONS or (len(last) <= 2 and last.isalnum() and
                                                            (last.isdigit() or last.isupper() or len(last) == 1))):
            continue
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _clean_sentence(sentence: str, query_words: set[str], names: list[str]) -> str:
    s = _LIST_MARK.sub("", sentence)
    own = query_words | {n.lower() for n in names}
    lead = _LEAD.match(s)
    if lead:
        subject = {w.lower() for w in _words(lead.group("subject") or "")}
        # about the query's thing, not "a green pump that is"
        if lead.group("contraction") or subject <= _PRONOUNS | _ARTICLES | own:
            s = s[lead.end():]
    head, colon, tail = s.partition(":")
    if colon and tail.strip():
        label = {w.lower() for w in _words(head)}
        if len(label) <= 4 and label <= _LABELS | _ARTICLES | own:
            s = tail
    for name in sorted(set(names), key=len, reverse=True):
        flags = re.IGNORECASE if _strong(name) else 0  # "Orrin" only where capitalised: "orrin" may be a word
        s = re.sub(rf"(?<![\w-]){re.escape(name)}(?:'s)?(?![\w-])", "", s, flags=flags)
    s = re.sub(r"\(\s*\)", "", s)
    return re.sub(r"\s+", " ", s).strip(" .,;:!?\"'()-")


def clean_explanation(text: str, query: str) -> str:
    """The look that ``text`` (a language model's answer about ``query``) describes; empty when
    nothing is left that the query does not already say. See the module docstring."""
    text = re.sub(r"[*_`#]+", "", " ".join(text.split())).strip(" \"'")
    text = _PREAMBLE.sub("", text)
    query_words = {w.lower() for w in _words(query)}
    names = query_names(query, text)
    candidates = [_clean_sentence(s, query_words, names) for s in _sentences(text)]

    def new_words(s: str) -> set[str]:
        return {w.lower() for w in _words(s) if any(c.isalpha() for c in w)} - query_words - _ARTICLES

    for s in candidates:
        if new_words(s) & VISUAL_WORDS:
            return s
    return next((s for s in candidates if new_words(s)), "")
