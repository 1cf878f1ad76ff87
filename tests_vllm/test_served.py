"""End to end: `vllm serve` with the plugin on 127.0.0.1; a chat completion with an image via the openai client."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_support import KV_CACHE_BYTES, flowcut_overrides

from conftest import KEEP, HuggingFaceReference

STARTUP_SECONDS = 300
SAMPLE = 1
"""The test sample asked about: "what colour is the square ?"."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve was not healthy after {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the engine processes it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def server_url(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("served") / "vllm-serve.log"
    command = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps(flowcut_overrides(KEEP)),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
    ]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, url, log)
        yield url
    finally:
        stop(server)
    assert server.poll() is not None, "the server must be stopped at the end"


def data_url(image: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_completion_with_an_image(server_url: str, checkpoint: Path, hf_reference: HuggingFaceReference) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    question = hf_reference.prompts[SAMPLE].removeprefix("USER: <image>\n").removesuffix(" ASSISTANT:")
    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    (model,) = [entry.id for entry in client.models.list().data]
    completion = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(hf_reference.images[SAMPLE])}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=4,
        temperature=0.0,
    )

    # The checkpoint's chat template renders "USER: <image>\n<question> ASSISTANT:"; its one <image>
    # token becomes KEEP placeholders, not the stock model's 576.
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text_tokens = len(tokenizer.encode(rendered, add_special_tokens=False)) - 1
    print(f"served: {completion.usage.prompt_tokens} prompt tokens ({text_tokens} text + {KEEP} visual)")
    assert completion.usage.prompt_tokens == text_tokens + KEEP == hf_reference.prompt_lengths[SAMPLE]
    assert completion.choices[0].message.content.strip() == hf_reference.answers[SAMPLE] == "orange"
