//! One connection to Redis as the rest of the crate uses it: to a single server (the first of
//! the URLs that answers) or to a Redis Cluster (the URLs are its seed nodes).
//!
//! Under Redis Cluster every key carries the prefix as a hash tag (`{baton}:...`, see
//! [`crate::ClusterConfig::prefix`]), so every key lives in one slot: scripts and pipelines
//! over several keys stay on one shard, and the client follows that slot across failovers.
//! Pub/sub needs no slot: a message published on any node of a Redis Cluster reaches the
//! subscribers of every node, so the subscription goes to the first seed that answers.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::ClusterConfig;

/// Longest wait for a connection or an answer.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to a single Redis or to a Redis Cluster; cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connects as `config` says: the client to subscribe with, and the connection for the rest.
pub(crate) async fn connect(config: &ClusterConfig) -> Result<(redis::Client, Conn), String> {
    let (client, mut single) = connect_single(&config.redis).await?;
    if !config.redis_cluster {
        if in_cluster_mode(&mut single).await {
            return Err(
                "this Redis runs in cluster mode (its keys spread over shards): set \
                        [cluster] redis_cluster = true"
                    .into(),
            );
        }
        return Ok((client, Conn::Single(single)));
    }
    let cluster = redis::cluster::ClusterClient::builder(config.redis.iter().map(String::as_str))
        .connection_timeout(TIMEOUT)
        .response_timeout(TIMEOUT)
        // Baton's link retries on its own (with backoff, degraded meanwhile): a command that
        // fails twice is an error at once, not after the crate's sixteen tries.
        .retries(1)
        .build()
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(TIMEOUT * 2, cluster.get_async_connection())
        .await
        .map_err(|_| format!("no Redis Cluster within {} s", TIMEOUT.as_secs() * 2))?
        .map_err(|e| format!("Redis Cluster: {e}"))?;
    Ok((client, Conn::Cluster(conn)))
}

/// Connects to the first URL that answers.
async fn connect_single(urls: &[String]) -> Result<(redis::Client, MultiplexedConnection), String> {
    let mut why = String::from("no redis URL");
    for url in urls {
        let attempt = async {
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            // The crate's own limit on an answer is 500 ms; Baton's is TIMEOUT.
            let options = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(TIMEOUT))
                .set_connection_timeout(Some(TIMEOUT));
            let conn = client
                .get_multiplexed_async_connection_with_config(&options)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((client, conn))
        };
        match tokio::time::timeout(TIMEOUT, attempt).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => why = format!("{url}: {e}"),
            Err(_) => why = format!("{url}: no answer within {} s", TIMEOUT.as_secs()),
        }
    }
    Err(why)
}

/// Whether the server behind `conn` runs in cluster mode (`INFO cluster`; a server that does
/// not answer INFO, say an ACL forbids it, is taken as a single one).
async fn in_cluster_mode(conn: &mut MultiplexedConnection) -> bool {
    let info: Result<String, _> = redis::cmd("INFO").arg("cluster").query_async(conn).await;
    info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1"))
}
