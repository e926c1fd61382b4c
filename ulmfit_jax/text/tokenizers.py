"""Word tokenizers with fastai's conventions: `fast` (default), `spacy` and `sentencepiece`.

Every tokenizer maps one raw document (str) to a list of token strings: the pre-rules of
`ulmfit_jax.text.rules` run first, then the base tokenizer, then the post-rules on every token
(fastai's `TokenizeWithRules`).

- `spacy`: spaCy's blank English tokenizer with fastai's special tokens added as special cases,
  i.e. exactly fastai 2.8.12's `Tokenizer(SpacyTokenizer())`.
- `fast`: a pure-Python re-implementation of spaCy's tokenizer algorithm (`Tokenizer._tokenize_affixes`,
  `_split_affixes`, `_attach_tokens` and the special-case matcher of spaCy 3.8's `tokenizer.pyx`) run on
  spaCy's own English tables, exported once into `_spacy_en_tables.py` (so spaCy is not needed at run
  time). Text is split on whitespace into chunks exactly as spaCy does; every distinct chunk is
  tokenized once and its tokens (post-rules applied) are kept in a dictionary, so the work per token is a
  dictionary look-up. spaCy's special-case matcher runs over the whole document, where a match that spans
  two chunks (tokens separated by a space) can block a match inside one chunk; `fast` reproduces that:
  a document with a chunk that could take part in such a match takes an exact document-level path
  instead of the per-chunk cache. Agreement with spaCy on
  real text: tests/test_text_tokenizers.py and docs/text.md.
- `sentencepiece`: a unigram SentencePiece model (as MultiFiT) trained on the rule-processed corpus with
  fastai's settings (`SentencePieceTokenizer`): special tokens are user-defined symbols '▁xx...' so they stay
  whole, vocabulary size `len(unique words) // 4` rounded up to a multiple of 8 (at least 29, at most
  `max_vocab_size`) unless given.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
from typing import Callable, Iterable, Sequence

from ulmfit_jax.text import rules as text_rules

RULES_BY_NAME: dict[str, Callable[[str], str]] = {
    rule.__name__: rule for rule in (*text_rules.DEFAULT_PRE_RULES, *text_rules.DEFAULT_POST_RULES)}
TOKENIZER_KINDS = ("fast", "spacy", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """What determines the tokens of a document; hashable, and part of the cache key of tokenized data.

    kind: 'fast', 'spacy' or 'sentencepiece'.
    pre_rules / post_rules: names of functions in `ulmfit_jax.text.rules` (fastai's defaults).
    add_eos: append 'xxeos' to every document (fastai's `lowercase(add_eos=True)`; off by default).
    sentencepiece_model: path of a trained SentencePiece model; None trains one on the corpus.
    sentencepiece_vocab_size: None = fastai's rule (unique words // 4, multiple of 8, in [29, max]).
    """

    kind: str = "fast"
    pre_rules: tuple[str, ...] = tuple(rule.__name__ for rule in text_rules.DEFAULT_PRE_RULES)
    post_rules: tuple[str, ...] = tuple(rule.__name__ for rule in text_rules.DEFAULT_POST_RULES)
    add_eos: bool = False
    sentencepiece_model: str | None = None
    sentencepiece_vocab_size: int | None = None
    sentencepiece_max_vocab_size: int = 30000
    sentencepiece_character_coverage: float = 0.99999  # fastai's value for European languages

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {self.kind!r}")
        unknown = [name for name in (*self.pre_rules, *self.post_rules) if name not in RULES_BY_NAME]
        if unknown:
            raise ValueError(f"unknown rule names {unknown}; known: {sorted(RULES_BY_NAME)}")

    def pre_rule_functions(self) -> tuple[Callable[[str], str], ...]:
        functions = []
        for name in self.pre_rules:
            function = RULES_BY_NAME[name]
            if name == "lowercase" and self.add_eos:
                function = _lowercase_with_eos
            functions.append(function)
        return tuple(functions)

    def post_rule_functions(self) -> tuple[Callable[[str], str], ...]:
        return tuple(RULES_BY_NAME[name] for name in self.post_rules)


def _lowercase_with_eos(text: str) -> str:
    return text_rules.lowercase(text, add_bos=True, add_eos=True)


# ----------------------------------------------------------------------------------------------------------
# fast: spaCy's algorithm on spaCy's tables, cached per whitespace-delimited chunk.

_WHITESPACE_SPLIT = re.compile(r'(\s+)')


class _ChunkTokens(dict):
    """chunk string -> tuple of tokens (post-rules applied); computes and stores missing chunks.

    A dict with `__missing__` so that `map(cache.__getitem__, chunks)` runs at C speed on hits.
    """

    def __init__(self, tokenize_chunk: Callable[[str], tuple[str, ...]]):
        super().__init__()
        self[''] = ()
        self._tokenize_chunk = tokenize_chunk

    def __missing__(self, chunk: str) -> tuple[str, ...]:
        tokens = self._tokenize_chunk(chunk)
        self[chunk] = tokens
        return tokens


class FastWordTokenizer:
    """spaCy 3.8 blank-English tokenization in pure Python (see module docstring). Not thread-safe.

    Call with a rule-processed string; returns the list of tokens with post-rules applied.
    The chunk cache grows with the number of distinct chunks (about 1 M for all of IMDb); call
    `clear_cache()` to bound memory on very large corpora.
    """

    def __init__(self, post_rules: Sequence[Callable[[str], str]] = text_rules.DEFAULT_POST_RULES,
                 tables: dict | None = None):
        if tables is None:
            from ulmfit_jax.text._spacy_en_tables import TABLES as tables
        self._prefix_search = re.compile(tables["prefix"]).search
        self._suffix_search = re.compile(tables["suffix"]).search
        self._infix_finditer = re.compile(tables["infix"]).finditer
        self._url_match = re.compile(tables["url"]).match
        self._special_cases: dict[str, tuple[str, ...]] = {
            string: tuple(pieces) for string, pieces in tables["special_cases"].items()}
        self._post_rules = tuple(post_rules)
        # spaCy puts special cases that its affix rules would split into a phrase matcher, keyed by the
        # tokens the string gets without special cases (`add_special_case` with faster_heuristics=True).
        self._matcher_patterns: dict[tuple[str, ...], str] = {}
        for string in self._special_cases:
            if (self._prefix_length(string) or self._suffix_length(string)
                    or next(self._infix_finditer(string), None) is not None or " " in string):
                pattern = tuple(self._tokenize_span(string, with_special_cases=False))
                self._matcher_patterns[pattern] = string
        self._pattern_lengths = sorted({len(pattern) for pattern in self._matcher_patterns})
        self._pattern_first_tokens = {pattern[0] for pattern in self._matcher_patterns}
        self._pattern_changes_tokens = {
            pattern: self._special_cases[string] != pattern for pattern, string in self._matcher_patterns.items()}
        self._pattern_earlier_tokens = {token for pattern in self._matcher_patterns for token in pattern[:-1]}
        self._pattern_later_tokens = {token for pattern in self._matcher_patterns for token in pattern[1:]}
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache = _ChunkTokens(self._tokenize_chunk)
        # chunk -> tokens before the matcher and the post-rules, for the exact document-level path
        self._raw_cache = _ChunkTokens(lambda chunk: tuple(self._tokenize_span(chunk, with_special_cases=True)))
        self._chunks_with_matches: set[str] = set()
        self._ids_vocabulary: dict | None = None

    def _prefix_length(self, string: str) -> int:
        match = self._prefix_search(string)
        return match.end() - match.start() if match is not None else 0

    def _suffix_length(self, string: str) -> int:
        match = self._suffix_search(string)
        return match.end() - match.start() if match is not None else 0

    def _tokenize_span(self, string: str, with_special_cases: bool) -> list[str]:
        """spaCy's `_try_specials_and_cache` + `_tokenize` (`_split_affixes` + `_attach_tokens`) on one chunk."""
        specials = self._special_cases if with_special_cases else {}
        if string in specials:
            return list(specials[string])
        prefixes: list[str] = []
        suffixes: list[str] = []
        last_size = 0
        while string and len(string) != last_size:
            if string in specials:
                break
            last_size = len(string)
            prefix_length = self._prefix_length(string)
            if prefix_length:
                prefix = string[:prefix_length]
                minus_prefix = string[prefix_length:]
                if minus_prefix and minus_prefix in specials:
                    string = minus_prefix
                    prefixes.append(prefix)
                    break
            suffix_length = self._suffix_length(string[prefix_length:])
            if suffix_length:
                suffix = string[-suffix_length:]
                minus_suffix = string[:-suffix_length]
                if minus_suffix and minus_suffix in specials:
                    string = minus_suffix
                    suffixes.append(suffix)
                    break
            if prefix_length and suffix_length and prefix_length + suffix_length <= len(string):
                string = string[prefix_length:-suffix_length]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif prefix_length:
                string = minus_prefix
                prefixes.append(prefix)
            elif suffix_length:
                string = minus_suffix
                suffixes.append(suffix)
        tokens = prefixes
        if string:
            if string in specials:
                tokens.extend(specials[string])
            elif self._url_match(string):
                tokens.append(string)
            else:
                start = 0
                for match in self._infix_finditer(string):
                    infix_start, infix_end = match.start(), match.end()
                    if infix_start == 0:  # spaCy skips an infix at the very start
                        continue
                    if infix_start != start:
                        tokens.append(string[start:infix_start])
                    if infix_start != infix_end:
                        tokens.append(string[infix_start:infix_end])
                    start = infix_end
                if string[start:]:
                    tokens.append(string[start:])
        tokens.extend(reversed(suffixes))
        return tokens

    def _find_matches(self, tokens: Sequence[str]) -> list[tuple[int, int]]:
        """Spans (start, end) of `tokens` equal to a matcher pattern, kept as spaCy's `_filter_special_spans`
        keeps them: longest first (ties: leftmost), skipping a span whose first or last token is taken
        (every span considered, kept or not, takes its tokens). Sets `self._last_match_changes`: whether
        any span found (kept or not) has a special case that differs from its tokens."""
        matches = []
        first_tokens = self._pattern_first_tokens
        for start, token in enumerate(tokens):
            if token not in first_tokens:
                continue
            for length in self._pattern_lengths:
                key = tuple(tokens[start:start + length])
                if len(key) == length and key in self._matcher_patterns:
                    matches.append((start, start + length))
        self._last_match_changes = any(
            self._pattern_changes_tokens[tuple(tokens[start:end])] for start, end in matches)
        if not matches:
            return matches
        matches.sort(key=lambda span: (-(span[1] - span[0]), span[0]))
        taken: set[int] = set()
        kept = []
        for start, end in matches:
            if start not in taken and end - 1 not in taken:
                kept.append((start, end))
            taken.update(range(start, end))
        kept.sort()
        return kept

    def _replace_matches(self, tokens: list[str], kept: list[tuple[int, int]],
                         span_text: Callable[[int, int], str]) -> list[str]:
        """spaCy's `_retokenize_special_spans`: a kept span whose text is a special case becomes its tokens."""
        result: list[str] = []
        position = 0
        for start, end in kept:
            result.extend(tokens[position:start])
            result.extend(self._special_cases.get(span_text(start, end), tokens[start:end]))
            position = end
        result.extend(tokens[position:])
        return result

    def _finish(self, tokens: Sequence[str]) -> tuple[str, ...]:
        for rule in self._post_rules:
            tokens = [rule(token) for token in tokens]
        return tuple(tokens)

    def _tokenize_chunk(self, chunk: str) -> tuple[str, ...]:
        """Tokens of one piece of `re.split(r'(\\s+)', text)`: a non-space chunk, or a whitespace run that
        follows a token (spaCy attaches one ' ' to that token; what is left, if anything, is one token)."""
        if chunk[0].isspace():
            rest = chunk[1:] if chunk[0] == ' ' else chunk
            return self._finish(self._tokenize_span(rest, with_special_cases=True)) if rest else ()
        tokens = self._tokenize_span(chunk, with_special_cases=True)
        if tokens[0] in self._pattern_first_tokens or len(tokens) > 1:
            kept = self._find_matches(tokens)
            if kept:
                # spaCy matches over the whole document: a span across chunks (a no-op itself, its text has
                # a space) can block a match here if it covers this chunk's first or last token. Documents
                # with such a chunk take the exact document-level path (`_tokenize_document_exactly`).
                if self._last_match_changes and (tokens[0] in self._pattern_later_tokens
                                                 or tokens[-1] in self._pattern_earlier_tokens):
                    self._chunks_with_matches.add(chunk)
                tokens = self._replace_matches(tokens, kept, lambda start, end: "".join(tokens[start:end]))
        return self._finish(tokens)

    def _tokenize_document_exactly(self, text: str) -> list[str]:
        """Exactly spaCy's document-level special-case matching. A matcher span can only cross the space
        between two chunks if the first chunk ends with a token that a pattern continues and the second
        starts with a token that continues a pattern; chunks linked that way form a group matched as a
        whole (a span's text keeps its space, so a span across chunks is never a special case itself but
        still blocks the spans it overlaps). Every other piece keeps its cached tokens. Also handles
        whitespace at the very start, which spaCy keeps whole as one token."""
        pieces = _WHITESPACE_SPLIT.split(text)
        raw = self._raw_cache
        earlier, later = self._pattern_earlier_tokens, self._pattern_later_tokens
        result: list[str] = []
        group: list[str] = []

        def flush():
            if len(group) == 1:
                result.extend(self._cache[group[0]])
            elif group:
                tokens, chunk_of = [], []
                for number, chunk in enumerate(group):
                    tokens.extend(raw[chunk])
                    chunk_of.extend([number] * len(raw[chunk]))

                def span_text(start, end):
                    return "".join(token if position == start or chunk_of[position] == chunk_of[position - 1]
                                   else " " + token for position, token in enumerate(tokens[start:end], start))

                kept = self._find_matches(tokens)
                result.extend(self._finish(self._replace_matches(tokens, kept, span_text) if kept else tokens))
            group.clear()

        first = 0
        if len(pieces) > 1 and pieces[0] == '':
            result.extend(self._finish(self._tokenize_span(pieces[1], with_special_cases=True)))
            first = 2
        for index in range(first, len(pieces)):
            piece = pieces[index]
            if index % 2 == 1:
                if piece != ' ':  # a whitespace token separates: no span crosses it
                    flush()
                    result.extend(self._cache[piece])
                continue
            if not piece:
                continue
            linked = (group and pieces[index - 1] == ' ' and raw[group[-1]][-1] in earlier
                      and raw[piece][0] in later)
            if not linked:
                flush()
            group.append(piece)
        flush()
        return result

    def __call__(self, text: str) -> list[str]:
        pieces = _WHITESPACE_SPLIT.split(text)
        if len(pieces) > 1 and pieces[0] == '':
            return self._tokenize_document_exactly(text)
        tokens = list(itertools.chain.from_iterable(map(self._cache.__getitem__, pieces)))
        if self._chunks_with_matches and not self._chunks_with_matches.isdisjoint(pieces):
            return self._tokenize_document_exactly(text)
        return tokens

    def token_ids(self, text: str, vocabulary: dict[str, int]) -> list[int]:
        """The tokens of `text` as ids in `vocabulary` (a new token gets `len(vocabulary)`), with ids cached
        per chunk so that the work per token is a dictionary look-up (used by the parallel tokenizer's
        workers). `[inverse[i] for i in ids] == self(text)`; the numbering is not first-seen order, and the
        vocabulary may also gain the chunk-level tokens of a document that then takes the exact path."""
        if vocabulary is not self._ids_vocabulary:
            setdefault = vocabulary.setdefault
            self._ids_vocabulary = vocabulary
            self._ids_cache = _ChunkTokens(
                lambda chunk: tuple([setdefault(token, len(vocabulary)) for token in self._cache[chunk]]))
        pieces = _WHITESPACE_SPLIT.split(text)
        if not (len(pieces) > 1 and pieces[0] == ''):
            ids = list(itertools.chain.from_iterable(map(self._ids_cache.__getitem__, pieces)))
            if not self._chunks_with_matches or self._chunks_with_matches.isdisjoint(pieces):
                return ids
        return [vocabulary.setdefault(token, len(vocabulary)) for token in self(text)]


# ----------------------------------------------------------------------------------------------------------
# spacy: the reference, as fastai builds it.

class SpacyWordTokenizer:
    """fastai's `SpacyTokenizer`: `spacy.blank('en')` with the special tokens as special cases."""

    def __init__(self, post_rules: Sequence[Callable[[str], str]] = text_rules.DEFAULT_POST_RULES,
                 lang: str = "en"):
        try:
            import spacy
            from spacy.symbols import ORTH
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the 'spacy' tokenizer needs spaCy: pip install 'ulmfit_jax[text]'") from error
        nlp = spacy.blank(lang)
        for token in text_rules.SPECIAL_TOKENS:
            nlp.tokenizer.add_special_case(token, [{ORTH: token}])
        self._tokenizer = nlp.tokenizer
        self._post_rules = tuple(post_rules)

    def __call__(self, text: str) -> list[str]:
        tokens = [token.text for token in self._tokenizer(text)]
        for rule in self._post_rules:
            tokens = [rule(token) for token in tokens]
        return tokens


# ----------------------------------------------------------------------------------------------------------
# sentencepiece: MultiFiT's subword units.

def sentencepiece_vocab_size(texts: Iterable[str], max_vocab_size: int = 30000) -> int:
    """fastai's `_get_vocab_sz`: unique space-separated words // 4, rounded up to a multiple of 8, >= 29."""
    words: set[str] = set()
    for text in texts:
        for line in text.split("\n"):  # fastai counts per line of the training file
            words.update(line.split())
            if len(words) // 4 > max_vocab_size:
                return max_vocab_size
    size = len(words) // 4
    while size % 8 != 0:
        size += 1
    return max(size, 29)


def train_sentencepiece(processed_texts: Sequence[str], model_prefix: str, vocab_size: int | None = None,
                        max_vocab_size: int = 30000, character_coverage: float = 0.99999,
                        model_type: str = "unigram") -> str:
    """Train a SentencePiece model with fastai's settings on rule-processed texts; returns the model path.

    The training file holds the texts one after another, each followed by a newline, as fastai writes it
    (the trainer reads one sentence a line, so a text with newlines gives several sentences).
    """
    import sentencepiece

    if vocab_size is None:
        vocab_size = sentencepiece_vocab_size(processed_texts, max_vocab_size)
    special_pieces = ["\u2581" + token for token in text_rules.SPECIAL_TOKENS]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as handle:
        for text in processed_texts:
            handle.write(f"{text}\n")
        input_path = handle.name
    try:
        sentencepiece.SentencePieceTrainer.Train(
            input=input_path, vocab_size=vocab_size, model_prefix=model_prefix,
            character_coverage=character_coverage, model_type=model_type,
            unk_id=len(special_pieces), pad_id=-1, bos_id=-1, eos_id=-1, minloglevel=2,
            user_defined_symbols=",".join(special_pieces), hard_vocab_limit=False)
    finally:
        os.unlink(input_path)
    return model_prefix + ".model"


class SentencePieceWordTokenizer:
    """Encode rule-processed text into SentencePiece pieces (fastai's `SentencePieceTokenizer.__call__`)."""

    def __init__(self, model_path: str, post_rules: Sequence[Callable[[str], str]] = ()):
        import sentencepiece

        self.model_path = str(model_path)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self._post_rules = tuple(post_rules)

    def __call__(self, text: str) -> list[str]:
        tokens = self._processor.encode(text, out_type=str)
        for rule in self._post_rules:
            tokens = [rule(token) for token in tokens]
        return tokens


# ----------------------------------------------------------------------------------------------------------

class TextTokenizer:
    """Rules + base tokenizer: `TextTokenizer(settings)(raw_text) -> list[str]` (fastai's `tokenize1`).

    For 'sentencepiece' the settings must name a trained model (see `train_sentencepiece`); fastai applies
    no post-rules after SentencePiece (its pieces already use '▁'), and neither does this class.
    """

    def __init__(self, settings: TokenizerSettings = TokenizerSettings()):
        self.settings = settings
        self._pre_rules = settings.pre_rule_functions()
        post_rules = settings.post_rule_functions()
        if settings.kind == "fast":
            self._base = FastWordTokenizer(post_rules)
        elif settings.kind == "spacy":
            self._base = SpacyWordTokenizer(post_rules)
        else:
            if settings.sentencepiece_model is None:
                raise ValueError("a 'sentencepiece' TextTokenizer needs settings.sentencepiece_model; "
                                 "train one with train_sentencepiece() (prepare_data.py does this)")
            self._base = SentencePieceWordTokenizer(settings.sentencepiece_model)

    def preprocess(self, text: str) -> str:
        return text_rules.apply_rules(text, self._pre_rules)

    def __call__(self, text: str) -> list[str]:
        return self._base(text_rules.apply_rules(text, self._pre_rules))

    def token_ids(self, text: str, vocabulary: dict[str, int]) -> list[int]:
        """The tokens as ids in `vocabulary`, adding new ones (see `FastWordTokenizer.token_ids`)."""
        processed = text_rules.apply_rules(text, self._pre_rules)
        if isinstance(self._base, FastWordTokenizer):
            return self._base.token_ids(processed, vocabulary)
        return [vocabulary.setdefault(token, len(vocabulary)) for token in self._base(processed)]


def tokenize(text: str, settings: TokenizerSettings = TokenizerSettings()) -> list[str]:
    """One document -> tokens. Builds a tokenizer each call: use `TextTokenizer` for many documents."""
    return TextTokenizer(settings)(text)
