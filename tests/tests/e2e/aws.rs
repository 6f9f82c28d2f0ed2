//! The real binary against EC2 as emulated by `moto_server`: `check`, `plan`, `apply`, then
//! `plan` again shows no changes, and a rule nodeport-firewall does not own is untouched.
//!
//! moto is set up (VPC, security groups, a foreign rule) and inspected with boto3, which
//! `pip install 'moto[server]'` installs with it; the binary talks to it through the AWS SDK
//! with the `endpointUrl` override.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Cli, Scratch, examples};

/// A moto_server on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    /// Starts moto, or returns `None` (after saying so) when `NPF_SKIP_MOTO=1` and it is
    /// missing. Without that variable a missing moto_server fails the test.
    pub fn start() -> Option<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if std::env::var("NPF_SKIP_MOTO").as_deref() == Ok("1") => {
                eprintln!("SKIPPED: moto_server not available ({e})");
                return None;
            }
            Err(e) => panic!(
                "moto_server not found ({e}): run `python3 -m pip install 'moto[server]'`, or set NPF_SKIP_MOTO=1"
            ),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on {url}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Moto { child, url })
    }

    /// Runs a boto3 snippet with `ec2` bound to a client of this moto; returns its stdout.
    pub fn python(&self, body: &str) -> String {
        let script = format!(
            "import boto3, json\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x')\n{body}\n",
            self.url
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "boto3 script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn plan_apply_plan_against_moto_leaves_foreign_rules_alone() {
    let Some(moto) = Moto::start() else { return };
    let ids = moto.python(
        "vpc = ec2.create_vpc(CidrBlock='10.0.0.0/16')['Vpc']['VpcId']\n\
         ids = [ec2.create_security_group(GroupName=n, Description='nodes', VpcId=vpc)['GroupId'] for n in ('web', 'edge', 'batch')]\n\
         ec2.authorize_security_group_ingress(GroupId=ids[0], IpPermissions=[{'IpProtocol': 'tcp', 'FromPort': 22, 'ToPort': 22, 'IpRanges': [{'CidrIp': '198.51.100.0/24'}]}])\n\
         print(' '.join(ids))",
    );
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert_eq!(ids.len(), 3);
    let dir = Scratch::new();
    let config = dir.write(
        "config.yaml",
        &format!(
            "clusterName: demo\npools:\n  web: {{aws: {{securityGroupIds: [{}]}}}}\n  edge: {{aws: {{securityGroupIds: [{}]}}}}\n  batch: {{aws: {{securityGroupIds: [{}]}}}}\n  gpu: {{managed: false}}\naws:\n  region: us-east-1\n  endpointUrl: {}\n",
            ids[0], ids[1], ids[2], moto.url
        ),
    );
    let cluster = examples().join("cluster");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "-f".to_string(),
            cluster.display().to_string(),
            "--config".to_string(),
            config.display().to_string(),
            "--provider".to_string(),
            "aws".to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let aws = || {
        Cli::new()
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
    };

    aws()
        .run("check", &args(&[]))
        .expect_exit(0)
        .stdout_has(&[&format!("aws:{}: all permissions present", ids[0])]);
    aws().plan(&args(&[])).expect_exit(2).stdout_has(&[
        &format!("pool web (2 nodes) -> aws:{}", ids[0]),
        "+ tcp 30080-30081 from 203.0.113.0/24  [shop/web]",
        "+ tcp 30080-30081 from 2001:db8:100::/48  [shop/web]",
        "Plan: 13 to add, 0 to remove, 0 unchanged.",
    ]);
    aws()
        .apply(&args(&["--yes"]))
        .expect_exit(0)
        .stdout_has(&["Apply complete: 13 added, 0 changed, 0 removed."]);
    aws()
        .plan(&args(&[]))
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 13 unchanged."]);

    // The SSH rule nobody tagged is still there, exactly as it was.
    let ssh = moto.python(&format!(
        "rules = ec2.describe_security_group_rules(Filters=[{{'Name': 'group-id', 'Values': ['{}']}}])['SecurityGroupRules']\n\
         print(json.dumps(sorted([[r['FromPort'], r.get('CidrIpv4', r.get('CidrIpv6'))] for r in rules if not r['IsEgress'] and not r.get('Tags')])))",
        ids[0]
    ));
    assert_eq!(ssh.trim(), r#"[[22, "198.51.100.0/24"]]"#);
}
