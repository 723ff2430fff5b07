//! The node's DNS server: UDP and TCP on one address. Names in the cluster
//! zone are answered from memory; every other name is relayed, as asked,
//! to the node's own resolvers.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{LowerName, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::stats::DnsStats;
use super::zone::{Answer, Zone};

/// Queries relayed to the node's resolvers at once; more are refused
/// (SERVFAIL) and counted, so a flood of outside names cannot pile up.
const MAX_FORWARDS: usize = 1024;
/// How long one resolver has to answer before the next is tried.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP client silent this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP payload this server offers through EDNS (the DNS flag day's
/// size, which avoids IP fragmentation).
const UDP_PAYLOAD: u16 = 1232;

pub struct DnsServer {
    pub zone: Arc<RwLock<Zone>>,
    /// Bumped at every change of the zone: the answer caches start over.
    generation: AtomicU64,
    /// The node's resolvers, for names outside the zone.
    pub upstreams: Vec<SocketAddr>,
    pub stats: Arc<DnsStats>,
    forwards: Arc<Semaphore>,
}

/// What to do with one received query.
enum Handled {
    Reply(Vec<u8>),
    /// Relay it; if no resolver answers, SERVFAIL for the parsed query.
    Forward(Message),
    /// A follow-up query for a CNAME's target outside the zone, whose
    /// answers complete the CNAME (an ExternalName Service).
    Chase(Message, Message),
    Drop,
}

impl DnsServer {
    pub fn new(zone: Arc<RwLock<Zone>>, upstreams: Vec<SocketAddr>, stats: Arc<DnsStats>) -> Self {
        DnsServer {
            zone,
            generation: AtomicU64::new(0),
            upstreams,
            stats,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }

    /// Call after changing the zone.
    pub fn zone_changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn handle(&self, packet: &[u8], udp: bool) -> Handled {
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed.inc();
                // A header is enough to say what was wrong.
                return match packet {
                    [a, b, ..] if packet.len() >= 12 => {
                        let id = u16::from_be_bytes([*a, *b]);
                        let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                        self.reply(reply, None)
                    }
                    _ => Handled::Drop,
                };
            }
        };
        // Never answer an answer: that is how reflection loops start.
        if request.metadata.message_type != MessageType::Query {
            self.stats.malformed.inc();
            return Handled::Drop;
        }
        let mut response = response_to(&request);
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return self.reply(response, None);
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return self.reply(response, None);
        };
        let name = LowerName::new(query.name());
        let zone = self.zone.read().unwrap_or_else(|e| e.into_inner());
        let in_zone = zone.holds(&name);
        match zone.lookup(&name, query.query_type()) {
            Answer::Elsewhere => {
                drop(zone);
                return Handled::Forward(request);
            }
            Answer::Records(records) => {
                let cname_out = match records.as_slice() {
                    [only] if query.query_type() != RecordType::CNAME => match &only.data {
                        RData::CNAME(c) => Some(LowerName::new(&c.0)),
                        _ => None,
                    },
                    _ => None,
                }
                .filter(|target| !zone.holds(target));
                response.answers = records;
                response.metadata.authoritative = in_zone;
                if let Some(target) = cname_out {
                    drop(zone);
                    let mut chase = Message::query();
                    chase.metadata.recursion_desired = true;
                    chase.add_query(Query::query(target.into(), query.query_type()));
                    return Handled::Chase(response, chase);
                }
            }
            Answer::NoData => {
                response.metadata.authoritative = true;
                response.authorities.push(zone.soa().clone());
            }
            Answer::NxDomain => {
                response.metadata.authoritative = true;
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(zone.soa().clone());
            }
        }
        drop(zone);
        self.reply(response, udp.then(|| request.max_payload()))
    }

    /// Encode `response`, truncated (TC set, the client retries over TCP)
    /// when it exceeds the client's UDP size.
    fn reply(&self, mut response: Message, udp_limit: Option<u16>) -> Handled {
        self.stats.answered(response.metadata.response_code);
        let Ok(mut bytes) = response.to_vec() else {
            return Handled::Drop;
        };
        if let Some(limit) = udp_limit {
            if bytes.len() > usize::from(limit.min(UDP_PAYLOAD)) {
                response = response.truncate();
                match response.to_vec() {
                    Ok(b) => bytes = b,
                    Err(_) => return Handled::Drop,
                }
            }
        }
        Handled::Reply(bytes)
    }

    /// Ask the node's resolvers, in order, until one answers.
    async fn relay(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            let attempt = if tcp {
                tokio::time::timeout(FORWARD_TIMEOUT, relay_tcp(*upstream, query)).await
            } else {
                tokio::time::timeout(FORWARD_TIMEOUT, relay_udp(*upstream, query)).await
            };
            match attempt {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => tracing::debug!(%upstream, "resolver failed: {e}"),
                Err(_) => tracing::debug!(%upstream, "resolver timed out"),
            }
        }
        None
    }

    /// Finish a query that needs the node's resolvers.
    async fn resolve(&self, handled: Handled, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
        match handled {
            Handled::Reply(bytes) => Some(bytes),
            Handled::Drop => None,
            Handled::Forward(request) => {
                self.stats.forwarded.inc();
                if let Some(answer) = self.relay(packet, !udp).await {
                    self.stats.answered_raw(&answer);
                    return Some(answer);
                }
                self.stats.forward_failures.inc();
                let mut failed = response_to(&request);
                failed.queries = request.queries;
                failed.metadata.response_code = ResponseCode::ServFail;
                match self.reply(failed, None) {
                    Handled::Reply(bytes) => Some(bytes),
                    _ => None,
                }
            }
            Handled::Chase(mut response, chase) => {
                self.stats.forwarded.inc();
                let answer = match chase.to_vec() {
                    Ok(q) => self.relay(&q, !udp).await,
                    Err(_) => None,
                };
                match answer.and_then(|a| Message::from_vec(&a).ok()) {
                    Some(a) => {
                        response.answers.extend(a.answers);
                        response.metadata.response_code = a.metadata.response_code;
                    }
                    None => {
                        self.stats.forward_failures.inc();
                        response.metadata.response_code = ResponseCode::ServFail;
                    }
                }
                let limit = udp.then_some(UDP_PAYLOAD);
                match self.reply(response, limit) {
                    Handled::Reply(bytes) => Some(bytes),
                    _ => None,
                }
            }
        }
    }
}

