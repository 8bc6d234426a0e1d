//! The HTTP face of one simulated server: OpenAI-compatible endpoints,
//! `/metrics`, and the scheduler task that owns the [`Engine`].
//!
//! One task owns the engine: handlers send it their request over a channel
//! and get updates (scheduled, token, finished) back on their own channel,
//! so nothing on the hot path takes a lock. Simulated time is wall time
//! since start-up × `time_scale`; the scheduler sleeps until the wall
//! instant of the engine's next event, then advances it to "now".

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::{self, Engine, Event, Id, Nanos, Profile};
use crate::metrics::Metrics;
use crate::tokenize::{output_word, tokenize};

/// How one server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The base model's name (`model` of requests, `model_name` of metrics).
    pub model: String,
    /// Sent back as `x-upstream` on every response.
    pub name: Option<String>,
    /// Adapters requests may name.
    pub loras: Vec<String>,
    pub profile: Profile,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Output tokens when a request sets no `max_tokens`.
    pub default_output_tokens: usize,
    /// Adds `endpoint-load-metrics` (ORCA text form) to every response.
    pub load_report: bool,
    /// Output tokens per SSE event after the first (vLLM's `--stream-interval`).
    pub stream_interval: usize,
}

/// What the scheduler tells one request's handler.
#[derive(Debug)]
enum Update {
    Scheduled { cached_tokens: usize },
    Tokens { count: usize },
    Finished,
}

struct Submit {
    request: engine::Request,
    updates: mpsc::UnboundedSender<Update>,
}

struct Inputs {
    config: Config,
    metrics: Metrics,
    submit: mpsc::UnboundedSender<Submit>,
}

/// A bound server; [`Server::run`] serves until the process ends.
pub struct Server {
    listener: TcpListener,
    inputs: Arc<Inputs>,
    scheduler: Option<(Engine, mpsc::UnboundedReceiver<Submit>)>,
}

