//! The GCP renderer: the generic rule shape with GCP's rule names, and the digest our
//! marker carries when a rule serves more Services than a 2048-character description
//! lists. The planner compares that digest with an observed rule's, so a fresh process
//! knows a long list without having written it.

use nodeport_firewall_model::render::RenderContext;
use nodeport_firewall_model::{Grant, Render, Rule, ShapeRenderer};

use crate::marker;

#[derive(Debug)]
pub struct GcpRenderer {
    shape: ShapeRenderer,
}

impl GcpRenderer {
    pub fn new() -> Self {
        GcpRenderer {
            shape: ShapeRenderer::named(marker::rule_name),
        }
    }
}

impl Default for GcpRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Render for GcpRenderer {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule> {
        self.shape.render(ctx, grants)
    }

    fn marker_digest(&self, cluster: &str, rule: &Rule) -> Option<String> {
        marker::description_and_digest(cluster, &rule.pools, &rule.services).1
    }
}
