//! The DaemonSet as `kubectl kustomize install/` renders it, turned into what the kubelet would
//! run: one `podman run` per container with exactly the rendered command, environment
//! (envFrom, configMapKeyRef, the downward API, service links, `$(VAR)` expansion),
//! capabilities, read-only root, memory limit and hostPath mounts, plus the probes' targets.
//! Read from the rendered YAML, so a manifest change is what the tests run.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::HarnessError;
use crate::cmd::output_of;

/// podman on this machine cannot raise the open-file limit to the 1048576 it asks for root's
/// containers (the hard limit is lower): pass one it can, and a process limit as the kubelet's
/// runtime would leave it.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=32768:32768",
];

/// Every object `kubectl kustomize DIR` renders, as JSON.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub objects: Vec<Value>,
}

impl Rendered {
    /// Renders with the real kustomize (`kubectl kustomize`; `KUBECTL` overrides the binary)
    /// and converts the YAML stream with python3's yaml module.
    pub fn kustomize(dir: &Path) -> Result<Self, HarnessError> {
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let yaml = output_of(Command::new(&kubectl).arg("kustomize").arg(dir))?;
        let mut py = Command::new("python3");
        py.args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let json = pipe_through(py, yaml.as_bytes())?;
        let objects = serde_json::from_slice(&json)
            .map_err(|e| HarnessError::Other(format!("rendered JSON: {e}")))?;
        Ok(Self { objects })
    }

    /// The object of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> Result<&Value, HarnessError> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .ok_or_else(|| HarnessError::Other(format!("{kind}/{name} not rendered")))
    }

    /// The only object of `kind`.
    pub fn only(&self, kind: &str) -> Result<&Value, HarnessError> {
        let mut of_kind = self.objects.iter().filter(|o| o["kind"] == kind);
        match (of_kind.next(), of_kind.next()) {
            (Some(o), None) => Ok(o),
            _ => Err(HarnessError::Other(format!(
                "expected exactly one {kind} rendered"
            ))),
        }
    }

    /// A container of the DaemonSet's pod template.
    pub fn container<'a>(
        &'a self,
        daemonset: &'a Value,
        name: &str,
    ) -> Result<ContainerSpec<'a>, HarnessError> {
        let pod = &daemonset["spec"]["template"]["spec"];
        let c = pod["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .ok_or_else(|| HarnessError::Other(format!("no container {name} in the DaemonSet")))?;
        Ok(ContainerSpec {
            c,
            pod,
            rendered: self,
        })
    }
}

fn pipe_through(mut cmd: Command, input: &[u8]) -> Result<Vec<u8>, HarnessError> {
    use std::io::Write;
    let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
        command: "python3".into(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| HarnessError::Io("python3 stdin".into(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| HarnessError::Io("python3".into(), e))?;
    if !out.status.success() {
        return Err(HarnessError::CommandFailed {
            command: "python3 yaml->json (python3-yaml)".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout: String::new(),
        });
    }
    Ok(out.stdout)
}

/// What the kubelet knows about the node and the namespace's Services.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_name: String,
    pub host_ip: IpAddr,
    /// Service-link variables (`KUBE_DNS_SERVICE_HOST`, ...), lowest precedence.
    pub service_env: Vec<(String, String)>,
}

/// How one rendered container runs.
#[derive(Debug, Clone, Copy)]
pub struct ContainerSpec<'a> {
    pub c: &'a Value,
    pod: &'a Value,
    rendered: &'a Rendered,
}

/// A hostPath volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    pub host_path: String,
    pub mount_path: String,
    /// `DirectoryOrCreate`, `FileOrCreate`, ... (empty: none).
    pub kind: String,
    pub read_only: bool,
}

