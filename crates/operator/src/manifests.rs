//! Reads Service, Node, Namespace and NodePortFirewallPolicy manifests from YAML/JSON files
//! and directories: multi-document files, `kubectl get -o yaml` lists, and single objects.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use serde::Deserialize;

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
    /// Objects of other kinds, which `plan` ignores: (file, kind).
    pub ignored: Vec<(String, String)>,
}

/// Loads every `.yaml`, `.yml` and `.json` file under `paths` (directories recursively,
/// in name order).
pub fn load(paths: &[PathBuf]) -> Result<Manifests> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut out = Manifests::default();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", file.display())))?;
        parse_into(&file.display().to_string(), &text, &mut out)?;
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
            let is_manifest = e
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"));
            if e.is_dir() || is_manifest {
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
        let err = |message: String| Error::Manifest {
            path: format!("{name} (document {})", i + 1),
            message,
        };
        let value = yaml_serde::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        add_object(value, out).map_err(err)?;
    }
    Ok(())
}

fn add_object(value: yaml_serde::Value, out: &mut Manifests) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    match kind.as_str() {
        "Service" => out
            .services
            .push(yaml_serde::from_value(value).map_err(|e| format!("Service: {e}"))?),
        "Node" => out
            .nodes
            .push(yaml_serde::from_value(value).map_err(|e| format!("Node: {e}"))?),
        "Namespace" => out
            .namespaces
            .push(yaml_serde::from_value(value).map_err(|e| format!("Namespace: {e}"))?),
        "NodePortFirewallPolicy"
            if value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.starts_with(&format!("{}/", crate::policy::GROUP))) =>
        {
            out.policies.push(
                yaml_serde::from_value(value)
                    .map_err(|e| format!("NodePortFirewallPolicy: {e}"))?,
            )
        }
        k if k == "List" || k.ends_with("List") => {
            let items = match value.get("items") {
                Some(yaml_serde::Value::Sequence(items)) => items.clone(),
                Some(yaml_serde::Value::Null) | None => Vec::new(),
                Some(_) => return Err(format!("{k}: items is not a list")),
            };
            for item in items {
                add_object(item, out)?;
            }
        }
        "" => return Err("object has no kind".to_string()),
        other => {
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("?")
                .to_string();
            out.ignored.push((name, other.to_string()));
        }
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
                "kind: Service\nmetadata: {name: a}\n---\nkind: Service\nspec: {ports: 3}\n",
                "(document 2)",
            ),
            ("metadata: {name: a}\n", "object has no kind"),
            ("kind: [\n", "t.yaml"),
            (
                "apiVersion: nodeport-firewall.io/v1alpha1\nkind: NodePortFirewallPolicy\nmetadata: {name: p}\nspec: {allowedSourceRanges: 3}\n",
                "NodePortFirewallPolicy: ",
            ),
        ];
        for (text, want) in cases {
            let mut m = Manifests::default();
            let e = parse_into("t.yaml", text, &mut m).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
