"""Drives KServe v2 through the proxy with Triton's own clients,
`tritonclient.http` and `tritonclient.grpc`, and prints what they saw as JSON.

Against `--served` (a proxy whose KServe health and non-resnet traffic goes to
a local model): server liveness and readiness, model readiness for the local
model's name and for another name, inference to the remote fixtures
(`--model`) and to the local model. Against `--bare` (a proxy with no route
for `--unrouted`): what each client reports for a model no route takes. A
client that fails to decode the proxy's answer shows up as the exception it
raised (a `TypeError`, say), never as a crash of this script.

Usage: kserve_tritonclient.py --served HOST:PORT --bare HOST:PORT
           --model NAME --local NAME --other NAME --unrouted NAME
"""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def attempt(call):
    """Runs `call`; returns {"ok": value} or what the exception said."""
    try:
        return {"ok": call()}
    except InferenceServerException as error:
        outcome = {"exception": type(error).__name__}
        try:
            outcome["message"] = error.message()
            outcome["status"] = error.status()
            outcome["text"] = str(error)
        except Exception as broken:  # the exception itself cannot be shown
            outcome["broken"] = f"{type(broken).__name__}: {broken}"
        return outcome
    except Exception as other:
        return {"exception": type(other).__name__, "text": repr(other)}


def http_fixture_infer(client, model):
    data = httpclient.InferInput("input0", [2], "FP32")
    data.set_data_from_numpy(np.array([1.5, -2.0], dtype=np.float32), binary_data=False)
    wanted = httpclient.InferRequestedOutput("output0", binary_data=False)
    result = client.infer(model, [data], outputs=[wanted], request_id="http-1")
    response = result.get_response()
    return {
        "model_name": response["model_name"],
        "id": response.get("id"),
        "output0": result.as_numpy("output0").tolist(),
    }


def grpc_fixture_infer(client, model):
    data = grpcclient.InferInput("input0", [2], "FP32")
    data.set_data_from_numpy(np.array([1.5, -2.0], dtype=np.float32))
    result = client.infer(model, [data], request_id="grpc-1")
    response = result.get_response()
    output = response.outputs[0]
    return {
        "model_name": response.model_name,
        "id": response.id,
        "datatype": output.datatype,
        "fp32": list(output.contents.fp32_contents),
    }


def http_local_infer(client, model):
    texts = np.array(["I love machine learning!"], dtype=object)
    data = httpclient.InferInput("text", [1], "BYTES")
    data.set_data_from_numpy(texts, binary_data=False)
    wanted = httpclient.InferRequestedOutput("embedding", binary_data=False)
    result = client.infer(model, [data], outputs=[wanted])
    return {"shape": list(result.as_numpy("embedding").shape)}


def grpc_local_infer(client, model):
    data = grpcclient.InferInput("text", [1], "BYTES")
    data.set_data_from_numpy(np.array([b"I love machine learning!"], dtype=object))
    result = client.infer(model, [data])
    return {"shape": list(result.as_numpy("embedding").shape)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--served", required=True)
    parser.add_argument("--bare", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--local", required=True)
    parser.add_argument("--other", required=True)
    parser.add_argument("--unrouted", required=True)
    args = parser.parse_args()

    http = httpclient.InferenceServerClient(args.served, network_timeout=30.0)
    grpc = grpcclient.InferenceServerClient(args.served)
    result = {"http": {}, "grpc": {}}
    for name, client in [("http", http), ("grpc", grpc)]:
        seen = result[name]
        seen["server_live"] = attempt(client.is_server_live)
        seen["server_ready"] = attempt(client.is_server_ready)
        seen["local_ready"] = attempt(lambda: client.is_model_ready(args.local))
        seen["other_ready"] = attempt(lambda: client.is_model_ready(args.other))
    result["http"]["infer"] = attempt(lambda: http_fixture_infer(http, args.model))
    result["grpc"]["infer"] = attempt(lambda: grpc_fixture_infer(grpc, args.model))
    result["http"]["local_infer"] = attempt(lambda: http_local_infer(http, args.local))
    result["grpc"]["local_infer"] = attempt(lambda: grpc_local_infer(grpc, args.local))
    result["grpc"]["other_infer"] = attempt(lambda: grpc_local_infer(grpc, args.other))
    result["http"]["other_infer"] = attempt(lambda: http_local_infer(http, args.other))

    bare_http = httpclient.InferenceServerClient(args.bare, network_timeout=30.0)
    bare_grpc = grpcclient.InferenceServerClient(args.bare)
    result["http"]["unrouted_infer"] = attempt(
        lambda: http_fixture_infer(bare_http, args.unrouted)
    )
    result["http"]["unrouted_metadata"] = attempt(
        lambda: bare_http.get_model_metadata(args.unrouted)
    )
    result["grpc"]["unrouted_infer"] = attempt(
        lambda: grpc_fixture_infer(bare_grpc, args.unrouted)
    )
    result["grpc"]["unrouted_metadata"] = attempt(
        lambda: str(bare_grpc.get_model_metadata(args.unrouted))
    )
    for client in (http, bare_http, grpc, bare_grpc):
        client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
