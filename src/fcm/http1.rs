//! HTTP/1.1 connections of the pool, for an FCM endpoint that speaks nothing newer: a mock
//! server, a proxy, a TLS front end that agrees only to `http/1.1` by ALPN.
//!
//! hyper's HTTP/1.1 client connection carries one request at a time, so the pool gives each
//! connection to one request at a time and keeps a bounded number of them alive. A request
//! hyper never wrote (the connection had closed, e.g. the server dropped an idle keep-alive
//! connection) is sent again on another connection, as a refused HTTP/2 stream is; one whose
//! connection died after it was written has an unknown fate and goes to the retry policy.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request, Response, Uri, header};
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::exchange::{Answer, Failure, retry_after};

/// A request body sent in one piece.
pub(super) struct Payload(Option<Bytes>);

impl Body for Payload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |data| data.len() as u64))
    }
}

pub(super) type SendRequest = http1::SendRequest<Payload>;
pub(super) type Connection<T> = http1::Connection<TokioIo<T>, Payload>;

/// The client half of a new connection, and the connection itself: a future to drive until
/// it ends (the server closed it, or the client half was dropped).
pub(super) async fn handshake<T>(io: T) -> Result<(SendRequest, Connection<T>), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))
}

/// Why a probe got no HTTP/1.1 answer.
pub(super) struct NoAnswer {
    pub(super) reason: String,
    /// The server sent something, and it was not HTTP/1.1 (rather than closing or resetting
    /// the connection, or staying silent).
    pub(super) not_http: bool,
}

/// Whether the other end answers HTTP/1.1: `OPTIONS *`, which asks a server about itself and
/// touches no resource. Any status is an answer. The connection stays open for requests.
pub(super) async fn probe(send: &mut SendRequest, authority: &str) -> Result<u16, NoAnswer> {
    let no_answer = |e: hyper::Error| NoAnswer {
        not_http: e.is_parse() || e.is_parse_status(),
        reason: describe(e),
    };
    let host = HeaderValue::from_str(authority).map_err(|e| NoAnswer {
        reason: format!("host {authority}: {e}"),
        not_http: false,
    })?;
    let mut request = Request::new(Payload(None));
    *request.method_mut() = axum::http::Method::OPTIONS;
    *request.uri_mut() = Uri::from_static("*");
    request.headers_mut().insert(header::HOST, host);
    let response = send.send_request(request).await.map_err(no_answer)?;
    let status = response.status().as_u16();
    read_to_end(response.into_body()).await.map_err(no_answer)?;
    Ok(status)
}

/// One request and its answer on a connection no other request is using.
pub(super) async fn exchange(
    send: &tokio::sync::Mutex<SendRequest>,
    head: Request<()>,
    body: Bytes,
) -> Result<Answer, Failure> {
    let mut send = send.lock().await;
    // Ready once the previous answer was read to its end; a closed connection never is, and
    // the request was not written.
    send.ready().await.map_err(|e| Failure {
        reason: describe(e),
        unprocessed: true,
        connection_gone: true,
    })?;
    let response = send
        .try_send_request(origin_form(head, body))
        .await
        .map_err(|mut e| Failure {
            // The request comes back only when hyper never wrote it.
            unprocessed: e.take_message().is_some(),
            connection_gone: true,
            reason: describe(e.into_error()),
        })?;
    answer(response).await.map_err(|e| Failure {
        reason: describe(e),
        unprocessed: false,
        connection_gone: true,
    })
}

/// The request as HTTP/1.1 wants it: the path alone on the request line, the authority in
/// `Host`.
fn origin_form(head: Request<()>, body: Bytes) -> Request<Payload> {
    let (mut parts, ()) = head.into_parts();
    if let Some(authority) = parts.uri.authority()
        && !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = Uri::from(path.clone());
    }
    parts.version = axum::http::Version::HTTP_11;
    Request::from_parts(parts, Payload(Some(body)))
}

async fn answer(response: Response<Incoming>) -> Result<Answer, hyper::Error> {
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status.as_u16(),
        retry_after: retry_after(&parts.headers),
        body: read_to_end(body).await?,
    })
}

async fn read_to_end(mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut all = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            all.extend_from_slice(&data);
        }
    }
    Ok(all.freeze())
}

/// hyper's error with its cause ("connection error: connection reset by peer").
fn describe(e: hyper::Error) -> String {
    match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_out_in_origin_form_with_a_host() {
        let mut head = Request::new(());
        *head.uri_mut() = "http://127.0.0.1:8682/v1/projects/p/messages:send"
            .parse()
            .unwrap();
        let request = origin_form(head, Bytes::from_static(b"{}"));
        assert_eq!(request.uri(), "/v1/projects/p/messages:send");
        assert_eq!(request.headers()[header::HOST], "127.0.0.1:8682");
        assert_eq!(request.body().size_hint().exact(), Some(2));
    }
}
