//! Prometheus metrics at `/metrics` on a listener of their own (`--metrics-listen`), so that
//! they are never exposed on the public port by accident.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder (a process has one; tests start several servers), every series
/// labelled with `instance` (the first name given: a process is one instance).
fn handle(instance: &str) -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Histograms (not summaries), so that scrapes can be subtracted and summed across
            // instances. Bounds around what matters: a tick is 33 ms at 30 Hz.
            let ms = |v: &[f64]| v.iter().map(|m| m / 1000.0).collect::<Vec<f64>>();
            let handle = PrometheusBuilder::new()
                .add_global_label("instance", instance)
                .set_buckets_for_metric(
                    Matcher::Full("rallypoint_room_tick_seconds".into()),
                    &ms(&[0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0]),
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("rallypoint_room_tick_lateness_seconds".into()),
                    &ms(&[0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 50.0]),
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("rallypoint_room_input_to_snapshot_seconds".into()),
                    &ms(&[1.0, 5.0, 10.0, 20.0, 30.0, 32.0, 33.4, 34.4, 36.0, 40.0, 50.0, 70.0, 100.0, 200.0]),
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("rallypoint_webrtc_open_seconds".into()),
                    &ms(&[
                        2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0, 3000.0,
                    ]),
                )
                .ok()?
                .install_recorder()
                .ok()?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .clone()
}

/// Starts serving metrics on `addr`, labelled with `instance`.
pub async fn serve(addr: SocketAddr, instance: &str) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let Some(handle) = handle(instance) else { return Ok(()) };
    let app = Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}
