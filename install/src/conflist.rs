//! Pure edits of one CNI config document, on `serde_json::Value` with `preserve_order` so that
//! every key we do not own keeps its value and its position.

use std::net::IpAddr;

use node_setup::{IptablesBackend, SocketMatch};
use serde_json::{Map, Value};

/// The `type` of our chained plugin entry; how we find it again in any conflist.
pub const PLUGIN_TYPE: &str = "node-local-dns";

/// Plugin types of meta-plugins whose own config file must be skipped: they delegate to the
/// primary CNI's file, which is the one to edit.
const DELEGATING_TYPES: &[&str] = &["multus", "multus-shim"];

/// Our desired entry, as data: the node settings the plugin applies on every ADD. They come
/// from the same `NODE_LOCAL_DNS_*` variables the resolver reads, so the plugin and the
/// resolver converge on the same interface and rules instead of undoing each other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub cluster_dns: Vec<IpAddr>,
    pub local_ips: Vec<IpAddr>,
    pub interface: String,
    pub backend: IptablesBackend,
    pub socket_match: SocketMatch,
}

impl PluginEntry {
    /// node-setup's defaults for everything but the addresses.
    pub fn new(cluster_dns: Vec<IpAddr>, local_ips: Vec<IpAddr>) -> Self {
        Self {
            cluster_dns,
            local_ips,
            interface: node_setup::DEFAULT_INTERFACE.to_string(),
            backend: IptablesBackend::default(),
            socket_match: SocketMatch::default(),
        }
    }

    /// Refuses what the plugin would refuse (code 7 on every pod ADD): an entry is only
    /// written if the plugin can use it.
    pub fn validate(&self) -> Result<(), node_setup::SetupError> {
        let mut node = node_setup::NodeConfig::new(self.cluster_dns.clone());
        node.interface = self.interface.clone();
        node.validate()
    }

    /// The keys we own in the entry, in the order they are written for a new entry.
    fn owned_fields(&self) -> [(&'static str, Value); 6] {
        [
            ("type", Value::from(PLUGIN_TYPE)),
            ("clusterDNS", ip_list(&self.cluster_dns)),
            ("localIPs", ip_list(&self.local_ips)),
            ("interface", Value::from(self.interface.as_str())),
            ("iptables", Value::from(self.backend.as_str())),
            ("socketMatch", Value::from(self.socket_match.as_str())),
        ]
    }

    pub fn to_value(&self) -> Value {
        Value::Object(
            self.owned_fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    /// Reads the ClusterIPs back from an installed entry (uninstall uses it for node teardown).
    pub fn cluster_dns_of(entry: &Value) -> Vec<IpAddr> {
        entry
            .get("clusterDNS")
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip.as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn ip_list(ips: &[IpAddr]) -> Value {
    Value::Array(ips.iter().map(|ip| Value::from(ip.to_string())).collect())
}

/// Why a document cannot be edited. Such a file is left exactly as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("top level is not a JSON object")]
    NotAnObject,
    #[error("`plugins` is missing or not an array of objects")]
    BadPlugins,
    #[error("a single-plugin config needs a string `type`")]
    NoType,
}

/// Whether the file is a `.conflist` (has `plugins`) or a single-plugin `.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    List,
    Single,
}

/// Classifies a parsed document, refusing shapes we would have to guess about.
pub fn shape_of(doc: &Value) -> Result<Shape, ShapeError> {
    let obj = doc.as_object().ok_or(ShapeError::NotAnObject)?;
    match obj.get("plugins") {
        Some(Value::Array(plugins)) if plugins.iter().all(Value::is_object) => Ok(Shape::List),
        Some(_) => Err(ShapeError::BadPlugins),
        None if obj.get("type").is_some_and(Value::is_string) => Ok(Shape::Single),
        None => Err(ShapeError::NoType),
    }
}

/// True for a meta-plugin's own file (multus), which the installer must not edit.
pub fn is_delegating(doc: &Value) -> bool {
    let is_delegating_type = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| DELEGATING_TYPES.contains(&t))
    };
    is_delegating_type(doc)
        || doc
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|plugins| plugins.iter().any(is_delegating_type))
}

