//! `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::leader::Leadership;
use super::metrics::Metrics;

/// Health as the probes see it.
#[derive(Debug, Default)]
pub struct Health {
    /// Every cache has seen its initial list.
    pub synced: AtomicBool,
    /// A reconcile ran to its end (plan made; applied unless dry run).
    pub reconciled: AtomicBool,
}

impl Health {
    /// Ready once the caches have synced and, on the leader, the first reconcile is done. A
    /// follower with synced caches is ready: it is a warm standby.
    pub fn ready(&self, leadership: &Leadership) -> bool {
        self.synced.load(Ordering::SeqCst)
            && (self.reconciled.load(Ordering::SeqCst) || !leadership.is_leader())
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    leadership: Leadership,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot accept a connection");
                continue;
            }
        };
        let health = health.clone();
        let leadership = leadership.clone();
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let health = health.clone();
            let leadership = leadership.clone();
            let metrics = metrics.clone();
            async move {
                let text = "text/plain; charset=utf-8";
                let r = match req.uri().path() {
                    "/healthz" | "/livez" => respond(StatusCode::OK, text, "ok\n".into()),
                    "/readyz" => {
                        if health.ready(&leadership) {
                            respond(StatusCode::OK, text, "ready\n".into())
                        } else {
                            respond(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n".into())
                        }
                    }
                    "/metrics" => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    ),
                    _ => respond(StatusCode::NOT_FOUND, text, "not found\n".into()),
                };
                Ok::<_, Infallible>(r)
            }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "http connection ended");
            }
        });
    }
}
