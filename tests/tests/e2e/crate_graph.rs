//! The crate graph against its design: the table "Crates and what each may depend on" in
//! `docs/architecture.md`, read from the page itself and checked against the dependencies
//! `cargo metadata` reports.
//!
//! What is checked, for every workspace package's normal dependencies (`[dependencies]`,
//! optional ones included; dev- and build-dependencies are not checked):
//!
//! - every workspace package has a row, and every row names a workspace package at its path;
//! - a direct dependency on a workspace crate is named in the row's "may depend on" column
//!   (`everything above` names every crate of the rows above);
//! - every other crate named in "may depend on" is a direct dependency (the column lists the
//!   external crates that define a crate's role, not every utility, but it names none that
//!   is not there);
//! - no direct dependency matches a category of the row's "must not depend on" column.
//!   The column states categories in words; [`CATEGORIES`] maps each to crate-name
//!   patterns, and a category it does not know fails the test;
//! - for `model`, which must stay pure, its categories hold through all of its normal
//!   dependencies, not only the direct ones (the graph is the workspace's, with features
//!   unified, so it can only over-report).
//!
//! Text in parentheses in a cell is commentary and is ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::cli::workspace;

const PAGE: &str = "docs/architecture.md";
const SECTION: &str = "## Crates and what each may depend on";
const HEADER: [&str; 5] = [
    "crate",
    "package",
    "role",
    "may depend on",
    "must not depend on",
];
/// The crate whose forbidden categories are checked transitively.
const PURE: &str = "nodeport-firewall-model";

const AWS: &[&str] = &[
    "aws-config",
    "aws-sdk-*",
    "aws-smithy-*",
    "aws-types",
    "aws-credential-types",
    "aws-runtime",
    "aws-runtime-*",
    "aws-sigv4",
    "rusoto_*",
];
const GCP: &[&str] = &[
    "google-cloud-*",
    "google-apis-common",
    "gcp_auth",
    "gcloud-sdk",
];
const AZURE: &[&str] = &["azure_*"];
/// Each cloud crate's short name (its directory under `crates/`) and its SDK's crates.
const CLOUDS: &[(&str, &[&str])] = &[("aws", AWS), ("gcp", GCP), ("azure", AZURE)];

const ASYNC_RUNTIMES: &[&str] = &[
    "tokio",
    "tokio-*",
    "async-std",
    "async-executor",
    "async-global-executor",
    "async-io",
    "smol",
    "futures-executor",
    "glommio",
    "actix-rt",
];
const IO: &[&str] = &[
    "hyper", "hyper-*", "h2", "reqwest", "ureq", "tonic", "axum", "mio", "socket2", "tempfile",
    "walkdir", "notify",
];

/// The categories the "must not depend on" column may use, as crate-name patterns (an
/// exact name, or a prefix ending in `*`). `other clouds' SDKs` depends on the row: see
/// [`patterns`].
const CATEGORIES: &[(&str, &[&[&str]])] = &[
    ("kube", &[&["kube", "kube-*"]]),
    ("tokio or any async runtime", &[ASYNC_RUNTIMES]),
    ("any cloud SDK", &[AWS, GCP, AZURE]),
    ("other clouds' SDKs", &[]),
    ("any I/O", &[ASYNC_RUNTIMES, IO]),
    (
        "the product crates",
        &[&["nodeport-firewall", "nodeport-firewall-*"]],
    ),
];

/// One row of the table.
#[derive(Debug)]
struct Row {
    /// `crates/model`, `tests`: the package's directory, relative to the workspace root.
    dir: String,
    /// The last component of `dir`: what the other rows call this crate (`model`).
    short: String,
    package: String,
    /// Crate names in "may depend on": short names of workspace crates, or external crates.
    may: Vec<String>,
    /// "may depend on" says `everything above`.
    everything_above: bool,
    /// The categories in "must not depend on".
    must_not: Vec<String>,
}

