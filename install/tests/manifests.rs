//! install/ manifests: rendered without a cluster and validated against the Kubernetes OpenAPI
//! schemas (PyPI `kubernetes-validate`, offline) by tests/validate_manifests.py; then the
//! rendered objects are checked for what a deployment requires, and the installer container's
//! command and environment are run for real against temp dirs.
//! Needs: python3 with `pip install kubernetes-validate` (brings jsonschema) and PyYAML.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the validator on a kustomization dir: (success, rendered objects, stderr).
fn validate(dir: &Path) -> (bool, Vec<Value>, String) {
    let out = Command::new("python3")
        .arg(install_dir().join("tests/validate_manifests.py"))
        .arg(dir)
        .output()
        .expect("python3 must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let objects = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.success(), objects, stderr)
}

fn rendered() -> Vec<Value> {
    let (ok, objects, stderr) = validate(&install_dir());
    assert!(
        ok,
        "manifests do not validate (needs `pip install kubernetes-validate`):\n{stderr}"
    );
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let objects = rendered();
    let kinds: Vec<(&str, &str)> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("DaemonSet", "node-local-dns"),
        ("ConfigMap", "node-local-dns"),
        ("ServiceAccount", "node-local-dns"),
        ("PodMonitor", "node-local-dns"),
        ("PrometheusRule", "node-local-dns"),
    ] {
        assert!(
            kinds.contains(&expected),
            "{expected:?} missing from {kinds:?}"
        );
    }
    for o in &objects {
        assert_eq!(
            o["metadata"]["namespace"], "kube-system",
            "{}",
            o["metadata"]["name"]
        );
    }
    assert!(
        !kinds.contains(&("Service", "kube-dns")),
        "the local-config kube-dns stub must never be applied"
    );
}

#[test]
fn validator_rejects_unknown_fields_wrong_types_and_bad_crd_fields() {
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "daemonset.yaml",
            "hostNetwork: true",
            "hostNetwrk: true",
            "hostNetwrk",
        ),
        (
            "daemonset.yaml",
            "containerPort: 9253",
            "containerPort: metrics-port",
            "containerPort",
        ),
        (
            "monitoring/podmonitor.yaml",
            "targetLabel: node",
            "targetLabels: node",
            "targetLabels",
        ),
    ];
    for (file, from, to, must_name) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&install_dir(), dir.path());
        let path = dir.path().join(file);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(from),
            "{file} no longer contains {from:?}; update this test"
        );
        fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let (ok, _, stderr) = validate(dir.path());
        assert!(!ok, "{file}: {to:?} was accepted");
        assert!(
            stderr.contains(must_name),
            "{file}: error does not name {must_name}: {stderr}"
        );
    }
}

#[test]
fn kube_dns_svc_ip_is_replaced_from_the_kube_dns_service() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&install_dir(), dir.path());
    let stub = dir.path().join("kube-dns-service.yaml");
    let text = fs::read_to_string(&stub).unwrap();
    fs::write(
        &stub,
        text.replace("clusterIP: 10.96.0.10", "clusterIP: 10.43.0.10"),
    )
    .unwrap();
    let (ok, objects, stderr) = validate(dir.path());
    assert!(ok, "{stderr}");
    let cm = find(&objects, "ConfigMap", "node-local-dns");
    assert_eq!(cm["data"]["KUBE_DNS_SVC_IP"], "10.43.0.10");
}

