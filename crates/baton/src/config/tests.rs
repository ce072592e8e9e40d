use super::*;

#[test]
fn webhook_events_are_event_kinds() {
    let hook = |events: &str| {
        Config::parse(&format!(
            "[[webhook]]\nurl = \"https://crm.example.com/hook\"\nsecret = \"0123456789abcdef\"\nevents = {events}\n"
        ))
    };
    let c = hook(r#"["delivery", "transient_failure", "operator"]"#).unwrap();
    use baton_events::EventKind;
    assert_eq!(
        c.webhooks[0].events,
        [
            EventKind::Delivery,
            EventKind::TransientFailure,
            EventKind::Operator
        ]
    );
    let errors = hook(r#"["delivery", "bounced"]"#).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].message, "unknown event type \"bounced\"");
    assert_eq!(
        errors[0].hint.as_deref(),
        Some(
            "types: reception, delivery, transient_failure, bounce, expiration, dsn_queued, \
             bounce_dropped, shaping, deleted, held, suppression, operator, complaint, \
             auto_reply, unsubscribe, cluster"
        )
    );
}

#[test]
fn defaults_are_loopback_mx_relay() {
    let c = Config::defaults();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].address.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.listeners[0].role, Role::Mx);
    assert!(
        c.relay
            .networks
            .iter()
            .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()))
    );
    assert_eq!(c.data_dir, PathBuf::from("./baton-data"));
    assert_eq!(c.limits.max_recipients, 100);
    assert!(c.spool.fsync);
}

#[test]
fn full_config() {
    let c = Config::parse(
        r#"
hostname = "mx.example.com"
data_dir = "/var/spool/baton"
[[listener]]
address = "127.0.0.1:25"
role = "mx"
[[listener]]
address = "[::1]:587"
role = "submission"
[relay]
local_domains = ["Example.com"]
networks = ["10.0.0.0/8", "192.0.2.7"]
[limits]
max_message_size = "10MB"
idle_timeout = "5m"
data_timeout = 60
"#,
    )
    .unwrap();
    assert_eq!(c.hostname, "mx.example.com");
    assert_eq!(c.listeners[1].role, Role::Submission);
    assert_eq!(c.relay.local_domains, vec!["example.com"]);
    assert_eq!(c.relay.networks.len(), 2);
    assert_eq!(c.limits.max_message_size, 10_000_000);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.limits.data_timeout, Duration::from_secs(60));
}

#[test]
fn every_semantic_error_is_reported_with_its_line() {
    let errors = Config::parse(
        "hostname = \"bad host\"\n[[listener]]\naddress = \"nowhere\"\nrole = \"smtp\"\n[relay]\nnetworks = [\"10.0.0.0/33\"]\n[limits]\nidle_timeout = \"5 parsecs\"\n",
    )
    .unwrap_err();
    let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![1, 3, 4, 6, 8], "{errors:?}");
    assert!(errors.iter().all(|e| e.hint.is_some()));
}

#[test]
fn unknown_key_and_syntax_errors() {
    let e = Config::parse("hostname = \"a.b\"\n[limits]\nmax_recipient = 5\n").unwrap_err();
    assert_eq!(e[0].line, 3);
    assert!(e[0].message.contains("max_recipient"), "{}", e[0].message);
    let e = Config::parse("hostname = \n").unwrap_err();
    assert_eq!(e[0].line, 1);
}

#[test]
fn list_unsubscribe_tenants_need_the_unsubscribe_url() {
    let e = Config::parse("[bounces]\nlist_unsubscribe_tenants = [\"acme\"]\n").unwrap_err();
    assert_eq!((e.len(), e[0].line), (1, 2), "{e:?}");
    assert!(e[0].message.contains("unsubscribe_url"), "{}", e[0].message);
    let c = Config::parse(
        "[bounces]\nunsubscribe_url = \"https://mail.example.com/\"\nlist_unsubscribe_tenants = [\"Acme\"]\n",
    )
    .unwrap();
    assert!(c.bounces.list_unsubscribe_tenants.contains("acme"));
    assert_eq!(
        c.bounces.unsubscribe_url.as_deref(),
        Some("https://mail.example.com")
    );
}

