//! The client's side of the coordinator's HTTP API: one request, the
//! coordinator's refusals, several coordinator URLs tried in turn, and a
//! chat asked again while its agent moves.

use reqwest::Method;
use serde_json::{json, Value};

use super::Failure;

pub(super) struct Api {
    /// The coordinators' URLs; a request goes to the one that answered
    /// last, and to the next while one cannot be reached.
    bases: Vec<String>,
    current: std::cell::Cell<usize>,
    token: Option<String>,
    http: reqwest::Client,
}

/// An error answer of the coordinator.
pub(super) struct Refusal {
    status: u16,
    code: String,
    /// `Retry-After`, in seconds.
    retry_after: Option<u64>,
    message: String,
}

impl Refusal {
    /// The agent is between nodes or its node is briefly busy: asking again
    /// shortly is likely to work.
    pub(super) fn is_transient(&self) -> bool {
        self.status == 503
            && self.retry_after.is_some()
            && matches!(
                self.code.as_str(),
                "released"
                    | "shutting_down"
                    | "agent_not_assigned"
                    | "fenced"
                    | "ollama_busy"
                    | "stopping"
                    | "no_broker"
            )
    }
}

impl Api {
    /// The API at `coordinators` (URLs, comma separated), with `token`.
    pub(super) fn new(coordinators: &str, token: Option<String>) -> Result<Api, Failure> {
        let bases: Vec<String> = coordinators
            .split(',')
            .map(|b| b.trim().to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if let Some(bad) = bases
            .iter()
            .find(|b| !(b.starts_with("http://") || b.starts_with("https://")))
        {
            return Err(Failure::usage(format!(
                "--coordinator (or PIFLEET_COORDINATOR): {bad:?} is not an http:// or https:// URL"
            )));
        }
        if bases.is_empty() {
            return Err(Failure::usage(
                "--coordinator (or PIFLEET_COORDINATOR) names no URL",
            ));
        }
        // A coordinator host that is off drops the connection attempt: the
        // next URL is tried after this, not after the kernel's two minutes.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(3))
            .build()
            .map_err(|e| Failure::runtime(&e))?;
        Ok(Api {
            bases,
            current: std::cell::Cell::new(0),
            token,
            http,
        })
    }

    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        match self.request(method, path, body).await? {
            Ok(value) => Ok(value),
            Err(refusal) => Err(Failure {
                code: 1,
                message: refusal.message,
            }),
        }
    }

    /// Sends one request: Err if the coordinator cannot be reached, Ok(Err)
    /// if it refused.
    pub(super) async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Result<Value, Refusal>, Failure> {
        Ok(match self.send(method, path, body).await? {
            Ok(response) => {
                let text = response.text().await.unwrap_or_default();
                Ok(serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": text})))
            }
            Err(refusal) => Err(refusal),
        })
    }

    /// Sends one request: the response if it succeeded (its body not read
    /// yet), the refusal if not.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Result<reqwest::Response, Refusal>, Failure> {
        self.try_send(method, path, body)
            .await
            .map_err(|e| self.unreachable(&e))
    }

    pub(super) fn unreachable(&self, e: &reqwest::Error) -> Failure {
        Failure {
            code: 1,
            message: format!(
                "cannot reach the coordinator at {}: {}\n(is `pifleet up` or `pifleet coordinator` running? set --coordinator or PIFLEET_COORDINATOR)",
                self.bases.join(", "),
                root_cause(e)
            ),
        }
    }

    /// [`Api::send`], with the transport's own error. Where no connection
    /// could be made (the request was not sent), the next coordinator is
    /// asked, each once; an error after the request left is returned as it
    /// is (the coordinator may have acted on it).
    pub(super) async fn try_send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Result<reqwest::Response, Refusal>, reqwest::Error> {
        let first = self.current.get();
        let mut tried = 0;
        let response = loop {
            let at = (first + tried) % self.bases.len();
            let url = format!("{}{path}", self.bases[at].trim_end_matches('/'));
            let mut request = self.http.request(method.clone(), &url);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    self.current.set(at);
                    break response;
                }
                Err(e) if e.is_connect() && tried + 1 < self.bases.len() => tried += 1,
                Err(e) => return Err(e),
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        if status.is_success() {
            return Ok(Ok(response));
        }
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": text}));
        let error = value["error"].as_str().unwrap_or("request failed");
        let code = value["code"].as_str().unwrap_or("").to_owned();
        Ok(Err(Refusal {
            status: status.as_u16(),
            message: format!("{error} ({code}, HTTP {})", status.as_u16()),
            code,
            retry_after,
        }))
    }

    /// A chat, asked again while the agent is between nodes, for up to
    /// `wait`: the response, its body (the answer, or its stream) unread.
    pub(super) async fn chat(
        &self,
        body: Value,
        wait: std::time::Duration,
    ) -> Result<reqwest::Response, Failure> {
        let give_up = std::time::Instant::now() + wait;
        loop {
            let refusal = match self
                .try_send(Method::POST, "/v1/chat", Some(body.clone()))
                .await
            {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(refusal)) => refusal,
                // No connection: a coordinator restarting (an upgrade) is
                // back within seconds, and the chat was not sent. A
                // connection that broke after the chat was sent is not
                // asked again: the turn may have run.
                Err(e) => {
                    let failure = self.unreachable(&e);
                    let pause = std::time::Duration::from_secs(1);
                    if !e.is_connect() || std::time::Instant::now() + pause > give_up {
                        return Err(failure);
                    }
                    eprintln!(
                        "pifleet: {}; asking again in 1s",
                        failure.message.lines().next().unwrap_or("")
                    );
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let pause =
                std::time::Duration::from_secs(refusal.retry_after.unwrap_or(1).clamp(1, 5));
            if !refusal.is_transient() || std::time::Instant::now() + pause > give_up {
                return Err(Failure {
                    code: 1,
                    message: refusal.message,
                });
            }
            eprintln!(
                "pifleet: {}; asking again in {}s",
                refusal.message,
                pause.as_secs()
            );
            tokio::time::sleep(pause).await;
        }
    }
}

pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
