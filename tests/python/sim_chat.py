"""Sends one chat completion to a simulated vLLM server (infermesh-sim) with
the official `openai` package and prints, as JSON, what a user sees: the
time to the first content chunk, the text, the finish reason and the usage
(with cached prompt tokens); with --list-models, the model ids instead.

Usage: sim_chat.py --base-url http://127.0.0.1:PORT/v1 --model NAME
           [--system TEXT] [--question TEXT] [--max-tokens N] [--no-stream]
       sim_chat.py --base-url ... --list-models
"""

import argparse
import json
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--question", default="Say hello")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--list-models", action="store_true")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=60.0)
    if args.list_models:
        print(json.dumps({"models": [m.id for m in client.models.list()]}))
        return
    messages = [
        {"role": "system", "content": args.system},
        {"role": "user", "content": args.question},
    ]
    started = time.monotonic()
    if args.no_stream:
        r = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=args.max_tokens
        )
        print(
            json.dumps(
                {
                    "elapsed": time.monotonic() - started,
                    "text": r.choices[0].message.content,
                    "finish_reason": r.choices[0].finish_reason,
                    "usage": r.usage.model_dump(),
                }
            )
        )
        return
    stream = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    ttft = None
    text = ""
    finish = None
    usage = None
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta.content:
                if ttft is None:
                    ttft = time.monotonic() - started
                text += choice.delta.content
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    print(
        json.dumps(
            {
                "ttft": ttft,
                "elapsed": time.monotonic() - started,
                "chunks": chunks,
                "text": text,
                "finish_reason": finish,
                "usage": usage,
            }
        )
    )


if __name__ == "__main__":
    main()
