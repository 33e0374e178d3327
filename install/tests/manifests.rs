//! install/ manifests: rendered by the real `kubectl kustomize` (no cluster needed) and
//! validated against the Kubernetes OpenAPI schemas (PyPI `kubernetes-validate`, offline) by
//! tests/validate_manifests.py; then the rendered objects are checked for what an install
//! requires, and the installer container's command and environment are run for real against
//! temp dirs.
//! Needs: kubectl (`KUBECTL` overrides), python3 with `pip install kubernetes-validate` (brings
//! jsonschema) and PyYAML.

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

/// Name of every object of ours (the ConfigMap's carries kustomize's content hash after it).
const NAME: &str = "node-local-dns-cache";

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

/// The generated ConfigMap: `NAME-<hash>`.
fn config_map(objects: &[Value]) -> &Value {
    let prefix = format!("{NAME}-");
    objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("ConfigMap {prefix}<hash> not rendered"))
}

/// The number a container's named port stands for.
fn port_number(c: &Value, name: &Value) -> u64 {
    if let Some(n) = name.as_u64() {
        return n;
    }
    c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| &p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("port {name} not declared in {}", c["name"]))
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
    config_map(&objects);
    for expected in [
        ("DaemonSet", NAME),
        ("ServiceAccount", NAME),
        ("PodMonitor", NAME),
        ("PrometheusRule", NAME),
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
        "the real kube-dns Service must never be touched"
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
            "containerPort: 9355",
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

/// Nothing to edit per cluster: the binaries take the kube-dns ClusterIP from the service-link
/// variable KUBE_DNS_SERVICE_HOST, so no ClusterIP (or any other cluster's literal) is rendered.
#[test]
fn no_cluster_specific_literal_is_rendered() {
    let objects = rendered();
    let cm = config_map(&objects);
    assert!(
        cm["data"].get("KUBE_DNS_SVC_IP").is_none(),
        "KUBE_DNS_SVC_IP would override KUBE_DNS_SERVICE_HOST: {}",
        cm["data"]
    );
    let ds = find(&objects, "DaemonSet", NAME);
    assert_ne!(
        ds["spec"]["template"]["spec"]["enableServiceLinks"], false,
        "KUBE_DNS_SERVICE_HOST comes from service links"
    );
    let text = serde_json::to_string(&objects).unwrap();
    // The kube-dns ClusterIP of kubeadm, k3s, EKS and GKE-style clusters.
    for literal in ["10.96.0.10", "10.43.0.10", "172.20.0.10", "10.100.0.10"] {
        assert!(!text.contains(literal), "{literal:?} rendered");
    }
    assert!(
        !install_dir().join("kube-dns-service.yaml").exists(),
        "a file to hand-edit is back"
    );
}

/// A settings change makes a new ConfigMap name, which changes the pod template: the
/// DaemonSet rolls by itself, and old pods keep the ConfigMap they started with.
#[test]
fn a_configmap_change_rolls_the_daemonset() {
    let before = rendered();
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&install_dir(), dir.path());
    let env = dir.path().join("config.env");
    let text = fs::read_to_string(&env).unwrap();
    let from = "NODE_LOCAL_DNS_CACHE_DENIAL_CAPACITY=65536";
    assert!(text.contains(from), "config.env no longer has {from}");
    fs::write(
        &env,
        text.replace(from, "NODE_LOCAL_DNS_CACHE_DENIAL_CAPACITY=1000"),
    )
    .unwrap();
    let (ok, after, stderr) = validate(dir.path());
    assert!(ok, "{stderr}");

    let (old, new) = (config_map(&before), config_map(&after));
    assert_eq!(new["data"]["NODE_LOCAL_DNS_CACHE_DENIAL_CAPACITY"], "1000");
    assert_ne!(old["metadata"]["name"], new["metadata"]["name"]);
    for (objects, cm) in [(&before, old), (&after, new)] {
        let ds = find(objects, "DaemonSet", NAME);
        for c in ["resolver", "installer"] {
            assert_eq!(
                container(ds, c)["envFrom"],
                json!([{"configMapRef": {"name": cm["metadata"]["name"]}}]),
                "{c} reads the generated ConfigMap"
            );
        }
    }
}

/// The NodeLocal DNSCache addon's objects, label and metrics port: applying ours on a cluster
/// that runs it must create only new objects and select only our pods.
#[test]
fn nothing_collides_with_the_nodelocal_dnscache_addon() {
    let objects = rendered();
    const ADDON_NAMES: [&str; 2] = ["node-local-dns", "kube-dns-upstream"];
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        assert!(!ADDON_NAMES.contains(&name), "{} {name}", o["kind"]);
    }
    let text = serde_json::to_string(&objects).unwrap();
    assert!(
        !text.contains(r#""k8s-app":"node-local-dns""#),
        "the addon's label k8s-app=node-local-dns is used"
    );
    let ds = find(&objects, "DaemonSet", NAME);
    let svc = find(&objects, "Service", &format!("{NAME}-metrics"));
    let ports = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| p["containerPort"].clone())
        .chain(
            svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].clone()),
        );
    // The addon's ports: its CoreDNS's metrics (9253) and health (8080), node-cache's own
    // metrics (9353).
    const ADDON_PORTS: [u16; 3] = [9253, 9353, 8080];
    for port in ports {
        assert!(
            !ADDON_PORTS.iter().any(|p| port == *p),
            "{port} is one of the addon's ports"
        );
    }
    let cm = config_map(&objects);
    for (key, value) in cm["data"].as_object().unwrap() {
        for p in ADDON_PORTS {
            assert!(
                !value.as_str().unwrap().ends_with(&format!(":{p}")),
                "{key} listens on the addon's port {p}"
            );
        }
    }
}

