//! The config of the example app (deploy/examples/legacy-app/base/configmap.yaml)
//! must pass `token-sidecar check` with the Secret's keys laid out as files the
//! way the kustomize component mounts them, so the manifests cannot drift from
//! the code.

use std::path::Path;
use std::process::Command;

/// The lines of the `key: |` block scalar under `data:`/`stringData:`, de-indented.
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no `{key}: |` block"));
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key: value` pairs under `stringData:`.
fn string_data(yaml: &str) -> Vec<(String, String)> {
    yaml.lines()
        .skip_while(|l| l.trim() != "stringData:")
        .skip(1)
        .take_while(|l| l.starts_with("  ") || l.trim().is_empty())
        .filter(|l| !l.trim().starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn shipped_configmap_passes_check_with_the_secret_mounted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("deploy/examples/legacy-app/base");
    let cm = std::fs::read_to_string(example.join("configmap.yaml")).unwrap();
    let secret = std::fs::read_to_string(example.join("secret.yaml")).unwrap();
    let deployment = std::fs::read_to_string(
        root.join("deploy/kubernetes/components/token-sidecar/sidecar.yaml"),
    )
    .unwrap();
    assert!(
        deployment.contains("mountPath: /etc/token-sidecar\n"),
        "the component mounts config and secrets under /etc/token-sidecar"
    );
    let mounts_with_subpath = deployment
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.contains("subPath"));
    assert!(
        !mounts_with_subpath,
        "a subPath mount never sees Secret rotation"
    );

    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let keys = string_data(&secret);
    assert!(
        keys.iter().any(|(k, _)| k == "client_secret") && keys.iter().any(|(k, _)| k == "password")
    );
    for (k, v) in &keys {
        // kubelet writes the value as the file's content, here with the newline `echo` adds.
        std::fs::write(secrets.join(k), format!("{v}\n")).unwrap();
    }
    let toml = block(&cm, "config.toml").replace(
        "/etc/token-sidecar/secrets/",
        &format!("{}/", secrets.display()),
    );
    assert!(toml.contains("client_secret_file") && toml.contains("password_file"));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .args(["check", "--config"])
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "check failed: {text}");
    assert!(text.contains("configuration is valid"), "{text}");
    for (_, v) in &keys {
        assert!(
            !text.contains(v.as_str()),
            "check printed a secret value: {text}"
        );
    }
}
