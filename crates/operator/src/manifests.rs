//! Reads Service, Node, Namespace and NodePortFirewallPolicy manifests from YAML/JSON files
//! and directories, and from standard input (`-f -`): multi-document files, `kubectl get -o
//! yaml` lists, and single objects, the way kubectl reads them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use serde::Deserialize;
use yaml_serde::Value;

use crate::policy::NodePortFirewallPolicy;
use crate::{Error, Result};

/// The objects found, in file order.
#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
    /// Namespaces: their labels are what policies select by.
    pub namespaces: Vec<Namespace>,
    pub policies: Vec<NodePortFirewallPolicy>,
    /// Objects of other kinds, which `plan` ignores: (name, kind).
    pub ignored: Vec<(String, String)>,
    /// Documents that are not objects (no `kind`: a Helm values file, `Chart.yaml`), skipped:
    /// (where, why).
    pub skipped: Vec<(String, String)>,
    /// Every object read, by (kind, namespace, name): where it was first read, and its
    /// content, so that the same object given twice is read once.
    seen: BTreeMap<(String, String, String), (String, Value)>,
}

/// `-f -`: standard input.
pub const STDIN: &str = "-";

/// Loads every `.yaml`, `.yml` and `.json` file under `paths` (directories recursively, in
/// name order, skipping dot-directories and dot-files), and standard input for `-`.
pub fn load(paths: &[PathBuf]) -> Result<Manifests> {
    let mut out = Manifests::default();
    for p in paths {
        if p.as_os_str() == STDIN {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Error::Io(format!("cannot read standard input: {e}")))?;
            parse_into("<stdin>", &text, &mut out)?;
            continue;
        }
        let mut files = Vec::new();
        collect(p, &mut files)?;
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", file.display())))?;
            parse_into(&file.display().to_string(), &text, &mut out)?;
        }
    }
    Ok(out)
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Io(format!("cannot list {}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            // .git, .github, editor files: never manifests.
            let hidden = e
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let is_manifest = e
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"));
            if !hidden && (e.is_dir() || is_manifest) {
                collect(&e, files)?;
            }
        }
    } else {
        files.push(path.to_path_buf());
    }
    Ok(())
}

/// Parses one file's text (possibly several YAML documents).
pub fn parse_into(name: &str, text: &str, out: &mut Manifests) -> Result<()> {
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let here = format!("{name} (document {})", i + 1);
        let err = |message: String| Error::Manifest {
            path: here.clone(),
            message,
        };
        let value = Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        add_object(&here, value, out).map_err(err)?;
    }
    Ok(())
}

fn add_object(here: &str, value: Value, out: &mut Manifests) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    if kind.is_empty() {
        if value.get("items").is_none() {
            out.skipped.push((
                here.to_string(),
                "no kind: not a Kubernetes object (a Helm values file or Chart.yaml?)".into(),
            ));
            return Ok(());
        }
        return Err("a list without kind".to_string());
    }
    if kind == "List" || kind.ends_with("List") {
        let items = match value.get("items") {
            Some(Value::Sequence(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(format!("{kind}: items is not a list")),
        };
        for item in items {
            add_object(here, item, out)?;
        }
        return Ok(());
    }
    let read = matches!(kind.as_str(), "Service" | "Node" | "Namespace")
        || (kind == "NodePortFirewallPolicy"
            && value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.starts_with(&format!("{}/", crate::policy::GROUP))));
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_string();
    if !read {
        out.ignored.push((name, kind));
        return Ok(());
    }
    let namespace = match kind.as_str() {
        "Service" => meta
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string(),
        _ => String::new(),
    };
    let who = if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    };
    check_annotations(&who, meta)?;
    let key = (kind.clone(), namespace, name);
    if let Some((first, seen)) = out.seen.get(&key) {
        if *seen == value {
            return Ok(()); // the same object twice (two dumps of one cluster): read once
        }
        return Err(format!(
            "{who} is given twice with different content, here and in {first}: which one is meant? Give it once"
        ));
    }
    out.seen.insert(key, (here.to_string(), value.clone()));
    match kind.as_str() {
        "Service" => out
            .services
            .push(yaml_serde::from_value(value).map_err(|e| format!("{who}: {e}"))?),
        "Node" => out
            .nodes
            .push(yaml_serde::from_value(value).map_err(|e| format!("{who}: {e}"))?),
        "Namespace" => out
            .namespaces
            .push(yaml_serde::from_value(value).map_err(|e| format!("{who}: {e}"))?),
        _ => out
            .policies
            .push(yaml_serde::from_value(value).map_err(|e| format!("{who}: {e}"))?),
    }
    Ok(())
}