/// `text` without anything in parentheses (nested ones included).
fn strip_parens(text: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The `code` spans of `text`, in order.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let inner = line
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .unwrap_or_else(|| panic!("{PAGE}: a table row must start and end with `|`: {line:?}"));
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

/// The rows of the table in `page` (the text of `docs/architecture.md`).
fn table(page: &str) -> Vec<Row> {
    let mut lines = page
        .lines()
        .skip_while(|l| l.trim() != SECTION)
        .skip(1)
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'));
    let header = cells(lines.next().unwrap_or_else(|| {
        panic!("{PAGE}: no table under {SECTION:?} (the crate-graph test reads it)")
    }));
    assert_eq!(
        header, HEADER,
        "{PAGE}: the columns of the table under {SECTION:?} changed; update crate_graph.rs"
    );
    lines.next(); // |---|---|
    let rows: Vec<Row> = lines
        .map(|line| {
            let c = cells(line);
            assert_eq!(c.len(), HEADER.len(), "{PAGE}: row {line:?}");
            let one = |cell: &str, what: &str| -> String {
                match code_spans(&strip_parens(cell)).as_slice() {
                    [one] => one.clone(),
                    _ => panic!("{PAGE}: the {what} cell of {line:?} must name one `crate`"),
                }
            };
            let dir = one(&c[0], "crate");
            let may_cell = strip_parens(&c[3]);
            let must_not_cell = strip_parens(&c[4]);
            let must_not = if must_not_cell.trim() == "—" {
                Vec::new()
            } else {
                must_not_cell
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            Row {
                short: dir.rsplit('/').next().unwrap_or(&dir).to_string(),
                package: one(&c[1], "package"),
                may: code_spans(&may_cell),
                everything_above: may_cell.contains("everything above"),
                must_not,
                dir,
            }
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "{PAGE}: the table under {SECTION:?} has no rows"
    );
    rows
}

/// The crate-name patterns of `category` in `row`, or `None` for an unknown category.
fn patterns(category: &str, row: &Row) -> Option<Vec<&'static str>> {
    if category == "other clouds' SDKs" {
        assert!(
            CLOUDS.iter().any(|(cloud, _)| *cloud == row.short),
            "{PAGE}: {} says \"other clouds' SDKs\" but is not a cloud crate ({:?}); \
             say \"any cloud SDK\", or add it to CLOUDS in crate_graph.rs",
            row.dir,
            CLOUDS.iter().map(|(c, _)| *c).collect::<Vec<_>>()
        );
        return Some(
            CLOUDS
                .iter()
                .filter(|(cloud, _)| *cloud != row.short)
                .flat_map(|(_, p)| p.iter().copied())
                .collect(),
        );
    }
    let (_, groups) = CATEGORIES.iter().find(|(name, _)| *name == category)?;
    Some(groups.iter().flat_map(|g| g.iter().copied()).collect())
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The first pattern of `patterns` that `name` matches.
fn matching<'a>(patterns: &[&'a str], name: &str) -> Option<&'a str> {
    patterns.iter().copied().find(|p| matches(p, name))
}

/// `cargo metadata` of the workspace at `root` (offline first: the lock file and the local
/// registry cache are enough once the workspace has been built).
fn metadata(root: &Path) -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let run = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1"])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"));
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?} metadata: {e}"))
    };
    let mut out = run(true);
    if !out.status.success() {
        out = run(false);
    }
    assert!(
        out.status.success(),
        "cargo metadata failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("cargo metadata: no {key:?} in {v}"))
}

/// A workspace package as `cargo metadata` sees it.
#[derive(Debug)]
struct Package {
    id: String,
    /// Its directory, relative to the workspace root.
    dir: String,
    /// The names of its normal dependencies (the package names, not renames).
    deps: BTreeSet<String>,
}

