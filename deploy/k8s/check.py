#!/usr/bin/env python3
"""Checks dlrflow's deployment files offline; run by check.sh (which brings
the Python packages) and by tests/e2e/deploy.rs.

- Every manifest of deploy/k8s/base, of the rendered production overlay
  (rendered here with the overlay's own rules: namespace, images and
  strategic-merge patches; compared with `kubectl kustomize` where kubectl
  is installed) and deploy/k8s/secret.example.yaml validates against the
  Kubernetes JSON schemas of K8S_VERSION, strictly (an unknown field is an
  error), with the schemas the `kubernetes-validate` package ships.
- docker-compose.yml validates against the Compose Specification's JSON
  Schema (`compose_spec.json`, shipped by the `docker-compose` 1.29.2
  package).
- The invariants the manifests promise in their comments: the state's
  replicas are at most the raw topic's partitions, each state pod's
  kafka.instance_id is its own name, every secretKeyRef names a key of the
  example Secret, every probe is on the admin listener's port, every
  service that uses PostgreSQL uses the same schema; and what only the
  cluster would find: selectors that select no pod, a Service's named
  targetPort its pods lack, an autoscaler's missing target.

With --env-out FILE it writes, for every container that runs a dlrflow
binary (in the base, the rendered overlay and docker-compose.yml), the
binary, its command and its DLRFLOW_… environment with every secretKeyRef
replaced by the example Secret's value and every fieldRef by a plausible
value, plus its termination grace and preStop pause: tests/e2e/deploy.rs
starts each binary's `config` with exactly that environment.

Exits 1 naming every problem found.
"""

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.30"
OVERLAYS = ["production"]
BINARIES = ("dlrflow-ingest", "dlrflow-state", "dlrflow-reconcile")
# Strategic-merge keys of the lists the overlays patch (the Kubernetes API's
# `x-kubernetes-patch-merge-key`); every other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
# What a fieldRef gives a pod (the state's first pod, for the StatefulSet).
FIELD_SAMPLES = {"metadata.name": "dlrflow-state-0", "metadata.namespace": "dlrflow"}

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kn(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------------
# Kustomize: the subset the overlays use
# ---------------------------------------------------------------------------


def kustomization(directory):
    path = os.path.join(directory, "kustomization.yaml")
    docs = load_docs(path)
    if len(docs) != 1 or docs[0].get("kind") != "Kustomization":
        problem(path, "must hold one Kustomization")
        return {}
    k = docs[0]
    allowed = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
    for key in k:
        if key not in allowed:
            problem(path, f"`{key}` is not rendered by check.py; use only {sorted(allowed)}")
    return k


def build(directory):
    """The documents of a kustomization, in the order listed."""
    k = kustomization(directory)
    docs = []
    for res in k.get("resources", []):
        target = os.path.normpath(os.path.join(directory, res))
        if os.path.isdir(target):
            docs.extend(build(target))
        else:
            docs.extend((target, d) for d in load_docs(target))
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            problem(directory, f"patch {p}: only `path` patches (by the patch's kind and name)")
            continue
        ppath = os.path.join(directory, p["path"])
        for patch in load_docs(ppath):
            matches = [i for i, (_, d) in enumerate(docs) if kn(d) == kn(patch)]
            if len(matches) != 1:
                problem(ppath, f"patches {kn(patch)}, found {len(matches)} times in the resources")
                continue
            src, doc = docs[matches[0]]
            docs[matches[0]] = (src, merge(doc, patch))
    for image in k.get("images", []):
        used = False
        for _, doc in docs:
            for c in containers(doc):
                name = c.get("image", "").split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    used = True
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
        if not used:
            problem(directory, f"image `{image['name']}` is used by no container")
    if "namespace" in k:
        for _, doc in docs:
            doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def merge(base, patch):
    """A strategic merge patch of dicts and of the lists in MERGE_KEYS."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            # As kustomize orders them: the patch's items (merged into the
            # base's item of the same key, if any), then the base's others.
            mk = MERGE_KEYS[key]
            keys = [item.get(mk) for item in value]
            merged = []
            for item in value:
                old = next((o for o in out[key] if o.get(mk) == item.get(mk)), None)
                merged.append(merge(old, item) if old is not None else copy.deepcopy(item))
            out[key] = merged + [o for o in out[key] if o.get(mk) not in keys]
        else:
            out[key] = copy.deepcopy(value)
    return out


def kubectl_render(directory):
    """`kubectl kustomize` of directory, or None without kubectl."""
    if shutil.which("kubectl") is None:
        return None
    out = subprocess.run(
        ["kubectl", "kustomize", directory], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        problem(directory, f"kubectl kustomize failed: {out.stderr.strip()}")
        return None
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


# ---------------------------------------------------------------------------
# Pods
# ---------------------------------------------------------------------------


def pod_spec(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job"):
        return doc.get("spec", {}).get("template", {}).get("spec", {})
    return None


def containers(doc):
    spec = pod_spec(doc)
    if spec is None:
        return []
    return spec.get("initContainers", []) + spec.get("containers", [])


def binary_of(c):
    argv = (c.get("command") or []) + (c.get("args") or [])
    if argv and argv[0] in BINARIES:
        return argv
    return None


def env_value(where, e, secrets):
    if "value" in e:
        return str(e["value"])
    ref = e.get("valueFrom", {})
    if "secretKeyRef" in ref:
        s = ref["secretKeyRef"]
        if s.get("name") != "dlrflow" or s.get("key") not in secrets:
            problem(where, f"{e['name']}: secret {s.get('name')}/{s.get('key')} is not in secret.example.yaml")
            return None
        return secrets[s["key"]]
    if "fieldRef" in ref:
        path = ref["fieldRef"].get("fieldPath")
        if path not in FIELD_SAMPLES:
            problem(where, f"{e['name']}: no sample value for fieldRef {path}")
            return None
        return FIELD_SAMPLES[path]
    problem(where, f"{e['name']}: neither a value, a secretKeyRef nor a fieldRef")
    return None


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def check_pods(label, docs, secrets, partitions, out):
    """The invariants of each pod of `docs` (one rendering) and the
    environment of each dlrflow container into `out`."""
    schemas = {}
    for src, doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        where = f"{label} {kn(doc)}"
        for c in containers(doc):
            cwhere = f"{where} container {c.get('name')}"
            argv = binary_of(c)
            if argv is None:
                continue
            env = {}
            for e in c.get("env", []):
                v = env_value(cwhere, e, secrets)
                if v is not None:
                    env[e["name"]] = v
            if c.get("envFrom"):
                problem(cwhere, "envFrom hides which variables a container gets; list each in `env`")
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            admin = env.get("DLRFLOW_HTTP__ADMIN_LISTEN")
            probes = [k for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c]
            if doc["kind"] != "Job":
                if set(probes) != {"startupProbe", "livenessProbe", "readinessProbe"}:
                    problem(cwhere, f"has {probes}; a service needs startup, liveness and readiness probes")
                if admin is None:
                    problem(cwhere, "sets no DLRFLOW_HTTP__ADMIN_LISTEN (the default, 127.0.0.1, is out of the probes' reach)")
                for k in probes:
                    get = c[k].get("httpGet", {})
                    port = get.get("port")
                    port = ports.get(port, port)
                    if admin is not None and port != port_of(admin):
                        problem(cwhere, f"{k} is on port {port}, the admin listener on {port_of(admin)}")
                    want = "/readyz" if k == "readinessProbe" else "/healthz"
                    if get.get("path") != want:
                        problem(cwhere, f"{k} asks {get.get('path')}, not {want}")
            if "DLRFLOW_POSTGRES__URL" in env:
                schemas[cwhere] = env.get("DLRFLOW_POSTGRES__SCHEMA")
            if doc["kind"] == "StatefulSet" and argv[0] == "dlrflow-state":
                ref = next((e for e in c.get("env", []) if e["name"] == "DLRFLOW_KAFKA__INSTANCE_ID"), None)
                if ref is None or ref.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                    problem(cwhere, "DLRFLOW_KAFKA__INSTANCE_ID must come from the pod's metadata.name")
                replicas = doc["spec"].get("replicas", 1)
                if partitions is None:
                    problem(where, "no PARTITIONS in the topics Job to compare the replicas with")
                elif replicas > partitions:
                    problem(where, f"{replicas} replicas, more than the raw topic's {partitions} partitions")
            prestop = (
                c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command") or []
            )
            pause = int(prestop[1]) if prestop[:1] == ["sleep"] and len(prestop) == 2 else 0
            if prestop and not pause:
                problem(cwhere, f"preStop {prestop}: only `sleep N` is understood by the grace check")
            out.append(
                {
                    "origin": f"{src} ({label}) {kn(doc)} container {c.get('name')}",
                    "kind": doc["kind"],
                    "argv": argv,
                    "env": env,
                    "termination_grace_secs": spec.get("terminationGracePeriodSeconds", 30),
                    "prestop_secs": pause,
                }
            )
    if len(set(schemas.values())) > 1:
        problem(label, f"the services use different PostgreSQL schemas: {schemas}")


def check_selectors(label, docs):
    """What the API server or the controllers would only find at run time:
    a workload's selector that misses its own pods, a Service, a
    PodDisruptionBudget or a NetworkPolicy that selects no pod, an
    autoscaler whose target does not exist."""
    pods = []
    for _, doc in docs:
        if pod_spec(doc) is not None:
            labels = doc["spec"]["template"].get("metadata", {}).get("labels", {})
            names = {p.get("name") for c in containers(doc) for p in c.get("ports", [])}
            pods.append((labels, names))
            sel = doc["spec"].get("selector", {}).get("matchLabels")
            if doc["kind"] != "Job" and not (sel and sel.items() <= labels.items()):
                problem(f"{label} {kn(doc)}", f"selector {sel} does not match its pods' labels {labels}")
    for _, doc in docs:
        spec = doc.get("spec", {})
        sel = None
        if doc["kind"] == "Service":
            sel = spec.get("selector")
        elif doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = (spec.get("selector") or spec.get("podSelector") or {}).get("matchLabels")
        elif doc["kind"] == "HorizontalPodAutoscaler":
            ref = spec["scaleTargetRef"]
            if not any(kn(d) == f"{ref['kind']}/{ref['name']}" for _, d in docs):
                problem(f"{label} {kn(doc)}", f"scales {ref['kind']}/{ref['name']}, which is not there")
            continue
        else:
            continue
        selected = [names for labels, names in pods if sel and sel.items() <= labels.items()]
        if not selected:
            problem(f"{label} {kn(doc)}", f"selector {sel} selects no pod")
        for port in spec.get("ports", []) if doc["kind"] == "Service" else []:
            target = port.get("targetPort")
            if isinstance(target, str) and not all(target in names for names in selected):
                problem(f"{label} {kn(doc)}", f"targetPort {target!r} is not a port of its pods")


def topics_partitions(docs):
    for _, doc in docs:
        if kn(doc) == "Job/dlrflow-topics":
            for c in containers(doc):
                for e in c.get("env", []):
                    if e["name"] == "PARTITIONS":
                        return int(e["value"])
    return None


def validate_k8s(label, docs):
    for src, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(f"{src} ({label}) {kn(doc)}", f"{path}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, KeyError, TypeError):
            problem(
                f"{src} ({label}) {kn(doc)}",
                f"no Kubernetes {K8S_VERSION} schema for kind {doc.get('kind')!r} of {doc.get('apiVersion')!r}",
            )


# ---------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------


def compose_schema():
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the docker-compose package (compose_spec.json) is not installed: run check.sh")
    path = os.path.join(list(spec.submodule_search_locations)[0], "config", "compose_spec.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def compose_secs(duration):
    """Whole seconds of a Compose duration such as `25s` or `1m30s`."""
    secs, number = 0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for ch in str(duration):
        if ch.isdigit():
            number += ch
        elif ch in units and number:
            secs, number = secs + int(number) * units[ch], ""
        else:
            raise ValueError(f"duration {duration!r}: use whole h, m and s")
    if number:
        raise ValueError(f"duration {duration!r}: a number without a unit")
    return secs


def check_compose(path, out):
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    schema = compose_schema()
    # The file says draft 2019-09 (with a trailing `#` jsonschema does not
    # recognise): use that draft explicitly.
    validator = jsonschema.Draft201909Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        problem(path, f"{'.'.join(str(p) for p in e.path)}: {e.message}")
    schemas = {}
    for name, svc in (doc.get("services") or {}).items():
        argv = svc.get("command")
        if isinstance(argv, str):
            argv = argv.split()
        if not argv or argv[0] not in BINARIES:
            continue
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for k, v in env.items():
            if "$" in str(v).replace("$$", ""):
                problem(f"{path} {name}", f"{k} uses $ interpolation, which the check cannot resolve")
        # `$$` is a literal `$`.
        env = {k: str(v).replace("$$", "$") for k, v in env.items()}
        if "DLRFLOW_POSTGRES__URL" in env:
            schemas[name] = env.get("DLRFLOW_POSTGRES__SCHEMA")
        out.append(
            {
                "origin": f"{path} service {name}",
                "kind": "compose",
                "argv": argv,
                "env": env,
                "termination_grace_secs": compose_secs(svc.get("stop_grace_period", "10s")),
                "prestop_secs": 0,
            }
        )
    if len(set(schemas.values())) > 1:
        problem(path, f"the services use different PostgreSQL schemas: {schemas}")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    ap.add_argument("--env-out", help="write the dlrflow containers' environments here (JSON)")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    k8s = os.path.join(root, "deploy", "k8s")
    os.chdir(root)

    secret_path = os.path.relpath(os.path.join(k8s, "secret.example.yaml"))
    secret_docs = [(secret_path, d) for d in load_docs(secret_path)]
    validate_k8s("example", secret_docs)
    secrets = {}
    for _, d in secret_docs:
        if kn(d) == "Secret/dlrflow":
            secrets = {k: str(v) for k, v in (d.get("stringData") or {}).items()}
    if not secrets:
        problem(secret_path, "holds no Secret/dlrflow with stringData")

    envs = []
    counted = {}
    base_dir = os.path.relpath(os.path.join(k8s, "base"))
    base = build(base_dir)
    renderings = [("base", base)]
    for overlay in OVERLAYS:
        d = os.path.relpath(os.path.join(k8s, "overlays", overlay))
        ours = build(d)
        theirs = kubectl_render(d)
        if theirs is not None:
            mine = {kn(doc): doc for _, doc in ours}
            real = {kn(doc): doc for doc in theirs}
            if mine != real:
                diff = sorted(k for k in set(mine) | set(real) if mine.get(k) != real.get(k))
                problem(d, f"check.py's rendering differs from `kubectl kustomize` in {diff}")
            else:
                print(f"{d}: rendering equals `kubectl kustomize`'s")
        renderings.append((f"overlay {overlay}", ours))
    for label, docs in renderings:
        validate_k8s(label, docs)
        for _, doc in docs:
            counted[doc.get("kind")] = counted.get(doc.get("kind"), 0) + 1
        check_pods(label, docs, secrets, topics_partitions(docs), envs)
        check_selectors(label, docs)
    check_compose("docker-compose.yml", envs)

    if args.env_out:
        with open(args.env_out, "w", encoding="utf-8") as f:
            json.dump(envs, f, indent=2)
    for p in problems:
        print(f"PROBLEM {p}")
    if problems:
        print(f"{len(problems)} problem(s)")
        sys.exit(1)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counted.items()))
    print(f"valid against Kubernetes {K8S_VERSION} (strict): {kinds}, 1 Secret (example)")
    print(f"valid against the Compose Specification: docker-compose.yml")
    print(f"{len(envs)} dlrflow containers")


if __name__ == "__main__":
    main()
