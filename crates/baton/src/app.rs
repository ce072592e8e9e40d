//! The composition root: `baton serve` builds every service here, once, in the order the data
//! flows backwards (spool and event log first, listeners last: once a client can connect,
//! everything it needs is up), and hands each consumer only the handles it uses:
//!
//! - the queue manager: config, spool, events, suppressions and delivery's [`Services`]
//!   (DKIM keys, resolver, shaper, trust store, MTA-STS cache);
//! - sessions ([`Reception`]): config, [`Intake`], their limits;
//! - the HTTP API ([`api::Context`]): config, [`Intake`], the queue handle, events,
//!   suppressions;
//! - webhooks: the event log and an HTTPS configuration from the trust store;
//! - the NATS export: the event log.
//!
//! Owns construction and wiring only; no service reaches back here for another.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use baton_events::Events;
use baton_spool::recover::Recovering;
use baton_spool::{Spool, SpoolOptions};
use baton_tls::trust::Trust;
use tokio::sync::mpsc::Receiver;
use tokio::sync::watch;

use crate::api;
use crate::backpressure::{Backpressure, Thresholds};
use crate::config::Config;
use crate::delivery::Services;
use crate::intake::Intake;
use crate::qmgr::QueueManager;
use crate::reception::Reception;
use crate::server;
use crate::suppression::Suppressions;

/// Builds everything and serves until `stop` turns true.
pub async fn serve(config: Config, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (spool, replay) = open_spool(&config)?;
    let config = Arc::new(config);
    let events = Events::start(&config.data_dir, config.events.clone())
        .context("cannot open the event log under data_dir/events")?;
    start_metrics();
    // One CA store (the system's certificates are read once) for delivery, MTA-STS and webhooks.
    let trust =
        Arc::new(Trust::load(config.delivery.tls_ca_file.as_deref()).map_err(anyhow::Error::msg)?);
    start_webhooks(&config, &events, &trust, stop.clone())?;
    baton_events::nats::start(
        config.nats.as_ref(),
        &config.data_dir,
        &events,
        stop.clone(),
    )
    .context("cannot start the NATS export")?;
    let mut fleet = crate::cluster::start(&config, &events);
    let suppressions =
        Arc::new(Suppressions::open(&config.data_dir).context("cannot read the suppression list")?);
    let tokens = Arc::new(crate::returns::token::Tokens::new(&bounce_key(&config)?));
    let returns = Arc::new(crate::returns::Returns::new(
        &config,
        tokens,
        suppressions.clone(),
        events.clone(),
    ));
    let limits = fleet.as_ref().map(crate::cluster::Fleet::limits);
    let services = delivery_services(&config, trust, returns.clone(), limits)?;
    let queue = QueueManager::start(
        config.clone(),
        spool.clone(),
        events.clone(),
        suppressions.clone(),
        services,
        fleet.as_ref().map(|f| f.out.clone()),
    )?;
    if let Some(fleet) = &mut fleet {
        fleet.join(&queue, &suppressions);
    }
    tokio::spawn({
        let queue = queue.clone();
        async move { queue.recover(replay).await }
    });
    crate::control::listen(&config.data_dir, queue.clone())?;
    let thresholds = Thresholds::new(
        config.spool.min_free_space,
        config.limits.max_message_size,
        config.spool.max_queued_recipients,
    );
    let backpressure = Backpressure::start(thresholds, &config.data_dir, queue.queued());
    let intake = Intake::new(spool, events.clone(), queue.clone(), suppressions.clone());
    // Listeners last: once a client can connect, the queue and the control socket are up.
    let http_listener = match &config.http {
        Some(http) => Some(api::bind(http).await?),
        None => None,
    };
    let listeners = server::bind(&config).await?;
    let reception = Arc::new(Reception::new(
        config.clone(),
        intake.clone(),
        backpressure.clone(),
        stop.clone(),
    )?);
    if let Some(listener) = http_listener {
        let ctx = api::Context {
            config,
            intake,
            queue,
            events,
            suppressions,
            backpressure,
            returns,
            cluster: fleet.map(|f| f.cluster),
        };
        api::serve(Arc::new(ctx), listener, stop.clone());
    }
    server::run(reception, listeners, stop).await;
    // A suppression the API acknowledged is in its file before the process ends.
    tokio::task::spawn_blocking(crate::suppression::flush_writes)
        .await
        .ok();
    Ok(())
}

