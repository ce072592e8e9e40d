//! A real DNS server on a loopback UDP port, answering from a zone the test scripts: MX, A,
//! null MX, NXDOMAIN for unknown names, SERVFAIL on demand. Built on hickory-proto's wire
//! format; the server under test resolves through it with hickory-resolver.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, SOA, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

#[derive(Default)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    servfail: HashSet<String>,
    /// Names whose answers carry the AD bit, as a validating resolver's would (DNSSEC).
    secure: HashSet<String>,
    /// No answers at all (see `DnsServer::set_down`).
    down: bool,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    pub queries: Arc<AtomicUsize>,
    pub log: Arc<Mutex<Vec<String>>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind DNS socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (z, s, q, l) = (zone.clone(), stop.clone(), queries.clone(), log.clone());
        std::thread::spawn(move || serve(socket, z, s, q, l));
        DnsServer {
            addr,
            zone,
            stop,
            queries,
            log,
        }
    }

    /// The `[dns]` section that points the server under test here.
    pub fn config(&self) -> String {
        format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n",
            self.addr
        )
    }

    fn add(&self, name: &str, rtype: RecordType, data: RData) {
        self.zone
            .lock()
            .unwrap()
            .records
            .entry((key(name), rtype))
            .or_default()
            .push(data);
    }

    pub fn mx(&self, domain: &str, preference: u16, host: &str) {
        let exchange = Name::from_str(&format!("{}.", key(host))).unwrap();
        self.add(
            domain,
            RecordType::MX,
            RData::MX(MX::new(preference, exchange)),
        );
    }

    /// RFC 7505: a single MX of preference 0 pointing at the root.
    pub fn null_mx(&self, domain: &str) {
        self.add(domain, RecordType::MX, RData::MX(MX::new(0, Name::root())));
    }

    pub fn a(&self, host: &str, ip: &str) {
        let ip: Ipv4Addr = ip.parse().unwrap();
        self.add(host, RecordType::A, RData::A(A(ip)));
    }

    /// A TXT record; long text is split into 255-byte strings, as DNS requires.
    pub fn txt(&self, name: &str, text: &str) {
        let parts = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).to_string())
            .collect();
        self.add(name, RecordType::TXT, RData::TXT(TXT::new(parts)));
    }

    /// A TLSA record at `_PORT._tcp.HOST`.
    pub fn tlsa(&self, host: &str, port: u16, usage: u8, selector: u8, matching: u8, data: &[u8]) {
        let record = TLSA::new(
            usage.into(),
            selector.into(),
            matching.into(),
            data.to_vec(),
        );
        self.add(
            &format!("_{port}._tcp.{host}"),
            RecordType::TLSA,
            RData::TLSA(record),
        );
    }

    /// Answers for `name` say they were validated (the AD bit).
    pub fn secure(&self, name: &str) {
        self.zone.lock().unwrap().secure.insert(key(name));
    }

    pub fn servfail(&self, name: &str) {
        self.zone.lock().unwrap().servfail.insert(key(name));
    }

    /// While down, queries are read and dropped unanswered (the server gone: timeouts).
    pub fn set_down(&self, down: bool) {
        self.zone.lock().unwrap().down = down;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    socket: UdpSocket,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(request) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        if let Some(q) = request.queries.first() {
            log.lock()
                .unwrap()
                .push(format!("{} {}", q.name, q.query_type));
        }
        if zone.lock().unwrap().down {
            continue;
        }
        let response = answer(&request, &zone.lock().unwrap());
        match response.to_vec() {
            Ok(bytes) => {
                if let Err(e) = socket.send_to(&bytes, peer) {
                    log.lock().unwrap().push(format!("send error: {e}"));
                }
            }
            Err(e) => log.lock().unwrap().push(format!("encode error: {e}")),
        }
    }
}

fn answer(request: &Message, zone: &Zone) -> Message {
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(query) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    response.add_query(query.clone());
    if request.edns.is_some() {
        // EDNS (RFC 6891): answers above 512 bytes (DKIM keys) fit in one datagram.
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        response.set_edns(edns);
    }
    let name = key(&query.name.to_utf8());
    response.metadata.authentic_data =
        request.metadata.authentic_data && zone.secure.contains(&name);
    if zone.servfail.contains(&name) {
        response.metadata.response_code = ResponseCode::ServFail;
        return response;
    }
    match zone.records.get(&(name.clone(), query.query_type)) {
        Some(datas) => {
            for data in datas {
                response.add_answer(Record::from_rdata(query.name.clone(), 60, data.clone()));
            }
        }
        None => {
            let exists = zone.records.keys().any(|(n, _)| *n == name);
            response.metadata.response_code = if exists {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            // An SOA in the authority section makes the negative answer cacheable (RFC 2308).
            let zone_name = Name::from_str("test.").unwrap();
            let soa = SOA::new(
                Name::from_str("ns.test.").unwrap(),
                Name::from_str("hostmaster.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                60,
            );
            response.add_authority(Record::from_rdata(zone_name, 60, RData::SOA(soa)));
        }
    }
    response
}
