"""Checks the manifests `infermesh-control install` prints.

    k8s_manifests.py MANIFESTS EXAMPLES_DIR

1. Every object is valid, in strict mode (unknown fields refused), for
   Kubernetes 1.29 and every newer minor version `kubernetes-validate`
   bundles.
2. Each CRD's openAPIV3Schema accepts every document of its kind in
   EXAMPLES_DIR/*/*.yaml, and refuses broken documents.

Prints `versions: 1.29.0 ...`, `examples: N` and `broken: N refused`; exits
1 with the reasons when something fails.
"""

import copy
import glob
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

OLDEST = (1, 29)


def versions():
    base = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
    found = set()
    for name in os.listdir(base):
        m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", name)
        if m and (int(m[1]), int(m[2])) >= OLDEST:
            found.add((int(m[1]), int(m[2]), int(m[3])))
    return [f"{a}.{b}.{c}" for a, b, c in sorted(found)]


def as_json_schema(node):
    """The OpenAPI schema as JSON Schema: `nullable` allows null."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    return out


def main():
    manifests, examples = sys.argv[1], sys.argv[2]
    with open(manifests) as f:
        objects = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    tested = versions()
    if not tested or tested[0].rsplit(".", 1)[0] != "1.29":
        problems.append(f"kubernetes-validate bundles no 1.29 schema: {tested}")
    for version in tested:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as e:  # every failure is reported, not just the first
                name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
                problems.append(f"{version} {name}: {str(e).splitlines()[0]}")
    print("versions:", " ".join(tested))

    crds = {
        o["spec"]["names"]["kind"]: as_json_schema(o["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        for o in objects
        if o["kind"] == "CustomResourceDefinition"
    }
    checked = 0
    for path in sorted(glob.glob(os.path.join(examples, "*", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                schema = crds.get(doc.get("kind"))
                if schema is None:
                    problems.append(f"{path}: no CRD for kind {doc.get('kind')}")
                    continue
                errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
                for e in errors:
                    problems.append(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
                checked += 1
    print("examples:", checked)
    if checked == 0:
        problems.append(f"no example documents under {examples}")

    base = {
        "apiVersion": "infermesh.io/v1alpha1",
        "metadata": {"name": "broken"},
    }
    broken = [
        ("Backend", {"endpoints": ["10.0.0.1:80"], "protocol": "http9"}),
        ("Backend", {"endpoints": "10.0.0.1:80"}),
        ("Backend", {"endpoints": ["10.0.0.1:80"], "connectTimeout": "soon"}),
        ("ModelRoute", {"match": {"model": {"exact": "a", "prefix": "b"}}, "backends": [{"backend": "x"}]}),
        ("ModelRoute", {"listener": "sideways", "backends": [{"backend": "x"}]}),
        ("LocalModel", {}),
        ("MeshConfig", {"mtls": {"mode": "sometimes"}}),
        ("AuthorizationPolicy", {"rules": [{"action": "maybe"}]}),
    ]
    refused = 0
    for kind, spec in broken:
        doc = dict(copy.deepcopy(base), kind=kind, spec=spec)
        if list(jsonschema.Draft7Validator(crds[kind]).iter_errors(doc)):
            refused += 1
        else:
            problems.append(f"the {kind} CRD accepts a broken spec: {spec}")
    print(f"broken: {refused} refused")

    for p in problems:
        print("problem:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