/// Opens the spool for new mail; what it holds is replayed in the background.
fn open_spool(config: &Config) -> anyhow::Result<(Spool, Receiver<Recovering>)> {
    let options = SpoolOptions {
        fsync: config.spool.fsync,
        segment_size: config.spool.segment_size,
        ..SpoolOptions::default()
    };
    let spool_dir = config.data_dir.join("spool");
    let (spool, replay) = Spool::start(&spool_dir, options).with_context(|| {
        format!(
            "cannot open the spool at {} (check that data_dir exists and is writable)",
            spool_dir.display()
        )
    })?;
    tracing::info!(dir = %spool_dir.display(), "spool open; replaying what it holds");
    if !config.spool.fsync {
        tracing::warn!("spool fsync is off: acknowledged mail can be lost on power failure");
    }
    Ok((spool, replay))
}

/// Metrics are recorded from the start (they are read at GET /metrics), and sampled for the
/// dashboard's history.
fn start_metrics() {
    let _ = baton_events::metrics::handle();
    tokio::spawn(async {
        let mut tick = tokio::time::interval(baton_events::metrics::SAMPLE_EVERY);
        loop {
            tick.tick().await;
            baton_events::metrics::sample();
        }
    });
}

fn start_webhooks(
    config: &Config,
    events: &Events,
    trust: &Trust,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let https = if config.webhooks.iter().any(|w| w.url.starts_with("https:")) {
        trust
            .https_config()
            .map_err(|why| tracing::warn!(%why, "https webhooks cannot verify their receivers"))
            .ok()
    } else {
        None
    };
    baton_events::webhooks::start(&config.webhooks, &config.data_dir, events, https, stop)
        .context("cannot start the webhook senders")
}

/// What delivery uses: DKIM keys, the resolver, the shaper (with its warm-up ledger), the
/// trust store and the MTA-STS cache.
fn delivery_services(
    config: &Config,
    trust: Arc<Trust>,
    returns: Arc<crate::returns::Returns>,
    fleet: Option<Arc<dyn baton_shaping::fleet::FleetLimits>>,
) -> anyhow::Result<Services> {
    let mut dkim = HashMap::new();
    for d in &config.dkim {
        let key = crate::dkim::DkimKey::load(&d.domain, &d.selector, &d.key)
            .map_err(anyhow::Error::msg)?;
        dkim.insert(d.domain.clone(), key);
    }
    let mta_sts = if config.delivery.mta_sts {
        match trust.https_config() {
            Ok(https) => Some(baton_dns::mta_sts::MtaSts::new(
                https,
                config.delivery.mta_sts_port,
                config.delivery.connect_timeout,
                &config.data_dir,
            )),
            Err(why) => {
                tracing::warn!(%why, "MTA-STS is off: policies cannot be fetched");
                None
            }
        }
    } else {
        None
    };
    Ok(Services {
        dkim,
        dns: baton_dns::Dns::new(&config.dns)?,
        shaper: match fleet {
            Some(fleet) => shaper(config).with_fleet(fleet),
            None => shaper(config),
        },
        trust,
        mta_sts,
        returns,
    })
}

/// The key that signs return paths and unsubscribe links: `[bounces] secret`, else
/// `data_dir/bounces.key` (made on first start, readable by Baton's user only), so that
/// tokens stay valid across restarts.
fn bounce_key(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.bounces.secret {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = config.data_dir.join("bounces.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            // A new key would void every token already sent: a damaged one is an error.
            return match hex::decode(text.trim()) {
                Ok(key) if key.len() >= 16 => Ok(key),
                _ => anyhow::bail!(
                    "{} is not a key Baton wrote (hex, 16+ bytes): restore it, or delete it to make a new one (tokens already sent stop working)",
                    path.display()
                ),
            };
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot read {}", path.display()));
        }
        Err(_) => {}
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("no random numbers for data_dir/bounces.key"))?;
    crate::auth::write_private(&path, hex::encode(key).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key.to_vec())
}

/// The shaper, with the warm-up ledger in `data_dir` when a source has a warm-up plan.
fn shaper(config: &Config) -> baton_shaping::Shaper {
    let shaper = baton_shaping::Shaper::new(
        config.shaping.clone(),
        config.backoff.clone(),
        config.delivery.max_connections_per_destination,
    );
    let planned = config
        .pools
        .iter()
        .flat_map(|p| &p.sources)
        .any(|(s, _)| s.warmup.is_some());
    if !planned {
        return shaper;
    }
    let ledger = baton_shaping::warmup::Ledger::open(&config.data_dir.join("warmup.log"));
    shaper.with_ledger(Arc::new(ledger))
}