#[test]
fn cluster_takes_one_url_or_several_and_names_the_node() {
    assert!(Config::defaults().cluster.is_none());
    let c = Config::parse(
        "hostname = \"mx1.example.com\"\n[cluster]\nredis = \"redis://10.0.0.5:6379\"\n",
    )
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.redis, ["redis://10.0.0.5:6379"]);
    assert_eq!(cluster.node, "mx1.example.com", "the hostname by default");
    assert_eq!(cluster.heartbeat, Duration::from_secs(1));
    assert_eq!(
        (cluster.prefix.as_str(), cluster.fallback_nodes),
        ("baton", None)
    );
    let c = Config::parse(
        "[cluster]\nredis = [\"redis://a:6379\", \"redis+unix:///run/redis.sock\"]\nnode = \"n-2\"\n\
         heartbeat = \"2s\"\nfallback_nodes = 4\nprefix = \"fleet1\"\n",
    )
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.redis.len(), 2);
    assert_eq!(
        (cluster.node.as_str(), cluster.fallback_nodes),
        ("n-2", Some(4))
    );
    assert!(!cluster.redis_cluster);
    assert_eq!(cluster.prefix, "fleet1");
    // Under Redis Cluster the prefix is a hash tag: every key in one slot.
    let c = Config::parse(
        "[cluster]\nredis = [\"redis://a:7000\", \"redis://b:7000\"]\nredis_cluster = true\n\
         prefix = \"fleet1\"\n",
    )
    .unwrap();
    let cluster = c.cluster.unwrap();
    assert!(cluster.redis_cluster);
    assert_eq!(cluster.prefix, "{fleet1}");
    let e = Config::parse("[cluster]\nnode = \"a\"\n").unwrap_err();
    assert!(e[0].message.contains("needs redis"), "{e:?}");
    let e = Config::parse("[cluster]\nredis = \"http://a:6379\"\n").unwrap_err();
    assert_eq!(e[0].line, 2, "{e:?}");
    let e = Config::parse("[cluster]\nredis = \"redis://a\"\nnode = \"bad name\"\n").unwrap_err();
    assert_eq!(e[0].line, 3, "{e:?}");
}

