//! Pure edits of one CNI config document, on `serde_json::Value` with `preserve_order` so that
//! every key we do not own keeps its value and its position.

use serde_json::{Map, Value};

/// The entry type is shared with the plugin, which reads what the installer writes with it.
pub use settings::entry::{PLUGIN_TYPE, PluginEntry};

/// Plugin types of meta-plugins whose own config file must be skipped: they delegate to the
/// primary CNI's file, which is the one to edit.
const DELEGATING_TYPES: &[&str] = &["multus", "multus-shim"];

/// The keys we own in our entry, in the order they are written for a new entry. Keys the
/// entry leaves unset (the plugin's `failurePolicy`, `logFile`…) stay the operator's.
fn owned_fields(entry: &PluginEntry) -> Map<String, Value> {
    match entry.to_value() {
        Value::Object(fields) => fields,
        _ => Map::new(),
    }
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
        plugins.push(Value::Object(owned_fields(entry)));
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
    for (key, want) in owned_fields(entry) {
        if existing.get(&key) != Some(&want) {
            existing.insert(key, want);
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

    #[test]
    fn keys_the_operator_set_and_we_do_not_own_are_kept() {
        let mut doc = bridge_list();
        doc["plugins"].as_array_mut().unwrap().push(
            json!({"type": "node-local-dns", "clusterDNS": ["10.96.0.10", "fd00::a"],
                   "failurePolicy": "closed", "logFile": "/var/log/x.log"}),
        );
        assert!(ensure_entry(&mut doc, &entry()).unwrap());
        let ours = &doc["plugins"][2];
        assert_eq!(ours["failurePolicy"], "closed");
        assert_eq!(ours["logFile"], "/var/log/x.log");
        assert_eq!(ours["socketMatch"], "safe");
        // What the plugin reads back is what the installer meant, plus the operator's keys.
        let read: PluginEntry = serde_json::from_value(ours.clone()).unwrap();
        assert_eq!(read.cluster_dns, entry().cluster_dns);
        assert_eq!(
            read.failure_policy,
            Some(settings::entry::FailurePolicy::Closed)
        );
    }
}
