//! The `pods/portforward` subresource over WebSocket, the way the API
//! server (with the kubelet behind it) serves `kubectl port-forward` and
//! kube-rs's `Api::<Pod>::portforward`, but connecting to the pod's
//! `status.podIP` from the test's own network (tests put `127.0.0.1` there
//! and the port a real server listens on into the pod's spec).
//!
//! The subprotocol is `v4.channel.k8s.io`: binary frames whose first byte
//! is the channel; port N of the request (0-based) uses channel 2N for data
//! and 2N+1 for errors, and the first frame the server sends on each of
//! them is the port number, 2 bytes little-endian. A connection the pod
//! refuses is reported as text on the error channel, then the socket
//! closes, as the kubelet does.
//!
//! As strict as the real one where a client could go wrong: a missing pod
//! is 404, a pod that is not Running or has no IP 400, no port or a bad
//! one 400; a request that is not a WebSocket upgrade (version 13, with a
//! key) or does not offer `v4.channel.k8s.io` is 400 (the fake speaks no
//! SPDY); a client that writes on an error channel or an unknown channel,
//! or sends text frames, is cut off.

use std::net::IpAddr;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::FakeApi;
use super::semantics::parse_query;

/// The only subprotocol the fake speaks.
pub const PROTOCOL: &str = "v4.channel.k8s.io";

fn refuse(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// Answers `GET .../namespaces/NS/pods/NAME/portforward?ports=...`.
pub(crate) fn serve(
    api: &FakeApi,
    namespace: &str,
    name: &str,
    query: &str,
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
) -> Response {
    let Some(pod) = api.get("v1/pods", namespace, name) else {
        return refuse(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    if phase != "Running" {
        return refuse(
            400,
            "BadRequest",
            &format!("unable to upgrade connection: pod {name} is not running (phase {phase:?})"),
        );
    }
    let Some(ip) = pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse::<IpAddr>().ok())
    else {
        return refuse(
            400,
            "BadRequest",
            &format!("unable to upgrade connection: pod {name} has no IP"),
        );
    };
    let mut ports = Vec::new();
    for (key, value) in parse_query(query) {
        if key != "ports" {
            continue;
        }
        for port in value.split(',') {
            match port.trim().parse::<u16>() {
                Ok(p) if p > 0 => ports.push(p),
                _ => {
                    return refuse(
                        400,
                        "BadRequest",
                        &format!("invalid port {port:?}: must be 1-65535"),
                    );
                }
            }
        }
    }
    if ports.is_empty() {
        return refuse(400, "BadRequest", "at least one port is required (?ports=)");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| k.to_str().ok());
    let websocket = header_has(headers, header::UPGRADE, "websocket")
        && header_has(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let (Some(key), true, Some(upgrade)) = (key, websocket, upgrade) else {
        return refuse(
            400,
            "BadRequest",
            "upgrade to a WebSocket (version 13) required; the fake speaks no SPDY",
        );
    };
    if !header_has(headers, header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL) {
        return refuse(
            400,
            "BadRequest",
            &format!("the client offers no subprotocol the server speaks ({PROTOCOL})"),
        );
    }
    let accept = derive_accept_key(key.as_bytes());
    let pod_name = name.to_string();
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            forward(socket, &pod_name, ip, &ports).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| refuse(500, "InternalError", "building the upgrade response"))
}

/// A frame on `channel`.
fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(Bytes::from(bytes))
}

/// Moves bytes between the WebSocket and one TCP connection per port until
/// either side ends.
async fn forward<S>(socket: WebSocketStream<S>, pod: &str, ip: IpAddr, ports: &[u16])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut incoming) = socket.split();
    let (to_client, mut outgoing) = mpsc::channel::<(u8, Option<Vec<u8>>)>(16);
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut open = 0;
    for (i, port) in ports.iter().enumerate() {
        let data = (2 * i) as u8;
        let header = port.to_le_bytes();
        if sink.send(frame(data, &header)).await.is_err()
            || sink.send(frame(data + 1, &header)).await.is_err()
        {
            return;
        }
        match TcpStream::connect((ip, *port)).await {
            Ok(tcp) => {
                let (mut reader, writer) = tcp.into_split();
                writers.push(Some(writer));
                open += 1;
                let to_client = to_client.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match reader.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = to_client.send((data, None)).await;
                                return;
                            }
                            Ok(n) => {
                                if to_client
                                    .send((data, Some(buf[..n].to_vec())))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let message = format!(
                    "error forwarding port {port} to pod {pod}: failed to connect to {ip}:{port}: {e}"
                );
                if sink
                    .send(frame(data + 1, message.as_bytes()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    drop(to_client);
    while open > 0 {
        tokio::select! {
            message = incoming.next() => {
                let bytes = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // Close, an error, text frames (not this protocol): done.
                    _ => break,
                };
                let Some((&channel, data)) = bytes.split_first() else { continue };
                let index = usize::from(channel / 2);
                if channel % 2 == 1 || index >= writers.len() {
                    break; // writing on an error channel or an unknown one
                }
                if let Some(writer) = writers[index].as_mut()
                    && writer.write_all(data).await.is_err()
                {
                    writers[index] = None;
                }
            }
            Some((channel, data)) = outgoing.recv() => match data {
                Some(data) => {
                    if sink.send(frame(channel, &data)).await.is_err() {
                        break;
                    }
                }
                None => open -= 1,
            },
        }
    }
    for writer in writers.iter_mut().flatten() {
        let _ = writer.shutdown().await;
    }
    let _ = sink.send(Message::Close(None)).await;
}