/// The response header and question for `request`, EDNS when it used EDNS.
fn response_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.recursion_available = true;
    response.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        response.edns = Some(edns);
    }
    response
}

async fn relay_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    // A socket per query: a random port, and only the resolver's answers.
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn relay_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// One length-prefixed message; None at a clean end of stream.
async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// A UDP socket on `addr` that can share the port with the server's other
/// workers, bound even before the address exists (the pod bridge comes up
/// with the node's first pod).
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = raw_socket(addr, socket2::Type::DGRAM, socket2::Protocol::UDP)?;
    socket.set_reuse_port(true)?;
    // Bursts of queries wait in the socket instead of being dropped.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = raw_socket(addr, socket2::Type::STREAM, socket2::Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn raw_socket(
    addr: SocketAddr,
    kind: socket2::Type,
    protocol: socket2::Protocol,
) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Answers already encoded, keyed by the query's bytes after its ID: the
/// same question asked again is answered by a copy, without parsing. One
/// per UDP worker, so no lock; emptied when the zone changes or it fills.
#[derive(Default)]
struct AnswerCache {
    generation: u64,
    answers: HashMap<Box<[u8]>, Box<[u8]>>,
}

const CACHED_ANSWERS: usize = 16_384;

impl AnswerCache {
    /// The answer to `query`, its ID set, into `out`.
    fn answer(&mut self, query: &[u8], generation: u64, out: &mut Vec<u8>) -> bool {
        if generation != self.generation {
            self.answers.clear();
            self.generation = generation;
            return false;
        }
        let Some(answer) = query.get(2..).and_then(|key| self.answers.get(key)) else {
            return false;
        };
        out.clear();
        out.extend_from_slice(&query[..2]);
        out.extend_from_slice(answer);
        true
    }

    fn keep(&mut self, query: &[u8], answer: &[u8], generation: u64) {
        if generation != self.generation || query.len() < 12 || answer.len() < 12 {
            return;
        }
        if self.answers.len() >= CACHED_ANSWERS {
            self.answers.clear();
        }
        self.answers.insert(query[2..].into(), answer[2..].into());
    }
}

