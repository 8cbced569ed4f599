"""Serve a model over the OpenAI API and ask it one question with the official `openai` client.

python examples/serve.py [MODEL]   # default: the bundled demo model; `pip install openai` for the client
"""

import socket
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

with socket.socket() as s:  # a free port
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

# The same as running `openelm-mlx serve --port PORT [--model MODEL]` in a terminal.
command = [sys.executable, "-c", "from openelm_mlx.cli import main, serve; main()", "serve", "--port", str(port)]
server = subprocess.Popen(
    [*command, *(["--model", sys.argv[1]] if len(sys.argv) > 1 else []), "--log-level", "warning"]
)
try:
    for _ in range(300):  # wait until the model is loaded and the server answers
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.1)

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
    reply = client.chat.completions.create(
        model="default",  # the one model this server serves
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Who are you?"},
        ],
        max_tokens=40,
        temperature=0,
    )
    print(f"assistant: {reply.choices[0].message.content}")
    print(f"[{reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} generated]")
finally:
    server.terminate()  # SIGTERM: the server shuts down cleanly
    server.wait(10)
