"""Streams a chat completion through the proxy with the official `openai`
package and prints, as JSON, every chunk with the time it arrived.

Usage: openai_stream.py --base-url http://127.0.0.1:PORT/v1 --model NAME
       [--include-usage] [--header NAME=VALUE ...]
"""

import argparse
import json
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--include-usage", action="store_true")
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split("=", 1) for h in args.header)
    extra = {"stream_options": {"include_usage": True}} if args.include_usage else {}

    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=30.0)
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        extra_headers=headers,
        **extra,
    )
    chunks = []
    usage = None
    for chunk in stream:
        choice = chunk.choices[0] if chunk.choices else None
        if chunk.usage is not None:
            usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                     "completion_tokens": chunk.usage.completion_tokens}
        chunks.append(
            {
                "t": time.monotonic() - started,
                "model": chunk.model,
                "content": choice.delta.content if choice else None,
                "finish_reason": choice.finish_reason if choice else None,
            }
        )
    print(json.dumps({"chunks": chunks, "usage": usage}))


if __name__ == "__main__":
    main()