impl Server {
    /// Binds `addr` (port 0 picks one).
    pub async fn bind(addr: SocketAddr, config: Config) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let metrics = Metrics::new(
            &config.model,
            config.profile.block_size,
            config.profile.kv_blocks,
            config.profile.max_loras,
        );
        let (submit, submissions) = mpsc::unbounded_channel();
        let engine = Engine::new(config.profile.clone());
        Ok(Server {
            listener,
            inputs: Arc::new(Inputs {
                config,
                metrics,
                submit,
            }),
            scheduler: Some((engine, submissions)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections (HTTP/1.1 and h2c) and runs the scheduler.
    pub async fn run(mut self) -> std::io::Result<()> {
        if let Some((engine, submissions)) = self.scheduler.take() {
            tokio::spawn(schedule(engine, submissions, self.inputs.clone()));
        }
        loop {
            let (stream, _) = self.listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let inputs = self.inputs.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let inputs = inputs.clone();
                    async move { Ok::<_, Infallible>(handle(&inputs, req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended");
                }
            });
        }
    }
}

/// The scheduler: owns the engine, maps simulated to wall time.
async fn schedule(
    mut engine: Engine,
    mut submissions: mpsc::UnboundedReceiver<Submit>,
    inputs: Arc<Inputs>,
) {
    let scale = inputs.config.time_scale;
    let start = tokio::time::Instant::now();
    let now = || (start.elapsed().as_nanos() as f64 * scale) as Nanos;
    let wall = |at: Nanos| start + Duration::from_nanos((at as f64 / scale) as u64);
    let mut clients: std::collections::HashMap<Id, (mpsc::UnboundedSender<Update>, Nanos)> =
        Default::default();
    let mut next_id: Id = 0;
    let mut events = Vec::new();
    let mut gone = Vec::new();
    loop {
        let deadline = engine.next_event().map(wall);
        let mut incoming = Vec::new();
        tokio::select! {
            s = submissions.recv() => match s {
                Some(s) => incoming.push(s),
                None => return,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => {}
        }
        while let Ok(s) = submissions.try_recv() {
            incoming.push(s);
        }
        let t = now();
        engine.advance(t, &mut events);
        for s in incoming {
            next_id += 1;
            let id = next_id;
            match engine.submit(id, s.request, t, &mut events) {
                Ok(()) => {
                    clients.insert(id, (s.updates, t));
                }
                // Handlers check first; a rejection here just ends the stream.
                Err(e) => tracing::debug!(error = %e, "rejected"),
            }
        }
        // The gauges are set before any client hears of this step (and again
        // after aborts), so a response built on a finished request reports
        // the load after it.
        publish(&engine, &inputs.metrics);
        loop {
            let mut tokens: std::collections::HashMap<Id, usize> = Default::default();
            for event in events.drain(..) {
                match event {
                    Event::Scheduled {
                        id, cached_tokens, ..
                    } => {
                        if let Some((c, _)) = clients.get(&id) {
                            if c.send(Update::Scheduled { cached_tokens }).is_err() {
                                gone.push(id);
                            }
                        }
                    }
                    Event::Token { id, at, index } => {
                        if index == 0 {
                            if let Some((_, arrived)) = clients.get(&id) {
                                inputs
                                    .metrics
                                    .ttft
                                    .observe(at.saturating_sub(*arrived) as f64 / 1e9);
                            }
                        }
                        *tokens.entry(id).or_default() += 1;
                    }
                    Event::Finished { id, .. } => {
                        if let Some((c, _)) = clients.remove(&id) {
                            let n = tokens.remove(&id).unwrap_or(0);
                            if n > 0 {
                                let _ = c.send(Update::Tokens { count: n });
                            }
                            let _ = c.send(Update::Finished);
                        }
                    }
                }
            }
            for (id, count) in tokens {
                if let Some((c, _)) = clients.get(&id) {
                    if c.send(Update::Tokens { count }).is_err() {
                        gone.push(id);
                    }
                }
            }
            if gone.is_empty() {
                break;
            }
            for id in gone.drain(..) {
                clients.remove(&id);
                engine.abort(id, t, &mut events);
            }
            publish(&engine, &inputs.metrics);
        }
    }
}

/// Sets the gauges and counters from the engine's state.
fn publish(engine: &Engine, m: &Metrics) {
    m.waiting.set(engine.waiting() as f64);
    m.running.set(engine.running() as f64);
    m.kv_usage.set(engine.kv_usage());
    let c = engine.counters();
    let queries = c.prefix_queries.saturating_sub(m.prefix_queries.get());
    m.prefix_queries.inc_by(queries);
    let hits = c.prefix_hits.saturating_sub(m.prefix_hits.get());
    m.prefix_hits.inc_by(hits);
    m.set_loras(&engine.running_loras(), &engine.waiting_loras());
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(inputs: &Inputs, status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = response(inputs, status, "application/json");
    *r.body_mut() = full(value.to_string());
    r
}

fn response(inputs: &Inputs, status: StatusCode, content_type: &str) -> Response<Body> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    if let Some(name) = &inputs.config.name {
        builder = builder.header("x-upstream", name.as_str());
    }
    if inputs.config.load_report {
        let m = &inputs.metrics;
        builder = builder.header(
            "endpoint-load-metrics",
            format!(
                "TEXT named_metrics.kv_cache_usage_perc={:.4}, named_metrics.num_requests_waiting={}, named_metrics.num_requests_running={}",
                m.kv_usage.get(),
                m.waiting.get(),
                m.running.get()
            ),
        );
    }
    builder
        .body(full(Bytes::new()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// An OpenAI-shaped error.
fn error(inputs: &Inputs, status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    json_response(
        inputs,
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}}),
    )
}

fn bad_request(inputs: &Inputs, message: &str) -> Response<Body> {
    error(inputs, StatusCode::BAD_REQUEST, "BadRequestError", message)
}

async fn handle(inputs: &Arc<Inputs>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => response(inputs, StatusCode::OK, "text/plain"),
        (&Method::GET, "/metrics") => {
            let mut r = response(
                inputs,
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            );
            *r.body_mut() = full(inputs.metrics.encode());
            r
        }
        (&Method::GET, "/v1/models") => {
            let created = unix_now();
            let mut data = vec![
                json!({"id": inputs.config.model, "object": "model", "created": created, "owned_by": "vllm", "root": inputs.config.model, "parent": null}),
            ];
            for l in &inputs.config.loras {
                data.push(json!({"id": l, "object": "model", "created": created, "owned_by": "vllm", "root": l, "parent": inputs.config.model}));
            }
            json_response(
                inputs,
                StatusCode::OK,
                &json!({"object": "list", "data": data}),
            )
        }
        (&Method::POST, "/v1/chat/completions") => generate(inputs, req, Kind::Chat).await,
        (&Method::POST, "/v1/completions") => generate(inputs, req, Kind::Completion).await,
        _ => error(
            inputs,
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("no route for {} {path}", req.method()),
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A parsed generation request.
#[derive(Debug)]
struct Parsed {
    model: String,
    lora: Option<String>,
    tokens: Vec<u32>,
    output_tokens: usize,
    /// `max_tokens` was given: the stop is `length`.
    limited: bool,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
}

fn parse(config: &Config, kind: Kind, body: &Value) -> Result<Parsed, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let obj = body
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object".into()))?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`model` is required and must be a string".into()))?
        .to_string();
    let lora = if model == config.model {
        None
    } else if config.loras.contains(&model) {
        Some(model.clone())
    } else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
        ));
    };
    let text = match kind {
        Kind::Chat => {
            let messages = obj
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(
                    || bad("`messages` is required and must be a non-empty array".into()),
                )?;
            let mut text = String::new();
            for (i, m) in messages.iter().enumerate() {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("messages[{i}].role must be a string")))?;
                text.push_str("<|");
                text.push_str(role);
                text.push_str("|>\n");
                match m.get("content") {
                    Some(Value::String(s)) => text.push_str(s),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                text.push_str(t);
                                text.push(' ');
                            }
                        }
                    }
                    Some(Value::Null) | None => {}
                    Some(_) => {
                        return Err(bad(format!(
                            "messages[{i}].content must be a string or an array of parts"
                        )))
                    }
                }
                text.push('\n');
            }
            text.push_str("<|assistant|>\n");
            text
        }
        Kind::Completion => match obj.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            _ => return Err(bad("`prompt` is required and must be a string".into())),
        },
    };
    let tokens = tokenize(&text);
    let max = obj
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()));
    let (output_tokens, limited) = match max {
        None => (config.default_output_tokens.max(1), false),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => (n as usize, true),
            _ => {
                return Err(bad(format!(
                    "max_tokens must be a positive integer, got {v}"
                )))
            }
        },
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad(format!("`stream` must be a boolean, got {v}"))),
    };
    let options = obj.get("stream_options");
    let flag = |name: &str| {
        options
            .and_then(|o| o.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    if options.is_some_and(|o| !o.is_null()) && !stream {
        return Err(bad(
            "stream_options is only allowed with stream: true".into()
        ));
    }
    config
        .profile
        .check(tokens.len(), output_tokens)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Parsed {
        model,
        lora,
        tokens,
        output_tokens,
        limited,
        stream,
        include_usage: flag("include_usage"),
        continuous_usage: flag("continuous_usage_stats"),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

async fn generate(inputs: &Arc<Inputs>, req: Request<Incoming>, kind: Kind) -> Response<Body> {
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad_request(inputs, &format!("cannot read the request body: {e}")),
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return bad_request(inputs, &format!("the request body is not JSON: {e}")),
    };
    let p = match parse(&inputs.config, kind, &body) {
        Ok(p) => p,
        Err((status, message)) if status == StatusCode::NOT_FOUND => {
            return error(inputs, status, "NotFoundError", &message)
        }
        Err((_, message)) => return bad_request(inputs, &message),
    };
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let request = engine::Request {
        tokens: p.tokens.clone(),
        output_tokens: p.output_tokens,
        lora: p.lora.clone(),
    };
    if inputs
        .submit
        .send(Submit {
            request,
            updates: updates_tx,
        })
        .is_err()
    {
        return error(
            inputs,
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "the scheduler has stopped",
        );
    }
    let created = unix_now();
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        fastrand::u64(..)
    );
    let prompt_len = p.tokens.len();
    let finish = if p.limited { "length" } else { "stop" };
    if !p.stream {
        let mut cached = 0;
        let mut produced = 0;
        while let Some(u) = updates.recv().await {
            match u {
                Update::Scheduled { cached_tokens } => cached = cached_tokens,
                Update::Tokens { count } => produced += count,
                Update::Finished => break,
            }
        }
        let text: Vec<&str> = (0..produced).map(output_word).collect();
        let text = text.join(" ");
        let choice = match kind {
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return json_response(
            inputs,
            StatusCode::OK,
            &json!({"id": id, "object": object, "created": created, "model": p.model,
                "choices": [choice], "usage": usage(prompt_len, produced, cached)}),
        );
    }
    let (frames, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let model = p.model.clone();
    let (include_usage, continuous) = (p.include_usage, p.continuous_usage);
    let total = p.output_tokens;
    let interval = inputs.config.stream_interval.max(1);
    tokio::spawn(async move {
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut cached = 0;
        let mut produced = 0;
        let mut pending = 0;
        while let Some(u) = updates.recv().await {
            let count = match u {
                Update::Scheduled { cached_tokens } => {
                    cached = cached_tokens;
                    continue;
                }
                Update::Tokens { count } => count,
                Update::Finished => break,
            };
            // Tokens that came while the client was behind go out together,
            // and after the first, tokens go out `stream_interval` at a time.
            pending += count;
            let mut finished = false;
            while let Ok(u) = updates.try_recv() {
                match u {
                    Update::Tokens { count: more } => pending += more,
                    Update::Finished => finished = true,
                    Update::Scheduled { .. } => {}
                }
            }
            if produced > 0 && pending < interval && produced + pending < total && !finished {
                continue;
            }
            let count = std::mem::take(&mut pending);
            let words: Vec<&str> = (produced..produced + count).map(output_word).collect();
            let text = format!("{} ", words.join(" "));
            let first = produced == 0;
            produced += count;
            let reason = if produced >= total {
                Value::from(finish)
            } else {
                Value::Null
            };
            let choice = match kind {
                Kind::Chat => {
                    let delta = if first {
                        json!({"role": "assistant", "content": text})
                    } else {
                        json!({"content": text})
                    };
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
                }
                Kind::Completion => {
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
                }
            };
            let mut chunk = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
            if continuous {
                chunk["usage"] = usage(prompt_len, produced, cached);
            }
            if frames
                .send(Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n")))))
                .await
                .is_err()
            {
                return; // the client went away; dropping `updates` aborts it
            }
            if finished {
                break;
            }
        }
        if include_usage {
            let chunk = json!({"id": id, "object": object, "created": created, "model": model,
                "choices": [], "usage": usage(prompt_len, produced, cached)});
            let _ = frames
                .send(Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n")))))
                .await;
        }
        let _ = frames
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    let mut r = response(inputs, StatusCode::OK, "text/event-stream");
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    *r.body_mut() = StreamBody::new(ReceiverStream::new(rx)).boxed();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            model: "base".into(),
            name: None,
            loras: vec!["a".into()],
            profile: Profile::default(),
            time_scale: 1.0,
            default_output_tokens: 16,
            load_report: false,
            stream_interval: 1,
        }
    }

    #[test]
    fn requests_are_parsed_and_bad_ones_get_a_reason() {
        let c = config();
        let ok = parse(
            &c,
            Kind::Chat,
            &json!({"model": "a", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(ok.lora.as_deref(), Some("a"));
        assert_eq!(ok.output_tokens, 5);
        assert!(ok.stream && ok.include_usage && ok.limited);
        let e = |body: Value, kind| parse(&c, kind, &body).unwrap_err();
        assert_eq!(
            e(
                json!({"model": "zz", "messages": [{"role": "user", "content": "x"}]}),
                Kind::Chat
            )
            .0,
            StatusCode::NOT_FOUND
        );
        assert!(e(json!({"model": "base"}), Kind::Chat)
            .1
            .contains("messages"));
        assert!(e(json!({"model": "base", "prompt": 3}), Kind::Completion)
            .1
            .contains("prompt"));
        assert!(e(
            json!({"model": "base", "prompt": "x", "max_tokens": 0}),
            Kind::Completion
        )
        .1
        .contains("max_tokens"));
        assert!(e(
            json!({"model": "base", "prompt": "x", "max_tokens": 1000000}),
            Kind::Completion
        )
        .1
        .contains("KV cache blocks"));
    }
}
