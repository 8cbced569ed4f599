"""OpenELM's Instruct chat template, the one place that knows it: the Jinja text transformers and mlx-lm apply
(recorded in tokenizer_config.json) and the same rendering in Python, which our encoder, chat sessions,
fine-tuning data and the server use. `</s>` in rendered text stands for the EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import OptionError

Message = dict[str, str]

EOS_TEXT = "</s>"
ROLES = ("system", "user", "assistant")
GENERATION_PROMPT = "<|assistant|>\n"
AFTER_EOS = "\n"  # what a turn writes after its EOS (a cached conversation continues with it)
# The zephyr-style template Apple's Instruct models were tuned with: `<|role|>\n` content EOS `\n` per message.
JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def check_message(message: Any, index: int = 0) -> Message:
    """`message` if it is a {"role", "content"} the template renders.

    Raises:
        OptionError: (option "messages") naming message `index`, when the role is unknown or the content no string.
    """
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
        raise OptionError(
            "messages", f"message {index} needs a 'role' in {ROLES} and a string 'content', got {message!r:.80}"
        )
    return message


def render_turn(message: Message, index: int = 0) -> str:
    """One message as template text (`check_message` first)."""
    check_message(message, index)
    return f"<|{message['role']}|>\n{message['content']}{EOS_TEXT}{AFTER_EOS}"


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The Instruct prompt as text (BOS not included)."""
    text = "".join(render_turn(m, i) for i, m in enumerate(messages))
    return text + GENERATION_PROMPT if add_generation_prompt else text


def render_continuation(messages: Sequence[Message]) -> str:
    """Text that continues a conversation whose last turn ended with EOS: the rest of the whole conversation's
    rendering, with the generation prompt."""
    return AFTER_EOS + render_chat(messages, add_generation_prompt=True)


def split_replies(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """The rendering of a conversation cut at each assistant reply: (template text up to and including the
    generation prompt, the reply's content) pairs; each reply is followed by EOS, and messages after the
    last reply are dropped. Joining `text + content + EOS_TEXT` over the pairs gives `render_chat`'s text."""
    pairs, pending = [], ""
    for i, m in enumerate(messages):
        if check_message(m, i)["role"] != "assistant":
            pending += render_turn(m, i)
            continue
        pairs.append((pending + GENERATION_PROMPT, m["content"]))
        pending = AFTER_EOS
    return pairs
