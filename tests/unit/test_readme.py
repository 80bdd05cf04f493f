"""The README's library example must keep working as printed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(import asyncio\nimport arr\n.*?)```", text, re.S)
    assert match, "README lost its library example"
    code = match.group(1)
    assert "asyncio.run(arr.run(router))" in code and '("0.0.0.0", 8000)' in code
    # Run it on an ephemeral loopback port, started by the test instead of arr.run.
    return (code.replace("asyncio.run(arr.run(router))", "")
                .replace('("0.0.0.0", 8000)', '("127.0.0.1", 0)'))


async def test_readme_library_example_answers_local_and_reject():
    scope: dict = {}
    exec(compile(readme_example(), str(README), "exec"), scope)
    router = scope["router"]
    await router.start()
    try:
        reader, writer = await asyncio.open_connection(*router.address)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"DELETE /x HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b"pong\n")
        second = await reader.readuntil(b"method not allowed\n")
        writer.close()
    finally:
        await router.shutdown(1)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 405 ")
