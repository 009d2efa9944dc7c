//! The sink of every scenario: a loopback HTTP receiver that answers 202 at
//! once and records when each CloudEvent arrived (wall clock, taken before
//! the body is read further than axum already has).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};

/// One event as it arrived.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: DateTime<Utc>,
    pub id: String,
    pub r#type: String,
    /// Our events: the `taskrunuid` extension. Tekton's: from the body.
    pub taskrun_uid: String,
    /// Our events: the subject (the step's name).
    pub step: String,
}

#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Arrival>>>);

impl Received {
    pub fn snapshot(&self) -> Vec<Arrival> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or_default()
    }

    fn push(&self, arrival: Arrival) {
        if let Ok(mut v) = self.0.lock() {
            v.push(arrival);
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn receive(
    axum::extract::State(received): axum::extract::State<Received>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Utc::now();
    let r#type = header(&headers, "ce-type");
    let mut taskrun_uid = header(&headers, "ce-taskrunuid");
    if taskrun_uid.is_empty() && r#type.starts_with("dev.tekton.event.taskrun.") {
        // Tekton's own events carry the TaskRun in the body.
        taskrun_uid = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["taskRun"]["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_default();
    }
    received.push(Arrival {
        at,
        id: header(&headers, "ce-id"),
        r#type,
        taskrun_uid,
        step: header(&headers, "ce-subject"),
    });
    StatusCode::ACCEPTED
}

/// Starts the receiver on 127.0.0.1 (an OS-chosen port).
pub async fn start() -> anyhow::Result<(SocketAddr, Received)> {
    let received = Received::default();
    let app = Router::new()
        .fallback(post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the receiver stopped");
        }
    });
    Ok((addr, received))
}