/// Annotations are strings. YAML reads `enabled: true` as a boolean, which the API server
/// refuses and a typed parse reports obscurely: say which key, and how to fix it.
fn check_annotations(who: &str, meta: Option<&Value>) -> Result<(), String> {
    let Some(Value::Mapping(annotations)) = meta.and_then(|m| m.get("annotations")) else {
        return Ok(());
    };
    for (k, v) in annotations {
        if v.is_string() || v.is_null() {
            continue;
        }
        let key = k.as_str().unwrap_or("?");
        let shown = yaml_serde::to_string(v).unwrap_or_default();
        let shown = shown.trim();
        return Err(format!(
            "{who}: annotation {key}: {shown} is not a string; quote it ({key}: \"{shown}\")"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_documents_and_lists() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: x}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {karpenter.sh/nodepool: p}}
- apiVersion: v1
  kind: ServiceList
  items:
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
- apiVersion: v1
  kind: Namespace
  metadata: {name: team-a, labels: {team: a}}
- apiVersion: nodeport-firewall.io/v1alpha1
  kind: NodePortFirewallPolicy
  metadata: {name: team-a}
  spec: {namespaces: [team-a], allowedSourceRanges: [10.0.0.0/8]}
"#;
        let mut m = Manifests::default();
        parse_into("t.yaml", text, &mut m).unwrap();
        assert_eq!(m.services.len(), 2);
        assert_eq!(m.nodes.len(), 1);
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(m.policies.len(), 1);
        assert_eq!(m.ignored, vec![("d".to_string(), "Deployment".to_string())]);
    }

    #[test]
    fn errors_name_the_document() {
        let cases = [
            (
                "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nmetadata: {name: b}\nspec: {ports: 3}\n",
                "(document 2)",
            ),
            ("kind: [\n", "t.yaml"),
            (
                "apiVersion: nodeport-firewall.io/v1alpha1\nkind: NodePortFirewallPolicy\nmetadata: {name: p}\nspec: {allowedSourceRanges: 3}\n",
                "NodePortFirewallPolicy p: ",
            ),
            (
                "kind: Service\nmetadata: {name: a, namespace: x, annotations: {nodeport-firewall.io/enabled: true}}\n",
                "Service x/a: annotation nodeport-firewall.io/enabled: true is not a string; quote it (nodeport-firewall.io/enabled: \"true\")",
            ),
            (
                "kind: Service\nmetadata: {name: a}\nspec: {type: NodePort}\n---\nkind: Service\nmetadata: {name: a}\nspec: {type: ClusterIP}\n",
                "Service default/a is given twice with different content, here and in t.yaml (document 1)",
            ),
        ];
        for (text, want) in cases {
            let mut m = Manifests::default();
            let e = parse_into("t.yaml", text, &mut m).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_same_object_twice_is_read_once_and_documents_without_kind_are_skipped() {
        let svc = "kind: Service\nmetadata: {name: a, namespace: x}\nspec: {type: NodePort}\n";
        let mut m = Manifests::default();
        parse_into("one.yaml", svc, &mut m).unwrap();
        parse_into("two.yaml", svc, &mut m).unwrap();
        assert_eq!(m.services.len(), 1);
        parse_into("values.yaml", "replicaCount: 2\nimage: {tag: x}\n", &mut m).unwrap();
        assert_eq!(m.skipped.len(), 1);
        assert!(m.skipped[0].0.contains("values.yaml (document 1)"));
    }
}
