"""A scripted multi-turn chat: the KV cache is kept between turns, so history is never re-encoded.

python examples/chat.py [INSTRUCT_MODEL]   # e.g. a converted OpenELM-270M-Instruct
"""

import sys

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.chat import ChatSession

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR, chat_template=True)
session = ChatSession(
    model, tokenizer, system="You are a helpful assistant.", max_tokens=40, repetition_penalty=1.2
)  # Apple's model card suggests 1.2

for message in ["Who are you?", "Say that again, but shorter."]:
    print(f">>> {message}")
    for step in session.send(message):
        print(step.text, end="", flush=True)
    print(f"\n[{session.cache[0].offset} tokens in the KV cache]")
