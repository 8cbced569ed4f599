"""The Instruct template has one owner (generation/template.py): the Jinja text that transformers and mlx-lm
apply renders exactly what our Python encoder produces, text and token ids."""

import json

import jinja2.sandbox
import pytest

from openelm_mlx import CheckpointError
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.template import (
    EOS_TEXT,
    JINJA,
    render_chat,
    render_continuation,
    split_replies,
)
from openelm_mlx.generation.tokenizer import Tokenizer, find_tokenizer, uses_chat_template

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Hi there"}
ASSISTANT = {"role": "assistant", "content": "Hello! How can I help?"}
USER2 = {"role": "user", "content": "Name a colour.\nThen 中文 🦙, and  two spaces."}
ASSISTANT2 = {"role": "assistant", "content": ""}
CONVERSATIONS = {
    "user": [USER],
    "system-user": [SYSTEM, USER],
    "user-assistant": [USER, ASSISTANT],
    "assistant-only": [ASSISTANT],
    "multi-turn": [SYSTEM, USER, ASSISTANT, USER2, ASSISTANT2, USER],
}


def render_jinja(messages, add_generation_prompt):
    """The template as transformers renders it (its sandbox and block settings; bos/eos as their text)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(JINJA).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token=EOS_TEXT
    )


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEMO_DIR / "tokenizer.model", chat_template=True)


def ids_of_special_text(tok, text):
    """Ids of template text whose `<s>` / `</s>` are the special tokens (how transformers reads them)."""
    assert text.startswith("<s>")
    ids = [tok.bos_id]
    for i, chunk in enumerate(text[3:].split(EOS_TEXT)):
        ids += [tok.eos_id] if i else []
        ids += tok.sp.encode(chunk) if chunk else []
    return ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_jinja_template_renders_what_our_encoder_produces(tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = render_jinja(messages, add_generation_prompt)
    assert text == "<s>" + render_chat(messages, add_generation_prompt)
    assert ids_of_special_text(tok, text) == tok.apply_chat_template(messages, add_generation_prompt)


def test_transformers_applies_the_saved_template_to_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS.values():
        for agp in (True, False):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=agp, tokenize=True, return_dict=False)
            assert list(ids) == tok.apply_chat_template(messages, agp)


def test_continuation_and_reply_split_are_pieces_of_the_whole_rendering():
    messages = CONVERSATIONS["multi-turn"]
    whole = render_chat(messages)
    assert whole.endswith(render_continuation(messages[-1:]))
    assert whole.startswith(render_chat(messages[:3], add_generation_prompt=False))
    joined = "".join(prompt + reply + EOS_TEXT for prompt, reply in split_replies(messages))
    assert joined == render_chat(messages[:5], add_generation_prompt=False).removesuffix("\n")


def test_a_corrupt_tokenizer_config_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "OpenELM-270M-Instruct"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((DEMO_DIR / "tokenizer.model").read_bytes())
    cfg = folder / "tokenizer_config.json"
    for text, fragment in [
        ('{"chat_template": "x",', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"chat_template": 3}', "chat_template must be a string"),
    ]:
        cfg.write_text(text)
        with pytest.raises(CheckpointError, match=fragment) as e:
            find_tokenizer(folder)  # not guessed from the "Instruct" in the folder's name
        assert str(cfg) in str(e.value)
    cfg.write_text(json.dumps({"chat_template": ""}))
    assert uses_chat_template(folder, folder.name) is False  # a readable record still wins over the name
