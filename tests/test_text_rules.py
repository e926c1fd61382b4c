"""Rule-by-rule tests: fastai's own notebook examples (30_text.core), and equality with fastai's functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from ulmfit_jax.text import rules
from ulmfit_jax.text.rules import TK_MAJ, TK_REP, TK_UP, TK_WREP, UNK

fastai_core = pytest.importorskip("fastai.text.core", reason="fastai 2.8.12 is the reference")

# (rule, input, output) from fastai's notebook nbs/30_text.core.ipynb.
FASTAI_EXAMPLES = [
    (rules.spec_add_spaces, '#fastai', ' # fastai'),
    (rules.spec_add_spaces, '/fastai', ' / fastai'),
    (rules.spec_add_spaces, '\\fastai', ' \\ fastai'),
    (rules.rm_useless_spaces, 'a  b   c', 'a b c'),
    (rules.replace_rep, 'aa', 'aa'),
    (rules.replace_rep, 'aaaa', f' {TK_REP} 4 a '),
    (rules.replace_wrep, 'ah ah', 'ah ah'),
    (rules.replace_wrep, 'ah ah ah', f' {TK_WREP} 3 ah '),
    (rules.replace_wrep, 'ah ah ah ah', f' {TK_WREP} 4 ah '),
    (rules.replace_wrep, 'ah ah ah ah ', f' {TK_WREP} 4 ah  '),
    (rules.replace_wrep, 'ah ah ah ah.', f' {TK_WREP} 4 ah .'),
    (rules.replace_wrep, 'ah ah ahi', 'ah ah ahi'),
    (rules.fix_html, '#39;bli#146;', "'bli'"),
    (rules.fix_html, 'Sarah amp; Duck...', 'Sarah & Duck …'),
    (rules.fix_html, 'a nbsp; #36;', 'a   $'),
    (rules.fix_html, '\\" <unk>', f'" {UNK}'),
    (rules.fix_html, 'quot;  @.@  @-@ ', "' .-"),
    (rules.fix_html, '<br />text\\nine', '\ntext\nine'),
    (rules.replace_all_caps, "I'M SHOUTING", f"{TK_UP} i'm {TK_UP} shouting"),
    (rules.replace_all_caps, "I'm speaking normally", "I'm speaking normally"),
    (rules.replace_all_caps, "I am speaking normally", "i am speaking normally"),
    (rules.replace_maj, "Jeremy Howard", f'{TK_MAJ} jeremy {TK_MAJ} howard'),
    (rules.replace_maj, "I don't think there is any maj here", "i don't think there is any maj here"),
    (rules.lowercase, "  Hello There ", "xxbos hello there"),
    (rules.replace_space, "\n ", "\n▁"),
]


@pytest.mark.parametrize("rule,text,expected", FASTAI_EXAMPLES)
def test_fastai_notebook_examples(rule, text, expected):
    assert rule(text) == expected
    assert getattr(fastai_core, rule.__name__)(text) == expected


def test_special_tokens_in_fastai_v2_order():
    assert rules.SPECIAL_TOKENS == tuple(fastai_core.defaults.text_spec_tok)
    assert [r.__name__ for r in rules.DEFAULT_PRE_RULES] == [r.__name__ for r in fastai_core.defaults.text_proc_rules]
    assert [r.__name__ for r in rules.DEFAULT_POST_RULES] == [
        r.__name__ for r in fastai_core.defaults.text_postproc_rules]


def test_reference_example_all_rules():
    text = "Hello WORLD this is sooooo good good good good <br />Isn't it?"
    expected = "xxbos xxmaj hello xxup world this is s xxrep 5 o xxwrep 4 good \nxxmaj isn't it?"
    assert rules.apply_rules(text) == expected
    assert fastai_core.compose(*fastai_core.defaults.text_proc_rules)(text) == expected


_TEXT_ALPHABET = st.sampled_from(list("aAbBzZ  \n\t.,!?'\"#/\\&;<>é0123") + ["<br />", "amp;", "...", "Word", "WORD"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_TEXT_ALPHABET, max_size=40).map("".join))
def test_every_rule_equals_fastai_on_random_text(text):
    for rule in (*rules.DEFAULT_PRE_RULES, *rules.DEFAULT_POST_RULES):
        assert rule(text) == getattr(fastai_core, rule.__name__)(text), rule.__name__


def test_join_fields_marks_fields_like_fastai():
    assert rules.join_fields(["a"]) == "a"
    assert rules.join_fields(["title", "body"]) == "xxfld 1 title xxfld 2 body"
    assert rules.join_fields(["title", "body"], mark_fields=False) == "title body"
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"a": ["title"], "b": ["body"]})
    assert fastai_core._join_texts(frame, mark_fields=True)[0] == "xxfld 1 title xxfld 2 body"


@pytest.mark.parametrize("tokens,expected", [
    (["xxbos", "xxmaj", "hello", "xxup", "world", "!"], "Hello WORLD!"),
    (["s", "xxrep", "5", "o", "good"], "s ooooo good"),
    (["xxwrep", "3", "very", "good", "."], "very very very good."),
    (["i", "do", "n't", "know", "\n▁", "xxmaj", "why"], "i do n't know\nWhy".replace(" n't", "n't")),
])
def test_detokenize(tokens, expected):
    assert rules.detokenize(tokens) == expected