fn workspace_packages(meta: &Value, root: &Path) -> BTreeMap<String, Package> {
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().expect("a member id"))
        .collect();
    let mut out = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let id = str_of(p, "id");
        if !members.contains(id) {
            continue;
        }
        let manifest = Path::new(str_of(p, "manifest_path"));
        let dir = manifest
            .parent()
            .and_then(|d| d.strip_prefix(root).ok())
            .unwrap_or_else(|| panic!("{} is not under {}", manifest.display(), root.display()));
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| str_of(d, "name").to_string())
            .collect();
        out.insert(
            str_of(p, "name").to_string(),
            Package {
                id: id.to_string(),
                dir: dir.to_string_lossy().into_owned(),
                deps,
            },
        );
    }
    out
}

/// Every package `from` reaches through normal dependencies in the resolved graph, with
/// the path to it (`from`'s name first).
fn transitive(meta: &Value, from: &str) -> BTreeMap<String, Vec<String>> {
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (str_of(p, "id"), str_of(p, "name")))
        .collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| (str_of(n, "id"), n))
        .collect();
    let mut paths: HashMap<&str, Vec<String>> = HashMap::new();
    paths.insert(from, vec![names[from].to_string()]);
    let mut queue = VecDeque::from([from]);
    while let Some(id) = queue.pop_front() {
        for d in nodes[id]["deps"].as_array().expect("deps") {
            let normal = d["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null());
            let pkg = str_of(d, "pkg");
            if normal && !paths.contains_key(pkg) {
                let mut path = paths[id].clone();
                path.push(names[pkg].to_string());
                paths.insert(pkg, path);
                queue.push_back(pkg);
            }
        }
    }
    paths.remove(from);
    paths
        .into_iter()
        .map(|(id, path)| (names[id].to_string(), path))
        .collect()
}

