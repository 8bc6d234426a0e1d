//! How the proxy reads HTTP/1.1 request heads: protocol detection from the
//! first bytes, then hyper's HTTP/1 server configured as the proxy's
//! listener configures it (`max_buf_size` 128 KiB), with the head classified
//! as the proxy classifies it. Never panics nor hangs; every request hyper
//! accepts is one httparse accepts with the same method and target; and the
//! framing rules the proxy relies on against request smuggling hold: two
//! different `content-length`s are refused, and `content-length` with
//! `transfer-encoding` ends the connection after that request.

#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use infermesh_proxy::classify::classify_head;
use infermesh_proxy::detect::{detect, H2_PREFACE};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `HTTP1_MAX_BUF` of proxy/src/listener.rs.
const HTTP1_MAX_BUF: usize = 128 * 1024;

/// hyper's default limit on the number of headers.
const MAX_HEADERS: usize = 100;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// (method, target) of each request hyper handed to the service.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

async fn serve(data: &[u8]) -> Vec<(String, String)> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let record = record.clone();
        async move {
            let content_type = request.headers().get(http::header::CONTENT_TYPE).cloned();
            let target = request.uri().to_string();
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            classify_head(request.method(), &path, content_type.as_ref());
            record
                .lock()
                .unwrap()
                .push((request.method().to_string(), target));
            let _ = request.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(HTTP1_MAX_BUF)
        .keep_alive(true)
        .serve_connection(TokioIo::new(server), service);
    let (mut read, mut write) = tokio::io::split(client);
    let _ = write.write_all(data).await;
    let _ = write.shutdown().await;
    let drain = async move {
        let mut sink = Vec::new();
        let _ = read.read_to_end(&mut sink).await;
    };
    let (_, _) = tokio::join!(connection, drain);
    let seen = seen.lock().unwrap().clone();
    seen
}

/// Parses the header values named `name` of a head that httparse accepted.
fn values<'a>(headers: &[httparse::Header<'a>], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
        .collect()
}

fn digits(value: &[u8]) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    // Detection settles once: more bytes never change a decision.
    let mut decided = None;
    for n in 0..=data.len().min(H2_PREFACE.len() + 8) {
        match (decided, detect(&data[..n])) {
            (None, found) => decided = found,
            (Some(before), now) => assert_eq!(Some(before), now, "detection changed at byte {n}"),
        }
    }

    let seen = runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(5), serve(data))
            .await
            .expect("hyper hung on a closed input")
    });
    let Some((method, target)) = seen.first() else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(data);
    assert!(
        matches!(status, Ok(httparse::Status::Complete(_))),
        "hyper accepted {method} {target} where httparse says {status:?}"
    );
    assert_eq!(request.method, Some(method.as_str()));
    // hyper re-renders the target: an authority-form or `*` target may
    // differ in form, and a fragment (not allowed in a request target, RFC
    // 9112 section 3.2) is dropped, from routing and forwarding alike.
    if let Some(path) = request.path.filter(|p| p.starts_with('/')) {
        let without_fragment = path.split('#').next().unwrap_or(path);
        assert_eq!(without_fragment, target.as_str());
    }

    let lengths: Vec<&[u8]> = values(request.headers, "content-length");
    let encodings = values(request.headers, "transfer-encoding");
    let parsed: Vec<Option<u64>> = lengths.iter().map(|v| digits(v)).collect();
    if encodings.is_empty()
        && parsed
            .iter()
            .flatten()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
    {
        panic!("a request with content-lengths {lengths:?} was accepted");
    }
    if !encodings.is_empty() && !lengths.is_empty() {
        assert_eq!(
            seen.len(),
            1,
            "content-length with transfer-encoding kept the connection: {seen:?}"
        );
    }
});
