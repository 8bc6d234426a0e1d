"""Lists models through the proxy with the `openai` package
(`client.models.list()`) and prints their ids and owners as JSON.

Usage: openai_models.py --base-url http://127.0.0.1:PORT/v1
"""

import argparse
import json

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    models = list(client.models.list())
    print(
        json.dumps(
            {
                "ids": [m.id for m in models],
                "owned_by": [m.owned_by for m in models],
                "objects": sorted({m.object for m in models}),
            }
        )
    )


if __name__ == "__main__":
    main()
