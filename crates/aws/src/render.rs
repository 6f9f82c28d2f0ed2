//! The AWS renderer: the generic rule shape (one port range and one CIDR per rule, no
//! names), and the digest a rule's marker carries when its Service list does not fit the
//! description ([`crate::marker`]). The planner compares that digest with an observed rule's,
//! so a fresh process recognises a long list it did not write.

use nodeport_firewall_model::render::RenderContext;
use nodeport_firewall_model::{Grant, Render, Rule, ShapeRenderer};

use crate::marker;

#[derive(Debug)]
pub struct AwsRenderer {
    shape: ShapeRenderer,
}

impl AwsRenderer {
    pub fn new() -> Self {
        AwsRenderer {
            shape: ShapeRenderer::unnamed(),
        }
    }
}

impl Default for AwsRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Render for AwsRenderer {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule> {
        self.shape.render(ctx, grants)
    }

    fn marker_digest(&self, cluster: &str, rule: &Rule) -> Option<String> {
        marker::marker(cluster, &rule.services).digest
    }
}
