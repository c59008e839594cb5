"""Check KubeRay custom resources offline against the real CRD schemas.

`kubectl --dry-run=client` needs an API server, so instead we read the CRD files
(`deployments/k8s/crds/`, KubeRay v1.7.0, see SOURCE.md there) and turn the `v1` OpenAPI v3 schema into
JSON Schema the way the API server reads it: `nullable` allows null,
`x-kubernetes-int-or-string` allows both, a field with a default is not required
(defaulting runs before validation), and an object that lists `properties` rejects
unknown fields unless it preserves them (what `kubectl apply --validate=strict` does).
CEL rules (`x-kubernetes-validations`) and list-map keys are not checked.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft7Validator

# The schemas travel with the package; SHARDSERVE_KUBERAY_CRDS (or `k8s check --crds`) points elsewhere.
CRD_DIR = Path(os.environ.get("SHARDSERVE_KUBERAY_CRDS", Path(__file__).resolve().parent / "crds"))
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
API_VERSION = "ray.io/v1"


class ManifestError(ValueError):
    """A manifest the API server or the KubeRay operator would refuse; one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}:\n  " + "\n  ".join(problems))


def openapi_to_jsonschema(node: dict) -> dict:
    """A JSON Schema equivalent of one structural OpenAPI v3 schema node (recursively)."""
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "format", "default"):
            continue  # handled below, or not checkable here (CEL rules, list types)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)  # the CRD spells it anyOf [integer, string]; one type list is clearer
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = types + ["null"]
    if "required" in out:
        props = node.get("properties", {})
        required = [name for name in out["required"] if "default" not in props.get(name, {})]
        if required:
            out["required"] = required
        else:
            del out["required"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


def use_crd_dir(path: str | Path) -> None:
    """Check against the CRD files in `path` from now on."""
    global CRD_DIR
    CRD_DIR = Path(path)
    crd_validator.cache_clear()


@cache
def crd_validator(kind: str) -> Draft7Validator:
    """The validator for one kind, built once per process (each CRD file is about 1 MB)."""
    if kind not in CRD_FILES:
        raise ValueError(f"no CRD for kind {kind!r}; known: {', '.join(CRD_FILES)}")
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"KubeRay CRD {path} is missing: pass --crds DIR (or set SHARDSERVE_KUBERAY_CRDS) to a directory "
            f"holding {CRD_FILES[kind]}, e.g. ray-operator/config/crd/bases of a KubeRay checkout"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{path} defines {crd['spec']['names']['kind']}, not {kind}")
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    if not versions:
        raise ValueError(f"{path} has no v1 version")
    schema = openapi_to_jsonschema(versions[0]["schema"]["openAPIV3Schema"])
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_errors(obj: dict) -> list[str]:
    """Every way `obj` breaks its CRD schema, as 'field.path: message' lines (empty when valid)."""
    if not isinstance(obj, dict):
        return ["(top level): expected a mapping"]
    if obj.get("apiVersion") != API_VERSION:
        return [f"apiVersion: expected {API_VERSION!r}, got {obj.get('apiVersion')!r}"]
    validator = crd_validator(obj.get("kind"))
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]