#[test]
fn daemonset_has_every_field_a_deployment_requires() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", "node-local-dns");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "Default");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists"}]),
        "tolerate every taint"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );

    let resolver = container(ds, "resolver");
    let sc = &resolver["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"])
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(resolver["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(resolver["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(
        resolver["resources"]["requests"],
        json!({"cpu": "30m", "memory": "32Mi"})
    );
    assert!(resolver["resources"]["limits"]["memory"].is_string());
    assert!(mounts(resolver).contains(&"/run/xtables.lock".to_string()));
    assert!(mounts(resolver).contains(&"/run/node-local-dns".to_string()));
    assert!(
        resolver["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "metrics")
    );

    let installer = container(ds, "installer");
    assert_eq!(installer["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        installer["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );

    // KUBE_DNS_SVC_IP reaches both containers from the ConfigMap.
    for c in [resolver, installer] {
        assert_eq!(
            c["envFrom"],
            json!([{"configMapRef": {"name": "node-local-dns"}}]),
            "{}",
            c["name"]
        );
    }
    let cm = find(&objects, "ConfigMap", "node-local-dns");
    assert_eq!(cm["data"]["KUBE_DNS_SVC_IP"], "10.96.0.10");

    // Probes point where the resolver is told to serve health.
    let health = cm["data"]["NODE_LOCAL_DNS_HEALTH_LISTEN"].as_str().unwrap();
    let probe = &resolver["livenessProbe"]["httpGet"];
    assert_eq!(
        health,
        format!("{}:{}", probe["host"].as_str().unwrap(), probe["port"])
    );
}

#[test]
fn pod_monitor_scrapes_the_port_the_daemonset_names() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", "node-local-dns");
    let pm = find(&objects, "PodMonitor", "node-local-dns");
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ports = container(ds, "resolver")["ports"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        ports.iter().any(|p| p["name"] == port),
        "{port} not in {ports:?}"
    );
    let selector = &pm["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][k], v);
    }
}

#[test]
fn every_configmap_setting_is_a_variable_some_binary_reads() {
    let objects = rendered();
    let cm = find(&objects, "ConfigMap", "node-local-dns");
    // The programs' own flags, and the settings they share (node flags, ClusterIP sources).
    let mut files = vec![
        install_dir().join("src/main.rs"),
        install_dir().join("../resolver-daemon/src/config.rs"),
    ];
    for entry in fs::read_dir(install_dir().join("../settings/src")).unwrap() {
        files.push(entry.unwrap().path());
    }
    let sources = files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    for key in cm["data"].as_object().unwrap().keys() {
        assert!(
            sources.contains(&format!("\"{key}\"")),
            "ConfigMap key {key} is read by neither the installer nor the resolver"
        );
    }
}

/// The installer container's exact command and ConfigMap environment, run for real with its
/// host paths moved under a temp dir.
#[test]
fn installer_container_command_and_env_work_with_the_real_binary() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", "node-local-dns");
    let cm = find(&objects, "ConfigMap", "node-local-dns");
    let installer_spec = container(ds, "installer");
    let command: Vec<String> = installer_spec["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "node-local-dns-install");

    let node = Node::new();
    let host = node.root.path().join("host");
    for mount in mounts(installer_spec) {
        fs::create_dir_all(host.join(mount.trim_start_matches("/host/"))).unwrap();
    }
    let conf_dir = host.join("etc/cni/net.d");
    let conf = conf_dir.join("10-flannel.conflist");
    fs::copy(
        examples_dir().join("flannel.without-node-local-dns.conflist"),
        &conf,
    )
    .unwrap();

    let env: BTreeMap<String, String> = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let args = command[1..]
        .iter()
        .map(|a| a.replace("=/host/", &format!("={}/", host.display())));
    let out = installer()
        .args(args)
        .envs(&env)
        .env("NODE_LOCAL_DNS_PLUGIN_BINARY", &node.plugin)
        .env("NODE_LOCAL_DNS_INSTALL_ONCE", "true")
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        fs::read(&conf).unwrap(),
        fs::read(examples_dir().join("flannel.conflist")).unwrap()
    );
    assert!(answers_version(&host.join("opt/cni/bin/node-local-dns")));

    // The container's readiness probe, run the same way, now passes.
    let probe: Vec<String> = installer_spec["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("installer readiness probe")
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap()
                .replace("=/host/", &format!("={}/", host.display()))
        })
        .collect();
    assert_eq!(probe[..2], ["node-local-dns-install", "check"]);
    let ready = installer()
        .args(&probe[1..])
        .envs(&env)
        .env("NODE_LOCAL_DNS_PLUGIN_BINARY", &node.plugin)
        .output()
        .unwrap();
    assert_ok(&ready);
}

#[test]
fn dockerfile_builds_what_the_daemonset_runs() {
    let dockerfile = fs::read_to_string(install_dir().join("Dockerfile")).unwrap();
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", "node-local-dns");
    for c in ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        let binary = c["command"][0].as_str().unwrap();
        assert!(
            dockerfile.contains(&format!("/usr/local/bin/{binary}"))
                || dockerfile.contains(&format!("release/{binary} /usr/local/bin/")),
            "Dockerfile does not install {binary}"
        );
    }
    assert!(
        dockerfile.contains("/usr/local/lib/node-local-dns/node-local-dns"),
        "default --plugin-binary"
    );
    assert!(dockerfile.contains("install -y --no-install-recommends iptables"));
}

fn mounts(c: &Value) -> Vec<String> {
    c["volumeMounts"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["mountPath"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == "src" {
            continue;
        }
        let dest = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir_all(&dest).unwrap();
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}