#[test]
fn nats_export_has_defaults_and_checks_its_names() {
    assert!(Config::defaults().nats.is_none());
    let c =
        Config::parse("hostname = \"mx1.example.com\"\n[nats]\nurl = \"nats://10.0.0.7:4222\"\n")
            .unwrap();
    let nats = c.nats.unwrap();
    assert_eq!(nats.servers, ["nats://10.0.0.7:4222"]);
    assert_eq!(
        (
            nats.subject.as_str(),
            nats.stream.as_str(),
            nats.node.as_str()
        ),
        ("baton.events", "BATON_EVENTS", "mx1.example.com")
    );
    assert_eq!(nats.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!((nats.events.len(), nats.batch_size), (0, 100));
    // In a cluster, the node's cluster name.
    let c = Config::parse(
        "[cluster]\nredis = \"redis://a\"\nnode = \"n-2\"\n[nats]\nurl = [\"nats://a\", \"tls://b:4443\"]\n\
         subject = \"mail.events\"\nstream = \"MAIL\"\nmax_age = \"1d\"\nevents = [\"bounce\"]\n",
    )
    .unwrap();
    let nats = c.nats.unwrap();
    assert_eq!((nats.node.as_str(), nats.servers.len()), ("n-2", 2));
    assert_eq!(nats.events, [baton_events::EventKind::Bounce]);
    assert_eq!(nats.max_age, Duration::from_secs(86_400));
    for (bad, line) in [
        ("[nats]\nsubject = \"x\"\n", 0),
        ("[nats]\nurl = \"http://a:4222\"\n", 2),
        ("[nats]\nurl = \"nats://a\"\nsubject = \"a..b\"\n", 3),
        ("[nats]\nurl = \"nats://a\"\nsubject = \"a.>\"\n", 3),
        ("[nats]\nurl = \"nats://a\"\nstream = \"A.B\"\n", 3),
        ("[nats]\nurl = \"nats://a\"\nevents = [\"sent\"]\n", 3),
    ] {
        let e = Config::parse(bad).unwrap_err();
        assert_eq!(e[0].line, line, "{bad}: {e:?}");
    }
}

/// A listener with a certificate, a CA file and a DKIM key, none of which exist.
const MISSING_FILES: &str = "[[listener]]\naddress = \"127.0.0.1:2465\"\nrole = \"submissions\"\n\
    tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n\
    [delivery]\ntls_ca_file = \"/nonexistent/ca.pem\"\n\
    [[dkim]]\ndomain = \"X.test\"\nselector = \"k\"\nkey = \"/nonexistent/dkim.key\"\n";

#[test]
fn parsing_opens_no_file_and_check_files_reports_each_at_its_line() {
    let c = Config::parse(MISSING_FILES).unwrap();
    assert_eq!(
        c.listeners[0].tls,
        Some((
            PathBuf::from("/nonexistent/cert.pem"),
            PathBuf::from("/nonexistent/key.pem")
        ))
    );
    assert_eq!(
        c.delivery.tls_ca_file.as_deref(),
        Some(std::path::Path::new("/nonexistent/ca.pem"))
    );
    assert_eq!(c.dkim[0].domain, "x.test");
    let errors = c.check_files().unwrap_err();
    let at: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(at, [(4, 12), (7, 15), (11, 7)], "{errors:?}");
    for (error, file) in errors.iter().zip(["cert.pem", "ca.pem", "dkim.key"]) {
        assert!(
            error
                .message
                .starts_with(&format!("cannot read /nonexistent/{file}: ")),
            "{error}"
        );
    }
    assert_eq!(
        errors[0].hint.as_deref(),
        Some("tls_cert is the PEM chain (server certificate first), tls_key its PEM private key")
    );
    assert_eq!(
        errors[1].hint.as_deref(),
        Some("tls_ca_file is a PEM file of CA certificates")
    );
    assert_eq!(
        errors[2].hint.as_deref(),
        Some("make one with `baton dkim keygen DOMAIN SELECTOR`")
    );
    assert!(Config::defaults().check_files().is_ok());
}

#[test]
fn load_reports_file_problems_among_the_others_in_section_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // As before the file checks moved out of validation: within a section, in the order its
    // keys are checked (a listener's certificate before its trust_networks, the CA file
    // before mta_sts_port), and section after section.
    let text = "[[listener]]\naddress = \"127.0.0.1:2465\"\ntrust_networks = true\nrole = \"mx\"\n\
        tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n\
        [delivery]\nmta_sts_port = 0\ntls_ca_file = \"/nonexistent/ca.pem\"\n\
        [[dkim]]\ndomain = \"x.test\"\nselector = \"k\"\nkey = \"/nonexistent/dkim.key\"\n\
        [[webhook]]\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\"\n";
    std::fs::write(&path, text).unwrap();
    let validation = Config::parse(text).unwrap_err();
    let loaded = Config::load(&path).unwrap_err();
    assert_eq!(loaded.path.as_deref(), Some(path.as_path()));
    let lines = |errors: &[ConfigError]| errors.iter().map(|e| e.line).collect::<Vec<_>>();
    assert_eq!(lines(&validation), [3, 8, 15], "{validation:?}");
    assert_eq!(lines(&loaded.errors), [5, 3, 9, 8, 13, 15], "{loaded}");
}