/// Answer queries on `socket` until `shutdown`.
pub async fn serve_udp(
    socket: Arc<UdpSocket>,
    server: Arc<DnsServer>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 65535];
    let mut cache = AnswerCache::default();
    let mut out = Vec::with_capacity(512);
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("dns: receiving: {e}");
                    continue;
                }
            },
        };
        let packet = &buf[..n];
        let generation = server.generation.load(Ordering::Acquire);
        if cache.answer(packet, generation, &mut out) {
            server.stats.answered_raw(&out);
            let _ = socket.send_to(&out, peer).await;
            continue;
        }
        match server.handle(packet, true) {
            Handled::Reply(bytes) => {
                let _ = socket.send_to(&bytes, peer).await;
                cache.keep(packet, &bytes, generation);
            }
            Handled::Drop => {}
            slow => {
                let Ok(permit) = server.forwards.clone().try_acquire_owned() else {
                    server.stats.dropped.inc();
                    continue;
                };
                let (server, socket, packet) = (server.clone(), socket.clone(), packet.to_vec());
                tokio::spawn(async move {
                    if let Some(bytes) = server.resolve(slow, &packet, true).await {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Accept TCP clients until `shutdown`; each may send several queries.
pub async fn serve_tcp(listener: TcpListener, server: Arc<DnsServer>, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("dns: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            server.stats.dropped.inc();
            continue;
        };
        let (server, shutdown) = (server.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _ = tokio::select! {
                _ = shutdown.cancelled() => Ok(()),
                r = serve_connection(stream, &server) => r,
            };
            drop(permit);
        });
    }
}

async fn serve_connection(mut stream: TcpStream, server: &DnsServer) -> io::Result<()> {
    loop {
        let Ok(next) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return Ok(());
        };
        let Some(packet) = next? else {
            return Ok(());
        };
        let handled = server.handle(&packet, false);
        if let Some(bytes) = server.resolve(handled, &packet, false).await {
            write_framed(&mut stream, &bytes).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use serde_json::json;

    /// A server for one zone holding one Service, on a loopback port.
    async fn spawn_server(
        domain: &str,
        service: serde_json::Value,
        upstreams: Vec<SocketAddr>,
    ) -> (SocketAddr, Arc<DnsServer>) {
        let mut zone = Zone::new(domain, 30).unwrap();
        let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(service).unwrap();
        let records = zone.service_records(&service, &[]);
        zone.set_service("any/service", records);
        let server = Arc::new(DnsServer::new(
            Arc::new(RwLock::new(zone)),
            upstreams,
            Arc::default(),
        ));
        // UDP takes a free port; TCP on the same number may be in use by
        // another process on the host, then another port is tried.
        let (socket, listener) = (0..50)
            .find_map(|_| {
                let socket = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
                let listener = tcp_listener(socket.local_addr().unwrap()).ok()?;
                Some((Arc::new(socket), listener))
            })
            .expect("a loopback port free for both UDP and TCP");
        let addr = socket.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_udp(socket, server.clone(), shutdown.clone()));
        tokio::spawn(serve_tcp(listener, server.clone(), shutdown));
        (addr, server)
    }

    async fn server_on_loopback(upstreams: Vec<SocketAddr>) -> (SocketAddr, Arc<DnsServer>) {
        let web = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.3.4", "ports": [{"name": "http", "port": 80}]}
        });
        spawn_server("cluster.local", web, upstreams).await
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        q.to_vec().unwrap()
    }

    async fn ask_udp(server: SocketAddr, packet: &[u8]) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(packet, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    #[tokio::test]
    async fn answers_over_udp_and_tcp_and_relays_other_names() {
        // The node's resolver here is a second server answering for a
        // zone of its own: names in it are relayed there.
        let api = json!({"metadata": {"name": "api", "namespace": "x"},
                         "spec": {"clusterIP": "10.1.2.3"}});
        let (upstream, _) = spawn_server("example.test", api, Vec::new()).await;
        let (addr, server) = server_on_loopback(vec![upstream]).await;

        let a = ask_udp(addr, &query("web.shop.svc.cluster.local.", RecordType::A)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(a.answers[0].data.to_string(), "10.96.3.4");

        let nx = ask_udp(addr, &query("nope.shop.svc.cluster.local.", RecordType::A)).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);

        let relayed = ask_udp(addr, &query("api.x.svc.example.test.", RecordType::A)).await;
        assert_eq!(relayed.answers[0].data.to_string(), "10.1.2.3");

        // Over TCP, length-prefixed, two queries on one connection.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for name in ["web.shop.svc.cluster.local.", "api.x.svc.example.test."] {
            write_framed(&mut stream, &query(name, RecordType::A))
                .await
                .unwrap();
            let answer = read_framed(&mut stream).await.unwrap().unwrap();
            let answer = Message::from_vec(&answer).unwrap();
            assert_eq!(answer.answers.len(), 1, "{name}");
        }

        // Garbage with a header gets FORMERR; shorter garbage nothing.
        let mut junk = vec![0xab, 0xcd];
        junk.extend_from_slice(&[0xff; 20]);
        let formerr = ask_udp(addr, &junk).await;
        assert_eq!(formerr.metadata.id, 0xabcd);
        assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
        assert!(server.stats.malformed.get() >= 1);
    }

    #[tokio::test]
    async fn a_repeated_question_is_answered_from_the_cache_until_the_zone_changes() {
        let (addr, server) = server_on_loopback(Vec::new()).await;
        let question = query("web.shop.svc.cluster.local.", RecordType::A);
        let first = ask_udp(addr, &question).await;
        let mut again = question.clone();
        again[..2].copy_from_slice(&0x4242u16.to_be_bytes());
        let second = ask_udp(addr, &again).await;
        assert_eq!(second.metadata.id, 0x4242);
        assert_eq!(second.answers, first.answers);
        assert_eq!(server.stats.responses("NOERROR"), 2);
        let moved = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.7.7"}
        });
        {
            let mut zone = server.zone.write().unwrap();
            let records = zone.service_records(&serde_json::from_value(moved).unwrap(), &[]);
            zone.set_service("any/service", records);
        }
        server.zone_changed();
        let third = ask_udp(addr, &again).await;
        assert_eq!(third.answers[0].data.to_string(), "10.96.7.7");
    }

    #[tokio::test]
    async fn a_name_no_resolver_answers_is_servfail() {
        // Nothing listens on this port: the relay fails, the client hears.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let (addr, server) = server_on_loopback(vec![dead_addr]).await;
        let answer = ask_udp(addr, &query("example.com.", RecordType::A)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(server.stats.forward_failures.get(), 1);
    }
}
