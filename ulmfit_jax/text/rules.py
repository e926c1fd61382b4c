"""fastai v2's text rules (fastai 2.8.12 `fastai/text/core.py`), as pure `str -> str` functions.

The pre-rules run on the raw text, in this order (`DEFAULT_PRE_RULES`):
`fix_html, replace_rep, replace_wrep, spec_add_spaces, rm_useless_spaces, replace_all_caps, replace_maj,
lowercase`; then a base tokenizer splits the text; then the post-rule `replace_space` runs on every token.
The regular expressions are fastai's, character for character, because a pretrained fastai model only
works with exactly the token conventions it was trained with.

Example (checked against fastai in tests/test_text_rules.py)::

    >>> apply_rules("Hello WORLD this is sooooo good good good good <br />Isn't it?")
    "xxbos xxmaj hello xxup world this is s xxrep 5 o xxwrep 4 good \\nxxmaj isn't it?"

`detokenize` undoes `xxmaj`, `xxup`, `xxrep`, `xxwrep` (and drops `xxbos`, `xxpad`, ...) for display only:
the rules lose information (e.g. original spacing), so it is not an exact inverse.
"""

from __future__ import annotations

import html
import re
from typing import Callable, Iterable, Sequence

UNK, PAD, BOS, EOS, FLD, TK_REP, TK_WREP, TK_UP, TK_MAJ = (
    "xxunk xxpad xxbos xxeos xxfld xxrep xxwrep xxup xxmaj".split())
# fastai v2 order: after make_vocab these are ids 0..8 (fastai v1 used another order).
SPECIAL_TOKENS: tuple[str, ...] = (UNK, PAD, BOS, EOS, FLD, TK_REP, TK_WREP, TK_UP, TK_MAJ)
UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_re_spec = re.compile(r'([/#\\])')
_re_space = re.compile(' {2,}')
_re_rep = re.compile(r'(\S)(\1{2,})')
_re_wrep = re.compile(r'(?:\s|^)(\w+)\s+((?:\1\s+)+)\1(\s|\W|$)')
_re_all_caps = re.compile(r'(\s|^)([A-Z]+[^a-z\s]*)(?=(\s|$))')
_re_maj = re.compile(r'(\s|^)([A-Z][^A-Z\s]*)(?=(\s|$))')


def spec_add_spaces(text: str) -> str:
    "Add spaces around / and # (and backslash)."
    return _re_spec.sub(r' \1 ', text)


def rm_useless_spaces(text: str) -> str:
    "Collapse runs of two or more spaces (only ' ', not other whitespace) into one."
    return _re_space.sub(' ', text)


def _replace_rep_match(match: re.Match) -> str:
    char, run = match.groups()
    return f' {TK_REP} {len(run) + 1} {char} '


def replace_rep(text: str) -> str:
    "Character runs of 3 or more: 'cccc' -> ' xxrep 4 c '."
    return _re_rep.sub(_replace_rep_match, text)


def _replace_wrep_match(match: re.Match) -> str:
    word, repeats, end = match.groups()
    return f' {TK_WREP} {len(repeats.split()) + 2} {word} {end}'


def replace_wrep(text: str) -> str:
    "Word repeated 3 or more times: 'w w w w' -> ' xxwrep 4 w '."
    return _re_wrep.sub(_replace_wrep_match, text)


def fix_html(text: str) -> str:
    "fastai's clean-up of HTML remnants and WikiText escapes, then `html.unescape`."
    text = text.replace('#39;', "'").replace('amp;', '&').replace('#146;', "'").replace('nbsp;', ' ').replace(
        '#36;', '$').replace('\\n', "\n").replace('quot;', "'").replace('<br />', "\n").replace(
        '\\"', '"').replace('<unk>', UNK).replace(' @.@ ', '.').replace(' @-@ ', '-').replace('...', ' …')
    return html.unescape(text)


