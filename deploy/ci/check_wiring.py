"""Cross-file checks of deploy/ that no schema validator sees.

Usage: check_wiring.py EXAMPLE_RENDERED.yaml PRE129_RENDERED.yaml
(the outputs of `kubectl kustomize deploy/examples/legacy-app` and of
`kubectl kustomize deploy/examples/legacy-app-pre-1.29`). Run from the
repository root.

Checks that the example's config in the ConfigMap names the files the
component mounts, that secrets arrive only as files of a directory mount (no
subPath, no env), that the probes follow docs/deployment.md, that the
PodMonitor scrapes the port and pod label the component sets, and that the
PrometheusRule wraps exactly deploy/prometheus/rules.yaml. Prints one line per
problem; exit 1 if any.
"""

import sys
import tomllib

import yaml

CONFIG_PATH = "/etc/token-sidecar/config.toml"
ADMIN_PORT_NAME = "sidecar-admin"
SECRET_DIR = "/etc/token-sidecar/secrets"
SECRET_KEYS = {"client_secret": "client_secret_file", "password": "password_file"}

problems = []


def expect(ok, message):
    if not ok:
        problems.append(message)


def load_all(path):
    with open(path) as f:
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(f) if d}


def pod_spec(objects):
    return objects[("Deployment", "legacy-app")]["spec"]["template"]["spec"]


def check_base(objects):
    config = tomllib.loads(objects[("ConfigMap", "token-sidecar-config")]["data"]["config.toml"])
    oauth = config.get("oauth", {})
    for key, file_key in SECRET_KEYS.items():
        expect(key not in oauth, f"config.toml: oauth.{key} is inline; use oauth.{file_key}")
        expect(oauth.get(file_key) == f"{SECRET_DIR}/{key}",
               f"config.toml: oauth.{file_key} must be {SECRET_DIR}/{key}")
    listen = config.get("proxy", {}).get("listen", [])
    for addr in [listen] if isinstance(listen, str) else listen:
        expect(addr.startswith(("127.0.0.1:", "[::1]:")), f"config.toml: proxy.listen {addr} is not loopback")
    admin_port = int(config.get("admin", {}).get("listen", ":0").rsplit(":", 1)[1])
    expect(config.get("shutdown", {}).get("drain_delay") == "0s",
           "config.toml: shutdown.drain_delay must be 0s for a native sidecar")

    secret = objects[("Secret", "token-sidecar-credentials")]
    expect(set(secret.get("stringData", {})) == set(SECRET_KEYS),
           f"example secret.yaml: stringData keys must be {sorted(SECRET_KEYS)}")

    spec = pod_spec(objects)
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "token-sidecar"]
    expect(len(sidecars) == 1, "component: token-sidecar must be an initContainers entry")
    if not sidecars:
        return
    sidecar = sidecars[0]
    expect(sidecar.get("restartPolicy") == "Always", "component: token-sidecar needs restartPolicy: Always")
    expect(sidecar.get("args") == ["--config", CONFIG_PATH], f"component: token-sidecar args must be --config {CONFIG_PATH}")
    ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports", [])}
    expect(ports.get(ADMIN_PORT_NAME) == admin_port,
           f"component: port '{ADMIN_PORT_NAME}' must be admin.listen's port {admin_port}")
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = sidecar.get(probe, {}).get("httpGet", {})
        expect(get.get("path") == path and get.get("port") == ADMIN_PORT_NAME,
               f"component: {probe} must GET {path} on port {ADMIN_PORT_NAME}")
    expect("readinessProbe" not in sidecar, "component: no token-based readinessProbe by default (docs/deployment.md)")
    template = objects[("Deployment", "legacy-app")]["spec"]["template"]["metadata"]
    expect(not any(k.startswith("prometheus.io/") for k in template.get("annotations", {})),
           "component: no prometheus.io/* annotations (they would collide with the app's own)")
    with open("deploy/kubernetes/monitoring/podmonitor.yaml") as f:
        podmonitor = yaml.safe_load(f)
    wanted = podmonitor["spec"]["selector"]["matchLabels"]
    expect(all(template.get("labels", {}).get(k) == v for k, v in wanted.items()),
           f"podmonitor.yaml selects {wanted}, which the component does not put on the pod")
    expect([e.get("port") for e in podmonitor["spec"]["podMetricsEndpoints"]] == [ADMIN_PORT_NAME],
           f"podmonitor.yaml must scrape port {ADMIN_PORT_NAME}")

    # Where each file lands: mountPath + projected item path.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    landed = {}
    for container in spec.get("initContainers", []) + spec["containers"]:
        for env in container.get("env", []):
            expect("secretKeyRef" not in env.get("valueFrom", {}), f"{container['name']}: secret in env {env['name']}")
        expect("envFrom" not in container, f"{container['name']}: envFrom is not allowed (secrets come from files)")
        for mount in container.get("volumeMounts", []):
            expect("subPath" not in mount and "subPathExpr" not in mount,
                   f"{container['name']}: subPath mount {mount['mountPath']} never sees updates")
            if container is not sidecar:
                continue
            volume = volumes[mount["name"]]
            for source in volume.get("projected", {}).get("sources", []):
                for kind in ("configMap", "secret"):
                    if kind in source:
                        for item in source[kind].get("items", []):
                            landed[f"{mount['mountPath']}/{item['path']}"] = (kind, source[kind]["name"], item["key"])
            if "secret" in volume:
                for key in SECRET_KEYS:
                    landed[f"{mount['mountPath']}/{key}"] = ("secret", volume["secret"]["secretName"], key)
            if "configMap" in volume:
                landed[f"{mount['mountPath']}/config.toml"] = ("configMap", volume["configMap"]["name"], "config.toml")
    expect(landed.get(CONFIG_PATH) == ("configMap", "token-sidecar-config", "config.toml"),
           f"component: {CONFIG_PATH} is not the ConfigMap's config.toml")
    for key in SECRET_KEYS:
        expect(landed.get(f"{SECRET_DIR}/{key}") == ("secret", "token-sidecar-credentials", key),
               f"component: {SECRET_DIR}/{key} is not the Secret's {key}")


def check_pre129(objects):
    spec = pod_spec(objects)
    expect(all(c["name"] != "token-sidecar" for c in spec.get("initContainers", [])),
           "pre-1.29: token-sidecar must not be an init container")
    sidecar = next((c for c in spec["containers"] if c["name"] == "token-sidecar"), None)
    expect(sidecar is not None, "pre-1.29: token-sidecar must be a plain container")
    if sidecar:
        expect("restartPolicy" not in sidecar, "pre-1.29: restartPolicy is only valid on init containers")
        env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
        expect(env.get("TOKEN_SIDECAR_SHUTDOWN__DRAIN_DELAY", "0s") != "0s", "pre-1.29: shutdown.drain_delay must be set")


def check_rules():
    with open("deploy/prometheus/rules.yaml") as f:
        rules = yaml.safe_load(f)
    with open("deploy/kubernetes/monitoring/prometheusrule.yaml") as f:
        wrapped = yaml.safe_load(f)
    expect(wrapped["spec"]["groups"] == rules["groups"],
           "monitoring/prometheusrule.yaml: spec.groups differs from deploy/prometheus/rules.yaml")


def main():
    check_base(load_all(sys.argv[1]))
    check_pre129(load_all(sys.argv[2]))
    check_rules()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
