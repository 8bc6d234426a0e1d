"""Calls KServe v2 `ModelInfer` through the proxy with `grpcio`, using stubs
generated at run time by `grpcio_tools.protoc` from the repository's
`proto/proto/kserve/grpc_service.proto`, and prints the results as JSON.

Usage: kserve_grpc.py --target 127.0.0.1:PORT --proto-dir DIR --model NAME --id ID
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate(proto_dir: str, out: str) -> None:
    proto = os.path.join(proto_dir, "kserve", "grpc_service.proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed with {code} on {proto}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--proto-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--unrouted-model", default="no-such-model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        generate(args.proto_dir, out)
        sys.path.insert(0, out)
        pb2 = importlib.import_module("kserve.grpc_service_pb2")
        pb2_grpc = importlib.import_module("kserve.grpc_service_pb2_grpc")

    result = {}
    with grpc.insecure_channel(args.target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb2.ModelInferRequest(
            model_name=args.model,
            id=args.id,
            inputs=[
                pb2.ModelInferRequest.InferInputTensor(
                    name="input0",
                    datatype="FP32",
                    shape=[2],
                    contents=pb2.InferTensorContents(fp32_contents=[1.5, -2.0]),
                )
            ],
        )
        response, call = stub.ModelInfer.with_call(request, timeout=20)
        result["model_name"] = response.model_name
        result["id"] = response.id
        result["outputs"] = [
            {
                "name": o.name,
                "datatype": o.datatype,
                "shape": list(o.shape),
                "fp32": list(o.contents.fp32_contents),
            }
            for o in response.outputs
        ]
        result["upstream"] = dict(call.initial_metadata()).get("x-upstream")
        result["code"] = call.code().name

        try:
            stub.ModelInfer(pb2.ModelInferRequest(model_name=args.unrouted_model), timeout=20)
            result["unrouted"] = {"code": "OK"}
        except grpc.RpcError as error:
            result["unrouted"] = {"code": error.code().name, "details": error.details()}

    print(json.dumps(result))


if __name__ == "__main__":
    main()
