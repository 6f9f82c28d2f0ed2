//! The NSG renderer: the shared shape renderer (one rule per destination, protocol, source
//! set and IP family, many port ranges and sources per rule), named with stable names, each
//! rule's destination cut to its IP family.

use nodeport_firewall_model::render::{NameParts, RenderContext};
use nodeport_firewall_model::{Grant, Protocol, Render, Rule, ShapeRenderer};

use crate::marker::{self, Destination};

/// Renders NSG rules.
pub struct NsgRenderer {
    inner: ShapeRenderer,
}

impl std::fmt::Debug for NsgRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsgRenderer").finish_non_exhaustive()
    }
}

impl NsgRenderer {
    pub fn new() -> Self {
        let inner = ShapeRenderer::named(|parts: &NameParts<'_>| {
            // The name hashes the kind of destination, not its prefixes: node IPs come
            // and go, and the rule is then updated in place under the same name.
            let identity = parts.scope.map(Destination::identity);
            let stable = NameParts {
                scope: identity,
                ..parts.clone()
            };
            marker::rule_name(parts.cluster, parts.pools, &stable.short_hash())
        });
        NsgRenderer { inner }
    }
}

impl Default for NsgRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Render for NsgRenderer {
    fn render(&self, ctx: &RenderContext<'_>, grants: &[&Grant]) -> Vec<Rule> {
        let destination = ctx.scope.and_then(Destination::parse);
        let mut out = Vec::new();
        for mut rule in self.inner.render(ctx, grants) {
            // NSGs know TCP, UDP, ICMP, ESP, AH and "any": SCTP cannot be allowed without
            // allowing every protocol, so it gets no rule (documented in docs/azure.md).
            if rule.content.protocol == Protocol::Sctp {
                continue;
            }
            // A rule holds one address family; its destination must be of the same one.
            // A pool without destinations of that family cannot receive that traffic.
            let Some(dst) = destination
                .as_ref()
                .and_then(|d| d.of_family(rule.content.family))
            else {
                continue;
            };
            rule.content.scope = Some(dst.scope());
            out.push(rule);
        }
        out.sort_unstable_by(|a, b| a.content.cmp(&b.content));
        out
    }

    fn marker_digest(&self, cluster: &str, rule: &Rule) -> Option<String> {
        marker::digest(cluster, &rule.pools, &rule.services)
    }

    /// A rule's destination prefixes: ours from its destination scope (an ASG counts none),
    /// others' from what ARM returned (`other:` lists them as they are).
    fn destinations(&self, rule: &Rule) -> usize {
        match rule.content.scope.as_deref() {
            Some(scope) => match Destination::parse(scope) {
                Some(d) => d.prefix_count(),
                None => scope
                    .strip_prefix("other:")
                    .map_or(0, |list| list.split(',').filter(|s| !s.is_empty()).count()),
            },
            None => 0,
        }
    }
}
