//! Small builders for Node and Service manifests and operator configs, as YAML text.

use std::fmt::Write as _;

/// A Node in `pool` (by the `nodeport-firewall.io/pool` label), or in no pool.
pub fn node(name: &str, pool: Option<&str>) -> String {
    let labels = pool
        .map(|p| format!("\n  labels: {{nodeport-firewall.io/pool: {p}}}"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}{labels}\n")
}

/// A Service being built; `to_yaml` renders it.
#[derive(Debug, Clone)]
pub struct Svc {
    namespace: String,
    name: String,
    service_type: String,
    annotations: Vec<(String, String)>,
    /// (name, protocol, port, nodePort)
    ports: Vec<(String, String, u16, u32)>,
}

/// A NodePort Service that opts in (`enabled: "true"`) with no ports yet.
pub fn svc(namespace: &str, name: &str) -> Svc {
    Svc {
        namespace: namespace.into(),
        name: name.into(),
        service_type: "NodePort".into(),
        annotations: vec![("nodeport-firewall.io/enabled".into(), "true".into())],
        ports: Vec::new(),
    }
}

impl Svc {
    /// Sets (or replaces) `nodeport-firewall.io/<key>`.
    pub fn ann(mut self, key: &str, value: &str) -> Self {
        let key = format!("nodeport-firewall.io/{key}");
        self.annotations.retain(|(k, _)| *k != key);
        self.annotations.push((key, value.into()));
        self
    }

    pub fn ranges(self, ranges: &str) -> Self {
        self.ann("allowed-source-ranges", ranges)
    }

    pub fn port(mut self, name: &str, protocol: &str, port: u16, node_port: u32) -> Self {
        self.ports
            .push((name.into(), protocol.into(), port, node_port));
        self
    }

    pub fn tcp(self, node_port: u32) -> Self {
        let name = format!("p{node_port}");
        self.port(&name, "TCP", 80, node_port)
    }

    pub fn to_yaml(&self) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\n  annotations:\n",
            self.name, self.namespace
        );
        for (k, v) in &self.annotations {
            let _ = writeln!(s, "    {k}: {v:?}");
        }
        let _ = write!(s, "spec:\n  type: {}\n", self.service_type);
        if self.ports.is_empty() {
            s.push_str("  ports: []\n");
        } else {
            s.push_str("  ports:\n");
            for (name, protocol, port, node_port) in &self.ports {
                let _ = writeln!(
                    s,
                    "  - {{name: {name}, protocol: {protocol}, port: {port}, nodePort: {node_port}}}"
                );
            }
        }
        s
    }
}

/// Joins YAML documents into one multi-document file.
pub fn docs<S: AsRef<str>>(docs: &[S]) -> String {
    docs.iter()
        .map(|d| d.as_ref().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}

/// The Services of `examples/cluster/services.yaml`, one YAML document each.
pub fn example_services() -> Vec<String> {
    let text = std::fs::read_to_string(super::cli::examples().join("cluster/services.yaml"))
        .expect("read examples/cluster/services.yaml");
    text.split("\n---\n").map(str::to_string).collect()
}

/// `docs`, without the Service document named `name`.
pub fn without_service(docs: &[String], name: &str) -> Vec<String> {
    let needle = format!("\n  name: {name}\n");
    let kept: Vec<String> = docs
        .iter()
        .filter(|d| !d.contains(&needle))
        .cloned()
        .collect();
    assert_eq!(
        kept.len() + 1,
        docs.len(),
        "exactly one Service named {name}"
    );
    kept
}
