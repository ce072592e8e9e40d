//! A real redis-server (Debian's) on a free loopback port, with nothing saved to disk: the
//! cluster tests' shared store. Killed when dropped; `stop` and `start` again on the same port
//! play an outage. [`RedisCluster`]: three of them made a Redis Cluster by `redis-cli`.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the nodes of a test fleet share their state: its `[cluster]` lines.
pub trait Store {
    fn toml(&self) -> String;
}

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Every write fsynced to an append-only file: a kill and restart keeps the data.
    persistent: bool,
    /// A node of a Redis Cluster: the port of its cluster bus (by default port + 10,000,
    /// past 65,535 for a port from the ephemeral range).
    bus_port: Option<u16>,
}

impl Store for Redis {
    fn toml(&self) -> String {
        format!("redis = \"{}\"", self.url())
    }
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(false, None)
    }

    /// A Redis whose data outlives a kill (an outage of the network or the process, not of
    /// the disk).
    pub fn start_persistent() -> Redis {
        Self::start_with(true, None)
    }

    fn start_with(persistent: bool, bus_port: Option<u16>) -> Redis {
        let mut redis = Redis {
            port: super::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            persistent,
            bus_port,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .args(match self.bus_port {
                Some(bus) => vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-port".into(),
                    bus.to_string(),
                    // A primary silent for 1 s is failed over (15 s by default).
                    "--cluster-node-timeout".into(),
                    "1000".into(),
                ],
                None => vec![],
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs Debian's redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL: an outage, not a shutdown); what it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three primaries on loopback ports, each with `replicas` replicas, made
/// by `redis-cli --cluster create`; killed when dropped.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl Store for RedisCluster {
    fn toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("redis = [{}]\nredis_cluster = true", urls.join(", "))
    }
}

impl RedisCluster {
    pub fn start(replicas: usize) -> RedisCluster {
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| Redis::start_with(false, Some(super::free_port())))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools, which redis-server brings)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Up: every node sees the whole cluster, and every replica has its primary's data (a
        // replica that never synced cannot be failed over to).
        let up = |n: &Redis| {
            let synced = !n.cli(&["role"]).starts_with("slave")
                || n.cli(&["info", "replication"])
                    .contains("master_link_status:up");
            synced && n.cli(&["cluster", "info"]).contains("cluster_state:ok")
        };
        while !cluster.nodes.iter().all(up) {
            let states: Vec<String> = cluster.nodes.iter().map(|n| n.cli(&["role"])).collect();
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not come up: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Every key of every primary, with the port of the primary that holds it.
    pub fn keys(&self) -> Vec<(u16, String)> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && n.cli(&["role"]).starts_with("master"))
            .flat_map(|n| {
                let keys = n.cli(&["--scan"]);
                keys.lines()
                    .map(|k| (n.port, k.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Redis {
    /// What `redis-cli ARGS` prints against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
