//! `GET /api/v1/cluster`: the fleet as Redis knows it (every node's last heartbeat), or this
//! node alone when it runs without `[cluster]` or cannot reach Redis now; with it, the
//! operator suspensions every node keeps.

use super::*;

pub(super) async fn cluster(State(ctx): State<Arc<Context>>) -> Json<Value> {
    let me = this_node(&ctx);
    let Some(cluster) = &ctx.cluster else {
        return Json(json!({"node": me["node"], "redis": null, "nodes": [me]}));
    };
    let health = cluster.health().borrow().clone();
    match cluster.fleet().await {
        Ok(nodes) => Json(json!({
            "node": me["node"],
            "redis": "up",
            "nodes_seen": health.nodes_seen,
            "nodes": nodes,
            "suspensions": shared_suspensions(cluster).await,
        })),
        Err(why) => Json(json!({
            "node": me["node"],
            "redis": "degraded",
            "error": why,
            "nodes_seen": health.nodes_seen,
            "nodes": [me],
        })),
    }
}

/// The operator suspensions every node keeps: `[{destination, until}]`, soonest to end first.
async fn shared_suspensions(cluster: &baton_cluster::Cluster) -> Value {
    let listed = cluster.suspensions().await.unwrap_or_default();
    Value::Array(
        listed
            .into_iter()
            .map(|s| {
                let until = i64::try_from(s.until_ms)
                    .ok()
                    .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                    .map(|t| t.to_string());
                json!({"destination": s.destination, "until": until})
            })
            .collect(),
    )
}

/// This node's own figures, as its heartbeat would give them.
fn this_node(ctx: &Context) -> Value {
    let t = baton_events::metrics::totals();
    let name = ctx
        .config
        .cluster
        .as_ref()
        .map_or(ctx.config.hostname.as_str(), |c| c.node.as_str());
    json!({
        "node": name,
        "version": env!("CARGO_PKG_VERSION"),
        "last_seen": jiff::Timestamp::now().round(jiff::Unit::Millisecond).ok().map(|t| t.to_string()),
        "queue": t.queue,
        "connections_in": t.connections_in,
        "connections_out": t.connections_out,
        "alive": true,
    })
}