/// What is wrong with the workspace `meta` against the table in `page`, one line each.
fn violations(page: &str, meta: &Value, root: &Path) -> Vec<String> {
    let rows = table(page);
    let packages = workspace_packages(meta, root);
    let mut wrong = Vec::new();

    for (name, p) in &packages {
        if !rows.iter().any(|r| r.package == *name) {
            wrong.push(format!(
                "workspace package `{name}` ({}) has no row in the table",
                p.dir
            ));
        }
    }
    for (i, row) in rows.iter().enumerate() {
        let Some(package) = packages.get(&row.package) else {
            wrong.push(format!(
                "the row {} names package `{}`, which is not a workspace package",
                row.dir, row.package
            ));
            continue;
        };
        if package.dir != row.dir {
            wrong.push(format!(
                "the row {} names package `{}`, which is in {}",
                row.dir, row.package, package.dir
            ));
        }
        let who = format!("`{}` ({})", row.package, row.dir);

        // Workspace crates: exactly those the row allows.
        let mut allowed_ws: BTreeSet<&str> = BTreeSet::new();
        if row.everything_above {
            allowed_ws.extend(rows[..i].iter().map(|r| r.package.as_str()));
        }
        let mut external = Vec::new();
        for name in &row.may {
            match rows.iter().find(|r| r.short == *name || r.package == *name) {
                Some(r) => {
                    allowed_ws.insert(&r.package);
                }
                None => external.push(name.as_str()),
            }
        }
        for dep in &package.deps {
            if rows.iter().any(|r| r.package == *dep) && !allowed_ws.contains(dep.as_str()) {
                wrong.push(format!(
                    "{who} depends on the workspace crate `{dep}`, which its \"may depend on\" \
                     column does not name (it allows: {})",
                    if allowed_ws.is_empty() {
                        "no workspace crate".to_string()
                    } else {
                        allowed_ws
                            .iter()
                            .map(|c| format!("`{c}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
            }
        }
        // External crates named as allowed: real dependencies.
        for name in external {
            if !package.deps.contains(name) {
                wrong.push(format!(
                    "{who}: \"may depend on\" names `{name}`, which is not one of its \
                     dependencies (nor a crate of the table)"
                ));
            }
        }

        // Forbidden categories.
        let mut forbidden: Vec<(&str, Vec<&'static str>)> = Vec::new();
        for category in &row.must_not {
            match patterns(category, row) {
                Some(p) => forbidden.push((category, p)),
                None => wrong.push(format!(
                    "{who}: \"must not depend on\" says {category:?}, which crate_graph.rs does \
                     not know; use one of {:?}, or add it to CATEGORIES",
                    CATEGORIES.iter().map(|(c, _)| *c).collect::<Vec<_>>()
                )),
            }
        }
        // The categories `name` falls in, as `"category" (pattern `p`)`.
        let forbids = |name: &str| -> Option<String> {
            let hits: Vec<String> = forbidden
                .iter()
                .filter_map(|(category, patterns)| {
                    matching(patterns, name).map(|p| format!("{category:?} (pattern `{p}`)"))
                })
                .collect();
            (!hits.is_empty()).then(|| hits.join(", "))
        };
        for name in &row.may {
            if let Some(why) = forbids(name) {
                wrong.push(format!(
                    "{who}: the table both allows `{name}` and forbids it: {why}"
                ));
            }
        }
        for dep in &package.deps {
            if let Some(why) = forbids(dep) {
                wrong.push(format!(
                    "{who} depends on `{dep}`, which the table forbids: {why}"
                ));
            }
        }
        if row.package == PURE {
            for (name, path) in transitive(meta, &package.id) {
                // Reported once, at the first forbidden crate on the way.
                let through_forbidden =
                    path[1..path.len() - 1].iter().any(|c| forbids(c).is_some());
                if package.deps.contains(&name) || through_forbidden {
                    continue;
                }
                if let Some(why) = forbids(&name) {
                    wrong.push(format!(
                        "{who} depends on `{name}` through {}, which the table forbids: {why}",
                        path.join(" -> ")
                    ));
                }
            }
        }
    }
    wrong
}

#[test]
fn every_crate_depends_only_on_what_the_architecture_allows() {
    let root = workspace();
    let page = std::fs::read_to_string(root.join(PAGE)).expect("docs/architecture.md");
    let wrong = violations(&page, &metadata(&root), &root);
    assert!(
        wrong.is_empty(),
        "the crate graph breaks the table \"Crates and what each may depend on\" in {PAGE}:\n  \
         - {}\nRemove the dependency, or, if the design changed, change the table (and, for a \
         new category, CATEGORIES in tests/tests/e2e/crate_graph.rs).",
        wrong.join("\n  - ")
    );
}

#[test]
fn the_table_is_read_as_written() {
    let page = "## Crates and what each may depend on\n\n\
        | crate | package | role | may depend on | must not depend on |\n\
        |---|---|---|---|---|\n\
        | `crates/model` | `m` | pure (no I/O) | `serde`, `k8s-openapi` (types, `Pod`) | kube, any I/O |\n\
        | `crates/aws` | `a` (binary `x`) | EC2 | `model`, `aws-sdk-ec2` | other clouds' SDKs |\n\
        | `crates/operator` | `o` | all | everything above, `clap` | — |\n\
        \nAfter the table.\n";
    let rows = table(page);
    let got: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} ({}) {}: may {:?}{}, must not {:?}",
                r.dir,
                r.short,
                r.package,
                r.may,
                if r.everything_above { " + above" } else { "" },
                r.must_not
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            r#"crates/model (model) m: may ["serde", "k8s-openapi"], must not ["kube", "any I/O"]"#,
            r#"crates/aws (aws) a: may ["model", "aws-sdk-ec2"], must not ["other clouds' SDKs"]"#,
            r#"crates/operator (operator) o: may ["clap"] + above, must not []"#,
        ]
    );
    let aws = patterns("other clouds' SDKs", &rows[1]).unwrap();
    assert!(matching(&aws, "google-cloud-auth").is_some());
    assert!(matching(&aws, "azure_core").is_some());
    assert!(matching(&aws, "aws-sdk-ec2").is_none());
    assert!(patterns("any cloud", &rows[0]).is_none());
    let kube = patterns("kube", &rows[0]).unwrap();
    assert!(matching(&kube, "kube-runtime").is_some());
    assert!(matching(&kube, "k8s-openapi").is_none());
}
