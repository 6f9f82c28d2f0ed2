//! The proxy in front of moto_server: it counts calls per action and security group (EC2's
//! form `Action`, Service Quotas' `X-Amz-Target`) and injects faults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// The fault-injecting, call-counting proxy

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// 503 with an EC2 `RequestLimitExceeded` error.
    Throttle,
    /// 503 with a non-EC2 body, as a load balancer would send.
    Unavailable,
    /// The request reaches moto, but the client gets a 500 `InternalError`.
    LostResponse,
    /// 403 `UnauthorizedOperation`.
    Unauthorized,
    /// Service Quotas (JSON): 400 `AccessDeniedException`, as for a missing permission.
    QuotaAccessDenied,
    /// Service Quotas (JSON): 400 `NoSuchResourceException` (no applied value).
    QuotaNoSuchResource,
    /// Service Quotas (JSON): 200 with this quota value, as an account whose quota differs
    /// from moto's default.
    QuotaValue(u32),
}

#[derive(Debug, Default)]
pub(crate) struct ProxyState {
    /// (action, times left, fault)
    pub(crate) faults: Vec<(String, usize, Fault)>,
    /// (action, security group or "-") -> requests
    pub(crate) calls: BTreeMap<(String, String), usize>,
    pub(crate) injected: usize,
}

#[derive(Clone)]
pub(crate) struct Proxy {
    pub(crate) port: u16,
    pub(crate) state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    pub(crate) async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = handle(conn, upstream, st).await;
                });
            }
        });
        Proxy { port, state }
    }

    pub(crate) fn fail(&self, action: &str, times: usize, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((action.to_string(), times, fault));
    }

    pub(crate) fn reset_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    pub(crate) fn reset(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    pub(crate) fn calls(&self) -> BTreeMap<(String, String), usize> {
        self.state.lock().unwrap().calls.clone()
    }

    pub(crate) fn injected(&self) -> usize {
        self.state.lock().unwrap().injected
    }

    /// Requests to `group`, reads (Describe*) and writes.
    pub(crate) fn per_group(&self, group: &str) -> (usize, usize) {
        let mut reads = 0;
        let mut writes = 0;
        for ((action, g), n) in self.calls() {
            if g != group {
                continue;
            }
            if action.starts_with("Describe") || action.starts_with("Get") {
                reads += n;
            } else {
                writes += n;
            }
        }
        (reads, writes)
    }

    pub(crate) fn writes(&self) -> usize {
        self.calls()
            .iter()
            .filter(|((a, _), _)| !a.starts_with("Describe") && !a.starts_with("Get"))
            .map(|(_, n)| n)
            .sum()
    }
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%2F", "/").replace("%3A", ":"))
    })
}

/// Drops `Connection` headers and asks for the connection to be closed.
pub(crate) fn close_connection(head: &str) -> String {
    let mut out: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    out.retain(|l| !l.is_empty());
    format!("{}\r\nConnection: close\r\n\r\n", out.join("\r\n"))
}

pub(crate) async fn handle(
    mut client: TcpStream,
    upstream: u16,
    state: Arc<Mutex<ProxyState>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .split("\r\n")
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end + 4..].to_vec();
    let text = String::from_utf8_lossy(&body).to_string();
    // EC2 names the action in its form body; Service Quotas (JSON 1.1) in X-Amz-Target,
    // `ServiceQuotasV20190624.GetServiceQuota`.
    let action = form_value(&text, "Action")
        .or_else(|| {
            head.split("\r\n").find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-amz-target")
                    .then(|| v.trim().rsplit('.').next().unwrap_or_default().to_string())
            })
        })
        .unwrap_or_default();
    let group = form_value(&text, "GroupId")
        .or_else(|| form_value(&text, "Filter.1.Value.1"))
        .unwrap_or_else(|| "-".to_string());
    let fault = {
        let mut st = state.lock().unwrap();
        *st.calls.entry((action.clone(), group)).or_default() += 1;
        let f = st
            .faults
            .iter_mut()
            .find(|(a, left, _)| *a == action && *left > 0)
            .map(|(_, left, f)| {
                *left -= 1;
                *f
            });
        if f.is_some() {
            st.injected += 1;
        }
        f
    };
    let error = |status: &str, code: &str, message: &str| {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-1</RequestID></Response>"
        );
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        )
    };
    let json = |status: &str, body: String| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let forward = || async {
        let mut up = TcpStream::connect(("127.0.0.1", upstream)).await?;
        up.write_all(close_connection(&head).as_bytes()).await?;
        up.write_all(&body).await?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp).await?;
        Ok::<Vec<u8>, std::io::Error>(resp)
    };
    let out: Vec<u8> = match fault {
        Some(Fault::Throttle) => error(
            "503 Service Unavailable",
            "RequestLimitExceeded",
            "Request limit exceeded.",
        )
        .into_bytes(),
        Some(Fault::Unavailable) => {
            let b = "<html>Service Unavailable</html>";
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            )
            .into_bytes()
        }
        Some(Fault::Unauthorized) => error(
            "403 Forbidden",
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        )
        .into_bytes(),
        Some(Fault::QuotaAccessDenied) => json(
            "400 Bad Request",
            r#"{"__type":"AccessDeniedException","Message":"User is not authorized to perform: servicequotas:GetServiceQuota"}"#.to_string(),
        )
        .into_bytes(),
        Some(Fault::QuotaNoSuchResource) => json(
            "400 Bad Request",
            r#"{"__type":"NoSuchResourceException","Message":"The request failed because the specified resource does not exist."}"#.to_string(),
        )
        .into_bytes(),
        Some(Fault::QuotaValue(v)) => json(
            "200 OK",
            format!(
                r#"{{"Quota":{{"ServiceCode":"vpc","QuotaCode":"L-0EA8095F","QuotaName":"Inbound or outbound rules per security group","Value":{v}.0,"Unit":"None","Adjustable":true,"GlobalQuota":false}}}}"#
            ),
        )
        .into_bytes(),
        Some(Fault::LostResponse) => {
            forward().await?;
            error(
                "500 Internal Server Error",
                "InternalError",
                "An internal error has occurred.",
            )
            .into_bytes()
        }
        None => {
            let resp = forward().await?;
            match find(&resp, b"\r\n\r\n") {
                Some(i) => {
                    let mut out =
                        close_connection(&String::from_utf8_lossy(&resp[..i])).into_bytes();
                    out.extend_from_slice(&resp[i + 4..]);
                    out
                }
                None => resp,
            }
        }
    };
    client.write_all(&out).await?;
    client.shutdown().await?;
    Ok(())
}
