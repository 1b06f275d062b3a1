//! The gateway mounted in an application's own axum server (`axum::serve`), next to the
//! application's routes: the WebSocket upgrade, the API and the handle all work there too.
//! (axum's server wraps the socket, so this exercises the connection path for streams that
//! are not a plain `TcpStream`: split halves and an always-queued writer.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use wsgate_tests::{Client, Http, Received};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_mounted_in_an_axum_app_serves_websockets_api_and_handle() {
    let config = wsgate::Config::parse_args(["wsgate", "--key-prefix", "embedded"]).unwrap();
    let gateway = wsgate::Gateway::start(config).await.unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "my app" }))
        .merge(gateway.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let http = Http::new(addr);
    assert_eq!(
        http.get("/").send().await.unwrap().text().await.unwrap(),
        "my app"
    );
    let mut c = Client::connect(addr).await;
    c.join("embedded-topic").await;
    http.publish("embedded-topic", "via the API").await;
    assert_eq!(c.next_text().await, "via the API");
    gateway
        .publish("embedded-topic", wsgate::Message::binary(vec![1u8, 2]))
        .await
        .unwrap();
    assert_eq!(c.next().await, Received::Binary(vec![1, 2]));
    c.assert_alive().await;
    // Large messages cross the application's server in both directions.
    let big = "x".repeat(200_000);
    http.publish("embedded-topic", &big).await;
    assert_eq!(c.next_text().await, big);
    let id = wsgate::SocketId::parse(&c.socket_id).unwrap();
    assert!(gateway.is_connected(id));
    let (status, _) = http
        .post_json(
            "/api/disconnect",
            serde_json::json!({"socketId": c.socket_id}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(matches!(c.next().await, Received::Close(Some(1000), _)));
    http.wait_stats("closed", |s| s["connections"] == 0).await;
    server.abort();
}