/// Every address the resolver is told to listen on has its port declared (53 on UDP and TCP,
/// metrics, health): in a hostNetwork pod those are host ports the scheduler accounts for.
/// tests/tests/daemonset_podman.rs checks the same against the sockets the container opens.
#[test]
fn every_listening_port_is_declared() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", NAME);
    let resolver = container(ds, "resolver");
    let declared: Vec<(u64, String)> = resolver["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            )
        })
        .collect();
    let cm = config_map(&objects);
    let metrics = resolver["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_LOCAL_DNS_METRICS_LISTEN")
        .expect("metrics listen address in env")["value"]
        .clone();
    let health = cm["data"]["NODE_LOCAL_DNS_HEALTH_LISTEN"].clone();
    let mut wanted = vec![(53, "UDP"), (53, "TCP")];
    for addr in [metrics, health] {
        let port = addr.as_str().unwrap().rsplit(':').next().unwrap();
        wanted.push((port.parse().unwrap(), "TCP"));
    }
    for (port, proto) in wanted {
        assert!(
            declared.contains(&(port, proto.to_string())),
            "{proto} {port} is not declared: {declared:?}"
        );
    }
}

#[test]
fn daemonset_has_every_required_field() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", NAME);
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

    // Both containers read the settings from the generated ConfigMap.
    let cm = config_map(&objects);
    for c in [resolver, installer] {
        assert_eq!(
            c["envFrom"],
            json!([{"configMapRef": {"name": cm["metadata"]["name"]}}]),
            "{}",
            c["name"]
        );
    }

    // Probes point where the resolver is told to serve health.
    let health = cm["data"]["NODE_LOCAL_DNS_HEALTH_LISTEN"].as_str().unwrap();
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &resolver[probe]["httpGet"];
        assert_eq!(
            health,
            format!(
                "{}:{}",
                get["host"].as_str().unwrap(),
                port_number(resolver, &get["port"])
            ),
            "{probe}"
        );
    }
}

#[test]
fn pod_monitor_scrapes_the_port_the_daemonset_names() {
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", NAME);
    let pm = find(&objects, "PodMonitor", NAME);
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
    let cm = config_map(&objects);
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
    let ds = find(&objects, "DaemonSet", NAME);
    let cm = config_map(&objects);
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

    let mut env: BTreeMap<String, String> = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    // What the kubelet injects for the kube-dns Service (service links). KUBE_DNS_SVC_IP
    // stands in for it until the installer reads KUBE_DNS_SERVICE_HOST itself.
    env.insert("KUBE_DNS_SERVICE_HOST".into(), "10.96.0.10".into());
    env.insert("KUBE_DNS_SVC_IP".into(), "10.96.0.10".into());
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

/// install/Dockerfile and install/build-image.sh share one binaries step, which installs
/// every binary the DaemonSet runs, and install the same runtime packages; build-image.sh tags
/// the image exactly as the DaemonSet names it.
#[test]
fn dockerfile_and_build_image_build_what_the_daemonset_runs() {
    let dockerfile = fs::read_to_string(install_dir().join("Dockerfile")).unwrap();
    let script = fs::read_to_string(install_dir().join("build-image.sh")).unwrap();
    let objects = rendered();
    let ds = find(&objects, "DaemonSet", NAME);
    assert!(dockerfile.contains("install/build-image.sh binaries \"$TARGETARCH\" /out"));
    let binaries = script
        .split("build_binaries() {")
        .nth(1)
        .expect("build_binaries in build-image.sh");
    for c in ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        let binary = c["command"][0].as_str().unwrap();
        assert!(
            binaries.contains(&format!("release/{binary}\"")),
            "build-image.sh does not install {binary}"
        );
    }
    assert!(
        binaries.contains("/usr/local/lib/node-local-dns/node-local-dns"),
        "default --plugin-binary"
    );

    let packages = script
        .lines()
        .find_map(|l| l.strip_prefix("RUNTIME_PACKAGES=\""))
        .and_then(|l| l.split('"').next())
        .expect("RUNTIME_PACKAGES in build-image.sh");
    let installed: Vec<&str> = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.split("install -y --no-install-recommends ").nth(1))
        .expect("the runtime stage's apt-get install in the Dockerfile")
        .split_whitespace()
        .take_while(|w| *w != "\\" && *w != "&&")
        .collect();
    assert_eq!(installed.join(" "), packages, "runtime packages differ");

    let tag = Command::new(install_dir().join("build-image.sh"))
        .arg("tag")
        .output()
        .unwrap();
    assert_ok(&tag);
    for c in ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        assert_eq!(
            c["image"].as_str().unwrap(),
            String::from_utf8_lossy(&tag.stdout).trim()
        );
    }
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