def _replace_all_caps_match(match: re.Match) -> str:
    marker = f'{TK_UP} ' if len(match.group(2)) > 1 else ''
    return f"{match.group(1)}{marker}{match.group(2).lower()}"


def replace_all_caps(text: str) -> str:
    "Words in ALL CAPS (length > 1) -> 'xxup word'."
    return _re_all_caps.sub(_replace_all_caps_match, text)


def _replace_maj_match(match: re.Match) -> str:
    marker = f'{TK_MAJ} ' if len(match.group(2)) > 1 else ''
    return f"{match.group(1)}{marker}{match.group(2).lower()}"


def replace_maj(text: str) -> str:
    "Capitalized words (length > 1) -> 'xxmaj word'."
    return _re_maj.sub(_replace_maj_match, text)


def lowercase(text: str, add_bos: bool = True, add_eos: bool = False) -> str:
    "Lowercase, strip, and prepend 'xxbos ' (fastai's default: no 'xxeos')."
    return (f'{BOS} ' if add_bos else '') + text.lower().strip() + (f' {EOS}' if add_eos else '')


def replace_space(token: str) -> str:
    "Post-rule on each token: embedded spaces -> '▁' so that tokens can be joined and split on ' '."
    return token.replace(' ', '▁')


DEFAULT_PRE_RULES: tuple[Callable[[str], str], ...] = (
    fix_html, replace_rep, replace_wrep, spec_add_spaces, rm_useless_spaces, replace_all_caps, replace_maj,
    lowercase)
DEFAULT_POST_RULES: tuple[Callable[[str], str], ...] = (replace_space,)


def apply_rules(text: str, rules: Sequence[Callable[[str], str]] = DEFAULT_PRE_RULES) -> str:
    "Apply `rules` left to right (fastai's `compose(*rules)`)."
    for rule in rules:
        text = rule(text)
    return text


def join_fields(fields: Sequence[str], mark_fields: bool | None = None) -> str:
    """Join several text fields of one record as fastai's `_join_texts` does.

    With `mark_fields` (default: True when there is more than one field) each field is preceded by
    'xxfld N ' (N counted from 1), e.g. ('a', 'b') -> 'xxfld 1 a xxfld 2 b'.
    """
    if mark_fields is None:
        mark_fields = len(fields) > 1
    parts = []
    for index, field in enumerate(fields):
        prefix = (f'{FLD} {index + 1} ' if mark_fields else '')
        separator = '' if index == 0 else ' '
        parts.append(separator + prefix + str(field))
    return ''.join(parts)


def detokenize(tokens: Iterable[str]) -> str:
    """Readable text from rule-processed tokens, for display (not an exact inverse of the rules).

    `xxmaj w` -> 'W', `xxup w` -> 'W'*, `xxrep n c` -> c*n, `xxwrep n w` -> 'w w ... w' (n times);
    `xxbos`, `xxeos`, `xxpad`, `xxfake` are dropped and '▁' goes back to ' '.
    """
    tokens = [t.replace('▁', ' ') for t in tokens]
    words: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token in (BOS, EOS, PAD, 'xxfake'):
            index += 1
        elif token == TK_MAJ and following is not None:
            words.append(following[:1].upper() + following[1:])
            index += 2
        elif token == TK_UP and following is not None:
            words.append(following.upper())
            index += 2
        elif token in (TK_REP, TK_WREP) and index + 2 < len(tokens) and tokens[index + 1].isdigit():
            count, unit = int(tokens[index + 1]), tokens[index + 2]
            words.append(unit * count if token == TK_REP else ' '.join([unit] * count))
            index += 3
        else:
            words.append(token)
            index += 1
    text = ' '.join(words)
    # Undo the spaces a word tokenizer put before punctuation and around newlines.
    text = re.sub(r" ([.,!?;:)\]}%]|n't|'s|'re|'ve|'ll|'d|'m)(?=\s|$|[.,!?;:])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" *\n *", "\n", text)
    return text