impl ContainerSpec<'_> {
    pub fn name(&self) -> &str {
        self.c["name"].as_str().unwrap_or_default()
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The environment in the kubelet's order: service links, then envFrom, then env, with
    /// `$(VAR)` in env values expanded from what is defined before.
    pub fn env(&self, facts: &NodeFacts) -> Result<BTreeMap<String, String>, HarnessError> {
        let mut env: BTreeMap<String, String> = facts.service_env.iter().cloned().collect();
        for from in self.c["envFrom"].as_array().into_iter().flatten() {
            let name = from["configMapRef"]["name"]
                .as_str()
                .ok_or_else(|| HarnessError::Other(format!("envFrom {from} unsupported")))?;
            let cm = self.rendered.get("ConfigMap", name)?;
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
        }
        for var in self.c["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_string();
            let value = match var.get("value") {
                Some(v) => expand(v.as_str().unwrap_or_default(), &env),
                None => self.value_from(&var["valueFrom"], facts)?,
            };
            env.insert(name, value);
        }
        Ok(env)
    }

    fn value_from(&self, from: &Value, facts: &NodeFacts) -> Result<String, HarnessError> {
        if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            return match path {
                "status.hostIP" => Ok(facts.host_ip.to_string()),
                "spec.nodeName" => Ok(facts.node_name.clone()),
                _ => Err(HarnessError::Other(format!("fieldRef {path} unsupported"))),
            };
        }
        if let Some(key) = from["configMapKeyRef"]["key"].as_str() {
            let name = from["configMapKeyRef"]["name"].as_str().unwrap_or_default();
            let cm = self.rendered.get("ConfigMap", name)?;
            return cm["data"][key]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| HarnessError::Other(format!("ConfigMap {name} has no {key}")));
        }
        Err(HarnessError::Other(format!("valueFrom {from} unsupported")))
    }

    /// hostPath volumes this container mounts.
    pub fn host_mounts(&self) -> Result<Vec<HostMount>, HarnessError> {
        let volumes = self.pod["volumes"].as_array().cloned().unwrap_or_default();
        self.c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let name = &m["name"];
                let vol = volumes
                    .iter()
                    .find(|v| &v["name"] == name)
                    .ok_or_else(|| HarnessError::Other(format!("volume {name} not defined")))?;
                let host = &vol["hostPath"];
                Ok(HostMount {
                    host_path: host["path"]
                        .as_str()
                        .ok_or_else(|| {
                            HarnessError::Other(format!("volume {name} is not hostPath"))
                        })?
                        .to_string(),
                    mount_path: m["mountPath"].as_str().unwrap_or_default().to_string(),
                    kind: host["type"].as_str().unwrap_or_default().to_string(),
                    read_only: m["readOnly"] == true,
                })
            })
            .collect()
    }

    /// `podman run` arguments (after `run`) for this container as container `name` of a
    /// hostNetwork pod, the image and its arguments last.
    pub fn podman_run_args(
        &self,
        name: &str,
        facts: &NodeFacts,
    ) -> Result<Vec<String>, HarnessError> {
        let mut a: Vec<String> = ["-d", "--name", name, "--network", "host"]
            .map(String::from)
            .to_vec();
        a.extend(ULIMITS.map(String::from));
        a.extend(self.security_args());
        if let Some(limit) = self.c["resources"]["limits"]["memory"].as_str() {
            let bytes = parse_quantity(limit)?;
            // No swap, as on a kubelet's node.
            a.extend([
                "--memory".into(),
                bytes.to_string(),
                "--memory-swap".into(),
                bytes.to_string(),
            ]);
        }
        for m in self.host_mounts()? {
            let ro = if m.read_only { ":ro" } else { "" };
            a.extend(["-v".into(), format!("{}:{}{ro}", m.host_path, m.mount_path)]);
        }
        for (k, v) in self.env(facts)? {
            a.extend(["-e".into(), format!("{k}={v}")]);
        }
        let command = Self::strings(&self.c["command"]);
        if !command.is_empty() {
            let json = serde_json::to_string(&command)
                .map_err(|e| HarnessError::Other(format!("command: {e}")))?;
            a.extend(["--entrypoint".into(), json]);
        }
        a.push(self.image()?.to_string());
        a.extend(Self::strings(&self.c["args"]));
        Ok(a)
    }

    pub fn image(&self) -> Result<&str, HarnessError> {
        self.c["image"]
            .as_str()
            .ok_or_else(|| HarnessError::Other(format!("container {} has no image", self.name())))
    }

    /// runAsUser, capabilities, readOnlyRootFilesystem and allowPrivilegeEscalation.
    fn security_args(&self) -> Vec<String> {
        let sc = &self.c["securityContext"];
        let mut a = Vec::new();
        if let Some(uid) = sc["runAsUser"].as_u64() {
            a.extend(["--user".into(), uid.to_string()]);
        }
        for cap in Self::strings(&sc["capabilities"]["drop"]) {
            a.extend(["--cap-drop".into(), cap.to_lowercase()]);
        }
        for cap in Self::strings(&sc["capabilities"]["add"]) {
            a.extend(["--cap-add".into(), cap]);
        }
        if sc["readOnlyRootFilesystem"] == true {
            // The kubelet mounts no tmpfs on /tmp or /run for a read-only root.
            a.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        if sc["allowPrivilegeEscalation"] == false {
            a.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        a
    }

    /// A declared port's number by name.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.c["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
    }

    /// Every declared (port, protocol).
    pub fn declared_ports(&self) -> Vec<(u16, String)> {
        self.c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                Some((port, proto))
            })
            .collect()
    }

    /// An httpGet probe's target (`livenessProbe`, `readinessProbe`): address and path. The
    /// host defaults to the pod IP, which for a hostNetwork pod is the node IP.
    pub fn http_probe(
        &self,
        probe: &str,
        facts: &NodeFacts,
    ) -> Result<(SocketAddr, String), HarnessError> {
        let get = &self.c[probe]["httpGet"];
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
            Value::String(s) => self.port(s),
            _ => None,
        }
        .ok_or_else(|| HarnessError::Other(format!("{probe}: no httpGet port")))?;
        let host = match get["host"].as_str() {
            Some(h) => h
                .parse()
                .map_err(|_| HarnessError::Other(format!("{probe}: host {h}")))?,
            None => facts.host_ip,
        };
        let path = get["path"].as_str().unwrap_or("/").to_string();
        Ok((SocketAddr::new(host, port), path))
    }

    /// An exec probe's command.
    pub fn exec_probe(&self, probe: &str) -> Option<Vec<String>> {
        let cmd = Self::strings(&self.c[probe]["exec"]["command"]);
        (!cmd.is_empty()).then_some(cmd)
    }
}

/// Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
/// undefined references stay as written.
pub fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|s| s.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A Kubernetes memory quantity (`128Mi`, `1Gi`, `500M`, `1048576`) in bytes.
pub fn parse_quantity(q: &str) -> Result<u64, HarnessError> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let bad = || HarnessError::Other(format!("memory quantity {q:?} unsupported"));
    let (digits, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|d| (d, *m)))
        .unwrap_or((q, 1));
    digits
        .parse::<u64>()
        .map_err(|_| bad())?
        .checked_mul(mult)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts() -> NodeFacts {
        NodeFacts {
            node_name: "node-a".into(),
            host_ip: "192.168.200.2".parse().unwrap(),
            service_env: vec![("KUBE_DNS_SERVICE_HOST".into(), "10.43.0.10".into())],
        }
    }

    fn rendered() -> Rendered {
        Rendered {
            objects: vec![
                json!({"kind": "ConfigMap", "metadata": {"name": "cm-abc"},
                       "data": {"A": "1", "KUBE_DNS_SERVICE_HOST": "from-cm"}}),
                json!({"kind": "DaemonSet", "metadata": {"name": "ds"}, "spec": {"template": {"spec": {
                    "volumes": [{"name": "lock", "hostPath": {"path": "/run/x.lock", "type": "FileOrCreate"}}],
                    "containers": [{
                        "name": "c", "image": "img:1", "command": ["bin", "sub"], "args": ["--x"],
                        "envFrom": [{"configMapRef": {"name": "cm-abc"}}],
                        "env": [
                            {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                            {"name": "LISTEN", "value": "$(NODE_IP):9355 $$(NODE_IP) $(NOPE)"},
                            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm-abc", "key": "A"}}}
                        ],
                        "ports": [{"name": "health", "containerPort": 9354}],
                        "readinessProbe": {"httpGet": {"host": "127.0.0.1", "port": "health", "path": "/ready"}},
                        "livenessProbe": {"httpGet": {"port": 9354, "path": "/health"}},
                        "resources": {"limits": {"memory": "128Mi"}},
                        "securityContext": {"runAsUser": 0, "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
                        "volumeMounts": [{"name": "lock", "mountPath": "/run/x.lock"}]
                    }]
                }}}}),
            ],
        }
    }

    #[test]
    fn env_follows_the_kubelet_s_order_and_expansion() {
        let r = rendered();
        let ds = r.get("DaemonSet", "ds").unwrap();
        let env = r.container(ds, "c").unwrap().env(&facts()).unwrap();
        assert_eq!(
            env["KUBE_DNS_SERVICE_HOST"], "from-cm",
            "envFrom beats service links"
        );
        assert_eq!(env["NODE_IP"], "192.168.200.2");
        assert_eq!(env["LISTEN"], "192.168.200.2:9355 $(NODE_IP) $(NOPE)");
        assert_eq!(env["B"], "1");
    }

    #[test]
    fn podman_args_carry_every_rendered_setting() {
        let r = rendered();
        let ds = r.get("DaemonSet", "ds").unwrap();
        let args = r
            .container(ds, "c")
            .unwrap()
            .podman_run_args("p-c", &facts())
            .unwrap()
            .join(" ");
        for part in [
            "--network host",
            "--user 0",
            "--cap-drop all --cap-add NET_ADMIN",
            "--read-only --read-only-tmpfs=false",
            "--security-opt no-new-privileges",
            "--memory 134217728 --memory-swap 134217728",
            "-v /run/x.lock:/run/x.lock",
            "-e LISTEN=192.168.200.2:9355",
            r#"--entrypoint ["bin","sub"] img:1 --x"#,
        ] {
            assert!(args.contains(part), "{part:?} missing from {args}");
        }
    }

    #[test]
    fn probes_resolve_named_ports_and_default_hosts() {
        let r = rendered();
        let ds = r.get("DaemonSet", "ds").unwrap();
        let c = r.container(ds, "c").unwrap();
        assert_eq!(
            c.http_probe("readinessProbe", &facts()).unwrap(),
            ("127.0.0.1:9354".parse().unwrap(), "/ready".into())
        );
        assert_eq!(
            c.http_probe("livenessProbe", &facts()).unwrap(),
            ("192.168.200.2:9354".parse().unwrap(), "/health".into())
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert_eq!(parse_quantity("4096").unwrap(), 4096);
        assert!(parse_quantity("12x").is_err());
    }
}
