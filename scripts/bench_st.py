#!/usr/bin/env python3
"""sentence-transformers (PyTorch, CPU) on the fallback benchmark's inputs.

Run by `cargo bench -p infermesh-fallback --bench engine` with .venv-golden's
Python (see scripts/golden.py). Prints `TOKENS BATCH SEQUENCES_PER_SECOND`
lines for batch 1, 8, 32 at 16 and 128 tokens.
"""
import os
import pathlib
import time

import torch
from sentence_transformers import SentenceTransformer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = pathlib.Path(os.environ.get("INFERMESH_MODEL_DIR", ROOT / "models" / "all-MiniLM-L6-v2"))

model = SentenceTransformer(str(MODEL), device="cpu")
for tokens in (16, 128):
    # Same ids as the Rust bench: [CLS] 2000+(i*37)%5000 ... [SEP].
    ids = [101] + [2000 + (i * 37) % 5000 for i in range(tokens - 2)] + [102]
    for batch in (1, 8, 32):
        features = {
            "input_ids": torch.tensor([ids] * batch),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
            "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
        }
        iterations = 2 if tokens * batch >= 1024 else 5
        with torch.inference_mode():
            model(features)
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                model(dict(features))
                times.append(time.perf_counter() - start)
        times.sort()
        print(tokens, batch, batch / times[len(times) // 2], flush=True)
