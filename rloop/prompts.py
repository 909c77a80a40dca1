"""The one place that decides how a prompt becomes text and token ids.

Instruct models get the tokenizer's chat template (rendered once, with the generation prompt);
base models get `data.promptTemplate`. A chat template usually writes its own BOS/special tokens
as text, so its output is tokenized *without* adding special tokens again (no double BOS); a plain
template is tokenized with them (a Llama tokenizer then adds its BOS once).

Every stage that samples (rl, rollout, eval) renders and encodes through a `PromptFormat`, and RFT
trains on the ids that were sampled, so training and sampling always see the same prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PromptFormatError(ValueError):
    """The model and the prompt settings do not fit together; the message says which field to change."""


@dataclass(frozen=True)
class PromptFormat:
    tokenizer: Any
    chat_template: bool = False
    template: str = "{prompt}"

    @classmethod
    def for_model(cls, tokenizer, *, chat_template: bool, template: str = "{prompt}") -> PromptFormat:
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptFormatError(
                "model.chatTemplate is true but the model's tokenizer has no chat template; set "
                "model.chatTemplate: false and shape prompts with data.promptTemplate, or use an instruct model"
            )
        return cls(tokenizer, chat_template, template)

    def render(self, example) -> str:
        """Prompt text fed to the policy for an `rloop.data.Example`."""
        if self.chat_template:
            messages = list(example.messages or [{"role": "user", "content": example.prompt}])
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.template.format(prompt=example.prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (special tokens added only when no chat template wrote them)."""
        return list(self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"])