/// Turns a single-plugin `.conf` document into the equivalent conflist the way libcni does
/// (`cniVersion` and `name` move to the top, the rest becomes the first plugin entry).
pub fn single_to_list(doc: &Value) -> Result<Value, ShapeError> {
    let mut plugin = doc.as_object().ok_or(ShapeError::NotAnObject)?.clone();
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = plugin.shift_remove(key) {
            list.insert(key.to_string(), v);
        }
    }
    list.insert(
        "plugins".to_string(),
        Value::Array(vec![Value::Object(plugin)]),
    );
    Ok(Value::Object(list))
}

/// Makes the conflist contain exactly one entry of ours with the desired fields. An existing
/// entry is updated in place (its position and any extra keys kept); otherwise the entry is
/// appended, so it runs after the primary plugin. Returns whether anything changed.
pub fn ensure_entry(doc: &mut Value, entry: &PluginEntry) -> Result<bool, ShapeError> {
    let plugins = plugins_mut(doc)?;
    let ours: Vec<usize> = our_positions(plugins);
    let Some(&first) = ours.first() else {
        plugins.push(entry.to_value());
        return Ok(true);
    };
    // Duplicates would run the plugin twice per ADD; keep only the first.
    let mut changed = ours.len() > 1;
    for &extra in ours[1..].iter().rev() {
        plugins.remove(extra);
    }
    let existing = plugins[first]
        .as_object_mut()
        .ok_or(ShapeError::BadPlugins)?;
    for (key, want) in entry.owned_fields() {
        if existing.get(key) != Some(&want) {
            existing.insert(key.to_string(), want);
            changed = true;
        }
    }
    Ok(changed)
}

/// Removes every entry of ours. Returns the removed entries.
pub fn remove_entries(doc: &mut Value) -> Result<Vec<Value>, ShapeError> {
    let plugins = plugins_mut(doc)?;
    let mut removed = Vec::new();
    for at in our_positions(plugins).into_iter().rev() {
        removed.insert(0, plugins.remove(at));
    }
    Ok(removed)
}

