"""Checks the token-sidecar kustomize components on a Deployment they did not come with.

Usage: check_component.py APP.yaml NATIVE.yaml PRE129.yaml SIDECAR_ONLY_PREFIX

APP.yaml is a sample rendered alone (`kubectl kustomize <sample>/app`),
NATIVE.yaml the same with deploy/kubernetes/components/token-sidecar and
PRE129.yaml with deploy/kubernetes/components/token-sidecar-pre-1.29. The
renders are compared as parsed objects (kustomize re-serialises), so:

- every object but the selected Deployments is identical, and so is every
  Deployment without the label token-sidecar/inject: "true";
- in each selected Deployment, removing the sidecar container, its volume and
  the one pod label it adds (token-sidecar/metrics) gives back the app's
  Deployment exactly: containers, init containers, volumes, labels,
  annotations and every pod-level field;
- the sidecar is there exactly once (an init container with
  restartPolicy: Always first among the init containers; in the pre-1.29
  render the first container, without restartPolicy, and no init container of
  its own), mounts only its own volume, and both renders carry the same
  container (apart from restartPolicy and the drain-delay variable) and the
  same volume.

It also writes, for checkov, SIDECAR_ONLY_PREFIX-<deployment>.yaml: a
Deployment holding only the sidecar container and its volume, so that checkov
judges the sidecar's container and not the sample app's (see
deploy/README.md, "Checks"). Prints one line per problem; exit 1 if any.
"""

import copy
import sys

import yaml

SIDECAR = "token-sidecar"
VOLUME = "token-sidecar"
INJECT = ("token-sidecar/inject", "true")
METRICS_LABEL = ("token-sidecar/metrics", "true")
DRAIN_ENV = "TOKEN_SIDECAR_SHUTDOWN__DRAIN_DELAY"

problems = []


def expect(ok, message):
    if not ok:
        problems.append(message)


def load(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def selected(obj):
    labels = obj["metadata"].get("labels") or {}
    return obj["kind"] == "Deployment" and labels.get(INJECT[0]) == INJECT[1]


def without_sidecar(deployment, variant, where):
    """The Deployment with the sidecar, its volume and its pod label taken out;
    and the sidecar container and volume (None when missing)."""
    d = copy.deepcopy(deployment)
    template = d["spec"]["template"]
    spec = template["spec"]
    in_init = [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR]
    in_main = [c for c in spec.get("containers", []) if c["name"] == SIDECAR]
    if variant == "native":
        expect(len(in_init) == 1 and not in_main,
               f"{where}: {SIDECAR} must be exactly one init container "
               f"(found {len(in_init)} init, {len(in_main)} plain)")
        expect(bool(spec.get("initContainers")) and spec["initContainers"][0]["name"] == SIDECAR,
               f"{where}: {SIDECAR} must be the first init container")
    else:
        expect(len(in_main) == 1 and not in_init,
               f"{where}: {SIDECAR} must be exactly one container "
               f"(found {len(in_main)} plain, {len(in_init)} init)")
        expect(spec["containers"][0]["name"] == SIDECAR, f"{where}: {SIDECAR} must be the first container")
    sidecar = (in_init or in_main or [None])[0]
    for key in ("initContainers", "containers"):
        if key in spec:
            spec[key] = [c for c in spec[key] if c["name"] != SIDECAR]
            if not spec[key] and key == "initContainers":
                del spec[key]
    volumes = [v for v in spec.get("volumes", []) if v["name"] == VOLUME]
    expect(len(volumes) == 1, f"{where}: volume {VOLUME} must be there exactly once (found {len(volumes)})")
    if "volumes" in spec:
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != VOLUME]
        if not spec["volumes"]:
            del spec["volumes"]
    labels = template["metadata"].get("labels") or {}
    expect(labels.get(METRICS_LABEL[0]) == METRICS_LABEL[1],
           f"{where}: pod label {METRICS_LABEL[0]}: \"{METRICS_LABEL[1]}\" (the PodMonitor's) is missing")
    labels.pop(METRICS_LABEL[0], None)
    return d, sidecar, (volumes or [None])[0]


