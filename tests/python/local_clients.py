"""Asks the proxy's local model for embeddings with real clients and prints
what they got as JSON: the `openai` package (`embeddings.create` with the
default encoding, `float` and `base64`), and `grpcio` calling KServe v2
`ModelInfer` with a BYTES input (stubs generated at run time from the
repository's proto file, as kserve_grpc.py does).

Usage: local_clients.py --base-url http://127.0.0.1:PORT/v1 --model NAME
       --target 127.0.0.1:PORT --proto-dir DIR --grpc-model NAME TEXT...
"""

import argparse
import base64
import importlib
import json
import struct
import sys
import tempfile

import grpc
import openai

from kserve_grpc import generate


def embeddings(base_url: str, model: str, texts: list[str]) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    result = {}
    default = client.embeddings.create(model=model, input=texts)
    result["default"] = [[float(x) for x in d.embedding] for d in default.data]
    result["model"] = default.model
    result["usage"] = {
        "prompt_tokens": default.usage.prompt_tokens,
        "total_tokens": default.usage.total_tokens,
    }
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    result["float"] = [d.embedding for d in floats.data]
    encoded = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    result["base64"] = []
    for d in encoded.data:
        raw = base64.b64decode(d.embedding)
        result["base64"].append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    try:
        client.embeddings.create(model=model, input=[])
        result["empty"] = "accepted"
    except openai.BadRequestError as e:
        result["empty"] = {"status": e.status_code, "body": e.body}
    return result


def kserve(target: str, proto_dir: str, model: str, texts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        generate(proto_dir, out)
        sys.path.insert(0, out)
        pb2 = importlib.import_module("kserve.grpc_service_pb2")
        pb2_grpc = importlib.import_module("kserve.grpc_service_pb2_grpc")
    result = {}
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ModelReady(pb2.ModelReadyRequest(name=model), timeout=60)
        result["ready"] = ready.ready
        request = pb2.ModelInferRequest(
            model_name=model,
            id="py-1",
            inputs=[
                pb2.ModelInferRequest.InferInputTensor(
                    name="text",
                    datatype="BYTES",
                    shape=[len(texts)],
                    contents=pb2.InferTensorContents(
                        bytes_contents=[t.encode("utf-8") for t in texts]
                    ),
                )
            ],
        )
        response = stub.ModelInfer(request, timeout=60)
        output = response.outputs[0]
        result["infer"] = {
            "model_name": response.model_name,
            "id": response.id,
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
            "data": list(output.contents.fp32_contents),
        }
        bad = pb2.ModelInferRequest(
            model_name=model,
            inputs=[
                pb2.ModelInferRequest.InferInputTensor(
                    name="text",
                    datatype="FP32",
                    shape=[1],
                    contents=pb2.InferTensorContents(fp32_contents=[1.0]),
                )
            ],
        )
        try:
            stub.ModelInfer(bad, timeout=60)
            result["invalid"] = "accepted"
        except grpc.RpcError as e:
            result["invalid"] = {"code": e.code().name, "details": e.details()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--grpc-model", required=True)
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()
    result = {
        "openai": embeddings(args.base_url, args.model, args.texts),
        "kserve": kserve(args.target, args.proto_dir, args.grpc_model, args.texts),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
