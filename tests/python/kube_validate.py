"""Validates Kubernetes YAML files with kubernetes-validate in strict mode
against every Kubernetes version the package knows from 1.29 (the first
with native sidecars) on. Prints `checked 1.29 ... 1.37` and exits 0 when
every resource of every file is valid; prints each failure and exits 1
otherwise."""

import sys

import kubernetes_validate.utils as kv

FIRST = (1, 29)


def versions():
    seen = []
    for version in kv.all_versions():
        major, minor = (int(part) for part in version.split(".")[:2])
        if (major, minor) >= FIRST and version not in seen:
            seen.append(version)
    return seen


def flatten(resources):
    """A `List`'s items, validated one by one (there is no List schema)."""
    for resource in resources:
        if str(resource.get("kind", "")).endswith("List") and "items" in resource:
            yield from flatten(resource["items"])
        else:
            yield resource


def main(files):
    checked = versions()
    failures = 0
    for version in checked:
        for name in files:
            for resource in flatten(kv.resources_from_file(name)):
                try:
                    kv.validate(resource, version, strict=True)
                except Exception as error:  # ValidationError, or an unknown kind
                    failures += 1
                    print(f"{name}: {kv.kn(resource)} against {version}: {error}")
    print("checked " + " ".join(v.rsplit(".", 1)[0] for v in checked))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
