//! The binary as a kubectl plugin, and its shell completions.

use std::process::Command;

use crate::cli::{Cli, Scratch, binary, examples};

#[test]
fn installed_as_kubectl_nodeport_firewall_it_is_the_same_tool() {
    let dir = Scratch::new();
    let plugin = dir.path("kubectl-nodeport_firewall");
    std::os::unix::fs::symlink(binary(), &plugin).unwrap();
    let files = examples().join("cluster").display().to_string();
    let config = examples().join("config.yaml").display().to_string();
    let out = Command::new(&plugin)
        .args(["plan", "-f", &files, "--config", &config])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let direct = Cli::new()
        .plan(&["-f", &files, "--config", &config])
        .expect_exit(2);
    assert_eq!(String::from_utf8_lossy(&out.stdout), direct.stdout);
    // kubectl runs `kubectl-nodeport_firewall` for `kubectl nodeport-firewall`: its help
    // says so.
    let help = Command::new(&plugin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Usage: kubectl nodeport-firewall"), "{help}");
}

#[test]
fn completions_cover_every_subcommand_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Cli::new().run("completions", &[shell]).expect_exit(0);
        for sub in ["plan", "apply", "check", "run", "crd", "completions"] {
            assert!(out.stdout.contains(sub), "{shell}: no {sub}");
        }
        assert!(out.stdout.contains("nodeport-firewall"), "{shell}");
    }
    Cli::new().run("completions", &["tcsh"]).expect_exit(1);
}