/// Our entry, if the document has one.
pub fn find_entry(doc: &Value) -> Option<&Value> {
    doc.get("plugins")?
        .as_array()?
        .iter()
        .find(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
}

/// The document's `cniVersion` (we never change it: an older runtime may reject a newer one).
pub fn cni_version(doc: &Value) -> Option<&str> {
    doc.get("cniVersion").and_then(Value::as_str)
}

/// The exact bytes the installer writes: two-space pretty JSON and a final newline.
pub fn render(doc: &Value) -> String {
    let mut text = serde_json::to_string_pretty(doc).unwrap_or_default();
    text.push('\n');
    text
}

fn plugins_mut(doc: &mut Value) -> Result<&mut Vec<Value>, ShapeError> {
    let obj = doc.as_object_mut().ok_or(ShapeError::NotAnObject)?;
    match obj.get_mut("plugins") {
        Some(Value::Array(plugins)) if plugins.iter().all(Value::is_object) => Ok(plugins),
        _ => Err(ShapeError::BadPlugins),
    }
}

fn our_positions(plugins: &[Value]) -> Vec<usize> {
    plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> PluginEntry {
        PluginEntry::new(
            vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            vec!["169.254.20.10".parse().unwrap()],
        )
    }

    fn bridge_list() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "name": "net",
            "zeta": {"unknown": true},
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ],
            "alpha": 1
        })
    }

    #[test]
    fn appends_entry_last_and_keeps_everything_else_in_order() {
        let mut doc = bridge_list();
        assert!(ensure_entry(&mut doc, &entry()).unwrap());
        let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["cniVersion", "name", "zeta", "plugins", "alpha"]);
        let plugins = doc["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0], bridge_list()["plugins"][0]);
        assert_eq!(plugins[2]["type"], "node-local-dns");
        assert_eq!(plugins[2]["clusterDNS"], json!(["10.96.0.10", "fd00::a"]));
        assert_eq!(plugins[2]["localIPs"], json!(["169.254.20.10"]));
        assert_eq!(doc["cniVersion"], "0.4.0");
    }

    #[test]
    fn second_ensure_changes_nothing() {
        let mut doc = bridge_list();
        ensure_entry(&mut doc, &entry()).unwrap();
        let once = doc.clone();
        assert!(!ensure_entry(&mut doc, &entry()).unwrap());
        assert_eq!(render(&doc), render(&once));
    }

    #[test]
    fn existing_entry_is_updated_in_place_keeping_its_extra_keys() {
        let mut doc = bridge_list();
        let plugins = doc["plugins"].as_array_mut().unwrap();
        plugins.insert(
            1,
            json!({"type": "node-local-dns", "clusterDNS": ["10.0.0.10"], "custom": "x"}),
        );
        assert!(ensure_entry(&mut doc, &entry()).unwrap());
        let plugins = doc["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[1]["clusterDNS"], json!(["10.96.0.10", "fd00::a"]));
        assert_eq!(plugins[1]["custom"], "x");
        assert_eq!(plugins[2]["type"], "portmap");
    }

    #[test]
    fn duplicate_entries_collapse_to_the_first() {
        let mut doc = bridge_list();
        ensure_entry(&mut doc, &entry()).unwrap();
        doc["plugins"]
            .as_array_mut()
            .unwrap()
            .push(entry().to_value());
        assert!(ensure_entry(&mut doc, &entry()).unwrap());
        assert_eq!(doc["plugins"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn remove_restores_the_original_document() {
        let mut doc = bridge_list();
        ensure_entry(&mut doc, &entry()).unwrap();
        let removed = remove_entries(&mut doc).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(render(&doc), render(&bridge_list()));
        assert!(remove_entries(&mut doc).unwrap().is_empty());
    }

    #[test]
    fn single_conf_becomes_list_like_libcni() {
        let conf = json!({"cniVersion": "0.3.1", "name": "k8s", "type": "bridge", "mtu": 1450});
        let list = single_to_list(&conf).unwrap();
        assert_eq!(
            list,
            json!({"cniVersion": "0.3.1", "name": "k8s", "plugins": [{"type": "bridge", "mtu": 1450}]})
        );
        assert_eq!(shape_of(&list), Ok(Shape::List));
        assert_eq!(shape_of(&conf), Ok(Shape::Single));
    }

    #[test]
    fn shapes_we_cannot_edit_are_refused() {
        assert_eq!(shape_of(&json!([1])), Err(ShapeError::NotAnObject));
        assert_eq!(
            shape_of(&json!({"plugins": {}})),
            Err(ShapeError::BadPlugins)
        );
        assert_eq!(
            shape_of(&json!({"plugins": [1]})),
            Err(ShapeError::BadPlugins)
        );
        assert_eq!(shape_of(&json!({"name": "x"})), Err(ShapeError::NoType));
        let mut bad = json!({"plugins": "x"});
        assert_eq!(
            ensure_entry(&mut bad, &entry()),
            Err(ShapeError::BadPlugins)
        );
        assert_eq!(bad, json!({"plugins": "x"}));
    }

    #[test]
    fn multus_files_are_recognised() {
        assert!(is_delegating(&json!({"type": "multus", "name": "m"})));
        assert!(is_delegating(
            &json!({"plugins": [{"type": "multus-shim"}]})
        ));
        assert!(!is_delegating(&bridge_list()));
    }

    #[test]
    fn cluster_dns_is_read_back_from_an_entry() {
        assert_eq!(
            PluginEntry::cluster_dns_of(&entry().to_value()),
            entry().cluster_dns
        );
        assert!(PluginEntry::cluster_dns_of(&json!({"type": "node-local-dns"})).is_empty());
    }
}