def check_sidecar(sidecar, volume, pod_spec, where):
    if sidecar is None:
        return
    sc = sidecar.get("securityContext", {})
    for key, want in (("runAsNonRoot", True), ("runAsUser", 65532), ("readOnlyRootFilesystem", True),
                      ("allowPrivilegeEscalation", False)):
        expect(sc.get(key) == want, f"{where}: sidecar securityContext.{key} must be {want}")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: sidecar must drop all capabilities")
    mounts = sidecar.get("volumeMounts", [])
    expect([m["name"] for m in mounts] == [VOLUME], f"{where}: the sidecar must mount only its own volume")
    expect(all(m.get("readOnly") for m in mounts), f"{where}: the sidecar's mount must be read-only")
    expect("readinessProbe" not in sidecar, f"{where}: no token-based readinessProbe (docs/deployment.md)")
    # Without a pod-level fsGroup the sidecar's user must still read its files.
    if volume is not None:
        mode = volume.get("projected", {}).get("defaultMode")
        expect(mode is not None and mode & 0o004, f"{where}: the sidecar's files must be world-readable "
                                                   f"(defaultMode {mode!r}): the pod's fsGroup is the app's")
    # Nobody else mounts the sidecar's secrets.
    for c in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
        if c["name"] != SIDECAR:
            expect(all(m["name"] != VOLUME for m in c.get("volumeMounts", [])),
                   f"{where}: container {c['name']} mounts the sidecar's volume")


def sidecar_only(deployment, sidecar, volume):
    """A Deployment holding only the sidecar (as a plain container) and its volume."""
    container = copy.deepcopy(sidecar)
    container.pop("restartPolicy", None)
    name = deployment["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-sidecar-only", "namespace": "sidecar-only"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container], "volumes": [copy.deepcopy(volume)]},
            },
        },
    }


def comparable(container):
    c = copy.deepcopy(container)
    c.pop("restartPolicy", None)
    c["env"] = [e for e in c.get("env", []) if e["name"] != DRAIN_ENV]
    if not c["env"]:
        del c["env"]
    return c


def main():
    app_path, native_path, pre129_path, out_prefix = sys.argv[1:5]
    app = load(app_path)
    renders = {"native": load(native_path), "pre-1.29": load(pre129_path)}
    expect(any(selected(o) for o in app.values()), f"{app_path}: no Deployment labelled {INJECT[0]}={INJECT[1]}")
    sidecars = {}
    for variant, render in renders.items():
        expect(set(render) == set(app), f"{variant}: objects differ: {sorted(set(render) ^ set(app))}")
        for key, original in app.items():
            if key not in render:
                continue
            obj = render[key]
            where = f"{variant} {key[0]}/{key[1]}"
            if not selected(original):
                expect(obj == original, f"{where}: changed, but it is not selected")
                continue
            stripped, sidecar, volume = without_sidecar(obj, variant, where)
            if stripped != original:
                for part in ("metadata", "spec"):
                    a, b = original.get(part), stripped.get(part)
                    if part == "spec":
                        a, b = copy.deepcopy(a), copy.deepcopy(b)
                        ta, tb = a.pop("template"), b.pop("template")
                        expect(a == b, f"{where}: Deployment spec changed outside the pod template")
                        expect(ta.get("metadata") == tb.get("metadata"),
                               f"{where}: pod labels or annotations changed: {ta.get('metadata')} -> {tb.get('metadata')}")
                        for field in sorted(set(ta["spec"]) | set(tb["spec"])):
                            expect(ta["spec"].get(field) == tb["spec"].get(field),
                                   f"{where}: the app's pod spec field {field} changed")
                    else:
                        expect(a == b, f"{where}: Deployment metadata changed")
            check_sidecar(sidecar, volume, obj["spec"]["template"]["spec"], where)
            sidecars.setdefault(key, {})[variant] = (sidecar, volume)
            if variant == "native" and sidecar is not None and volume is not None:
                out = f"{out_prefix}-{key[1]}.yaml"
                with open(out, "w") as f:
                    yaml.safe_dump(sidecar_only(obj, sidecar, volume), f, sort_keys=False)
    for key, by_variant in sidecars.items():
        (n_c, n_v), (p_c, p_v) = by_variant.get("native", (None, None)), by_variant.get("pre-1.29", (None, None))
        if n_c and p_c:
            expect(comparable(n_c) == comparable(p_c),
                   f"{key[1]}: the two components' sidecar containers differ beyond restartPolicy and {DRAIN_ENV}")
            expect(n_c.get("restartPolicy") == "Always", f"{key[1]}: the native sidecar needs restartPolicy: Always")
            expect(any(e["name"] == DRAIN_ENV for e in p_c.get("env", [])),
                   f"{key[1]}: the pre-1.29 sidecar needs {DRAIN_ENV} (app and sidecar are signalled together)")
        expect(n_v == p_v, f"{key[1]}: the two components' volumes differ")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
