"""The core works without torch: the memory, pages, plans, messages and OpenAIBackend.

Each test runs a fresh interpreter, so modules the test session already imported
(torch for the local backend's tests) do not hide an import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "safetensors", "tokenizers")
MARKER = "TORCH-FREE-OK"

BLOCK = f"""
import importlib.abc, sys

HEAVY = {HEAVY!r}
attempts = []

class NotInstalled(importlib.abc.MetaPathFinder):
    # as if the deepseek-ocr extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
try:
    import torch
except ModuleNotFoundError:
    attempts.clear()
else:
    raise SystemExit("the finder did not block torch")
"""

WORKFLOW = """
import pathlib
from optical_memory import OpticalMemory
from optical_memory.backends import OpenAIBackend
from optical_memory.conversation import build_conversation
from optical_memory.testing import OpenAITestServer

path = pathlib.Path(sys.argv[1]) / "memory.sqlite3"
with OpenAITestServer(reply="March 3rd.") as server:
    backend = OpenAIBackend(server.base_url, "test-model", profile="qwen2.5-vl", timeout=10,
                            max_retries=0, window=4000)  # smaller than the history as text
    with OpticalMemory(path, model=backend) as mem:
        mem.extend("s", build_conversation(200))
        plan = mem.plan("s", "When do we launch?")
        pages = plan.in_context()
        assert pages, plan
        image = mem.page_image("s", pages[0])
        assert image.size == (mem.render_config.width, mem.render_config.height), image.size
        messages = mem.messages("s", "When do we launch?")
        assert messages[-1] == {"role": "user", "content": "When do we launch?"}, messages[-1]
        answer = mem.ask("s", "When do we launch?")
        assert answer.text == "March 3rd.", answer
        assert len(mem.turns("s")) == 202
    assert len(server.requests) == 1
loaded = [m for m in sys.modules if m.partition(".")[0] in HEAVY]
assert not loaded, loaded
print(MARKER, "import attempts:", sorted(set(attempts)))
"""


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_memory_and_openai_backend_work_without_torch(tmp_path):
    code = BLOCK + f"MARKER = {MARKER!r}\n" + WORKFLOW
    result = run_python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert MARKER in result.stdout, result.stdout + result.stderr


def test_importing_the_core_imports_no_torch():
    code = (
        "import sys\n"
        f"heavy = lambda: sorted(m for m in sys.modules if m.partition('.')[0] in {HEAVY!r})\n"
        "import optical_memory\n"
        "print(heavy())\n"
        "import optical_memory.memory, optical_memory.backends.openai, optical_memory.testing\n"
        "print(heavy())\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    after_package, after_core = result.stdout.splitlines()
    assert after_package == "[]", "import optical_memory loads " + after_package
    assert after_core == "[]", "the memory and OpenAIBackend load " + after_core


def test_the_core_imports_no_agent_framework():
    frameworks = ("langchain_core", "langgraph", "llama_index", "mcp")
    code = (
        "import sys\n"
        "import optical_memory, optical_memory.memory, optical_memory.apps.cli\n"
        "import optical_memory.backends.openai, optical_memory.integrations\n"
        f"print(sorted(m for m in sys.modules if m.partition('.')[0] in {frameworks!r}))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "the core loads " + result.stdout
