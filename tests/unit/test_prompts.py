"""rloop.prompts: one place renders and tokenizes prompts; a chat template's BOS is never doubled."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tokenizers import processors

from rloop.data import Example
from rloop.policy import char_tokenizer
from rloop.prompts import PromptFormat, PromptFormatError

# A Llama-style template: it writes the BOS itself, and the tokenizer also adds one by default.
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
EXAMPLE = Example(id="q1", prompt="1/2:", answer="1")


@pytest.fixture
def bos_tokenizer():
    tok = char_tokenizer("0123456789/:[]userat")
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.chat_template = TEMPLATE
    assert tok("1")["input_ids"] == [bos, tok.convert_tokens_to_ids("1")]  # adds a BOS by itself
    return tok


def test_chat_template_is_rendered_once_with_one_bos(bos_tokenizer):
    fmt = PromptFormat.for_model(bos_tokenizer, chat_template=True)
    text = fmt.render(EXAMPLE)
    assert text == "<s>[user]1/2:[a]"
    ids = fmt.encode(text)
    assert ids.count(bos_tokenizer.bos_token_id) == 1 and ids[0] == bos_tokenizer.bos_token_id
    # the same ids as transformers' own tokenizing chat template
    chat = bos_tokenizer.apply_chat_template([{"role": "user", "content": "1/2:"}], tokenize=True,
                                             add_generation_prompt=True)
    assert ids == list(chat["input_ids"] if hasattr(chat, "keys") else chat)


def test_plain_template_gets_the_tokenizers_special_tokens(bos_tokenizer):
    fmt = PromptFormat.for_model(bos_tokenizer, chat_template=False, template="{prompt}0")
    assert fmt.render(EXAMPLE) == "1/2:0"
    assert fmt.encode("1/2:0")[0] == bos_tokenizer.bos_token_id


def test_chat_messages_of_the_example_are_used(bos_tokenizer):
    example = Example(id="q2", prompt="ignored", answer="1", messages=({"role": "user", "content": "3"},))
    assert PromptFormat.for_model(bos_tokenizer, chat_template=True).render(example) == "<s>[user]3[a]"


def test_chat_template_asked_for_a_tokenizer_without_one():
    with pytest.raises(PromptFormatError, match="model.chatTemplate.*data.promptTemplate"):
        PromptFormat.for_model(char_tokenizer(), chat_template=True)
