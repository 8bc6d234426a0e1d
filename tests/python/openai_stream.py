"""Streams a chat completion through the proxy with the official `openai`
package and prints, as JSON, every chunk with the time it arrived.

Usage: openai_stream.py --base-url http://127.0.0.1:PORT/v1 --model NAME
"""

import argparse
import json
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=30.0)
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
    )
    chunks = []
    for chunk in stream:
        choice = chunk.choices[0] if chunk.choices else None
        chunks.append(
            {
                "t": time.monotonic() - started,
                "model": chunk.model,
                "content": choice.delta.content if choice else None,
                "finish_reason": choice.finish_reason if choice else None,
            }
        )
    print(json.dumps({"chunks": chunks}))


if __name__ == "__main__":
    main()
