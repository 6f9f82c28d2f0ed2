//! A small harness that runs the real `nodeport-firewall` binary and reads its results, so
//! that tests read like sentences: `Cli::new().plan(&args).expect_exit(2).stdout_has("...")`.
//!
//! How the binary is found: `CARGO_BIN_EXE_<name>` exists only in the package that owns
//! the bin, and a dev-dependency on `nodeport-firewall` builds only its library, not its
//! binary (artifact dependencies are still unstable). So the first test that needs the
//! binary runs `cargo build -p nodeport-firewall --bin nodeport-firewall` once, with the
//! same cargo, profile and target directory as this test executable (which lives in
//! `target/<profile>/deps/`), and runs `target/<profile>/nodeport-firewall`. That build
//! is a no-op when the binary is fresh, and it makes a plain `cargo test --workspace` (or
//! `cargo test -p nodeport-firewall-e2e`) on a clean clone test the current sources.
//! Set `NPF_BIN=/path/to/nodeport-firewall` to test a prebuilt binary instead.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The workspace root (this package is `<root>/tests`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The bundled demo: `examples/`.
pub fn examples() -> PathBuf {
    workspace().join("examples")
}

/// The path of the `nodeport-firewall` binary, built (or checked fresh) on first use.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("NPF_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/e2e-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable is in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
        let bin = profile_dir.join(format!("nodeport-firewall{}", std::env::consts::EXE_SUFFIX));
        // `cargo test --workspace` has already built the binary (the operator package has
        // integration tests, so cargo links its bin) with the workspace's feature set. A
        // nested `cargo build -p nodeport-firewall` would resolve features differently and
        // rebuild the SDKs, so use the binary when it is newer than every source.
        if is_fresh(&bin) {
            return bin;
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "--package",
            "nodeport-firewall",
            "--bin",
            "nodeport-firewall",
        ])
        .arg("--manifest-path")
        .arg(workspace().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
        match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd
            .stdin(Stdio::null())
            .status()
            .expect("run cargo to build nodeport-firewall");
        assert!(
            status.success(),
            "building nodeport-firewall failed ({status}): {cmd:?}"
        );
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// Whether `bin` exists and is newer than every Rust source, manifest and the lock file of
/// the workspace (what make would call up to date).
fn is_fresh(bin: &Path) -> bool {
    fn newest(dir: &Path, newest_seen: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            if path.is_dir() {
                if name != "target" && name != ".git" {
                    newest(&path, newest_seen);
                }
            } else if (path.extension().is_some_and(|x| x == "rs" || x == "toml")
                || name == "Cargo.lock")
                && let Ok(m) = e.metadata().and_then(|m| m.modified())
            {
                *newest_seen = (*newest_seen).max(m);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let mut newest_source = std::time::UNIX_EPOCH;
    newest(&workspace().join("crates"), &mut newest_source);
    for file in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(workspace().join(file)).and_then(|m| m.modified()) {
            newest_source = newest_source.max(m);
        }
    }
    built >= newest_source
}

/// One invocation of the binary, being set up.
#[derive(Debug)]
pub struct Cli {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<String>,
}

impl Default for Cli {
    fn default() -> Self {
        Self::new()
    }
}

impl Cli {
    pub fn new() -> Self {
        Cli {
            args: Vec::new(),
            envs: Vec::new(),
            stdin: None,
        }
    }

    /// Gives the run `text` on standard input (still not a terminal).
    pub fn stdin(mut self, text: &str) -> Self {
        self.stdin = Some(text.to_string());
        self
    }

    /// Sets an environment variable for the run.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// `nodeport-firewall plan <args>`.
    pub fn plan<A: AsRef<OsStr>>(self, args: &[A]) -> Run {
        self.run("plan", args)
    }

    /// `nodeport-firewall apply <args>`.
    pub fn apply<A: AsRef<OsStr>>(self, args: &[A]) -> Run {
        self.run("apply", args)
    }

    /// `nodeport-firewall <subcommand> <args>`, with stdin closed (never a terminal).
    pub fn run<A: AsRef<OsStr>>(mut self, subcommand: &str, args: &[A]) -> Run {
        self.args.push(subcommand.into());
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        let mut cmd = Command::new(binary());
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .env_remove("NO_COLOR")
            .env_remove("NPF_LOG")
            .env_remove("NPF_LOG_FORMAT")
            .env_remove("NPF_CONFIG")
            .env_remove("NPF_PROVIDER");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let out = match &self.stdin {
            None => cmd.output().expect("run nodeport-firewall"),
            Some(text) => {
                use std::io::Write as _;
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = cmd.spawn().expect("run nodeport-firewall");
                if let Some(mut input) = child.stdin.take() {
                    input.write_all(text.as_bytes()).expect("write stdin");
                }
                child
                    .wait_with_output()
                    .expect("wait for nodeport-firewall")
            }
        };
        Run {
            command: format!(
                "nodeport-firewall {}",
                self.args
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn context(&self) -> String {
        format!(
            "$ {}\n--- exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts the exit status.
    #[track_caller]
    pub fn expect_exit(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            Some(code),
            "wrong exit status\n{}",
            self.context()
        );
        self
    }

    /// Asserts that stdout contains every one of `needles`.
    #[track_caller]
    pub fn stdout_has(self, needles: &[&str]) -> Self {
        for n in needles {
            assert!(
                self.stdout.contains(n),
                "stdout lacks {n:?}\n{}",
                self.context()
            );
        }
        self
    }

    /// Asserts that stdout contains none of `needles`.
    #[track_caller]
    pub fn stdout_lacks(self, needles: &[&str]) -> Self {
        for n in needles {
            assert!(
                !self.stdout.contains(n),
                "stdout has {n:?}\n{}",
                self.context()
            );
        }
        self
    }

    /// Asserts that stderr contains every one of `needles`.
    #[track_caller]
    pub fn stderr_has(self, needles: &[&str]) -> Self {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks {n:?}\n{}",
                self.context()
            );
        }
        self
    }

    /// The lines of stdout that start with `prefix` once indentation is removed.
    pub fn lines_starting(&self, prefix: &str) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    /// The section of stdout about one target, e.g. `memory:web`: its header line and the
    /// lines up to the next blank line, indentation removed.
    #[track_caller]
    pub fn section(&self, target: &str) -> Vec<String> {
        let header = format!("{target} (");
        let mut lines = self.stdout.lines().skip_while(|l| !l.starts_with(&header));
        let Some(first) = lines.next() else {
            panic!("no section for {target}\n{}", self.context());
        };
        std::iter::once(first)
            .chain(lines.take_while(|l| !l.trim().is_empty()))
            .map(|l| l.trim_start().to_string())
            .collect()
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{}", self.context()))
    }
}

/// A scratch directory for configs, manifests and state files.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` (creating parent directories) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create directories");
        }
        std::fs::write(&path, text).expect("write a scratch file");
        path
    }

    /// Reads a file, or `None` if it does not exist.
    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}
