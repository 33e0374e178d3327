//! Test harness: the real daemon binary, a real knotd upstream, scriptable fake upstreams,
//! and raw DNS clients. Every test uses its own 127.0.30.x address (this crate's range).
#![allow(dead_code)]

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_node-local-dns-resolver");
pub const DNS_PORT: u16 = 1053;
pub const UP_PORT: u16 = 2053;
pub const HTTP_PORT: u16 = 18080;

pub fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 30, n])
}

pub fn sa(n: u8, port: u16) -> SocketAddr {
    SocketAddr::new(ip(n), port)
}

/// A child process killed (by its PID) and reaped on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- DNS messages

pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

#[derive(Clone, Copy)]
pub struct Edns {
    pub size: u16,
    pub dnssec_ok: bool,
    pub version: u8,
}

pub const EDNS: Option<Edns> = Some(Edns {
    size: 1232,
    dnssec_ok: false,
    version: 0,
});

/// A query in wire form (RD set).
pub fn query(id: u16, name: &str, qtype: u16, edns: Option<Edns>) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns.is_some() as u8]);
    m.extend_from_slice(&encode_name(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    if let Some(e) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&e.size.to_be_bytes());
        m.extend_from_slice(&[0, e.version, if e.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    m
}

pub fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap_or_else(|e| panic!("unparsable reply {bytes:?}: {e}"))
}

pub fn rcode(bytes: &[u8]) -> u8 {
    bytes[3] & 0x0f
}

pub fn id_of(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

pub fn is_tc(bytes: &[u8]) -> bool {
    bytes[2] & 0x02 != 0
}

/// The A/AAAA/TXT data of the answer section as strings, sorted.
pub fn answers(bytes: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = parse(bytes)
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => other.to_string(),
        })
        .collect();
    v.sort();
    v
}

pub fn answer_ttls(bytes: &[u8]) -> Vec<u32> {
    parse(bytes).answers.iter().map(|r| r.ttl).collect()
}

// ---------------------------------------------------------------- clients

pub fn udp_exchange(server: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind(SocketAddr::new(server.ip(), 0))
        .or_else(|_| UdpSocket::bind("127.0.0.1:0"))
        .unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(msg, server).unwrap();
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == server => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A UDP query that must be answered (5 s, a stub resolver's whole budget).
pub fn ask(server: SocketAddr, name: &str, qtype: u16) -> Vec<u8> {
    let id = rand::random();
    let reply = udp_exchange(
        server,
        &query(id, name, qtype, EDNS),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no answer from {server} for {name}/{qtype}"));
    assert_eq!(id_of(&reply), id, "reply ID");
    reply
}

pub fn tcp_write(s: &mut TcpStream, msg: &[u8]) {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).unwrap();
}

pub fn tcp_read(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).ok()?;
    Some(msg)
}

pub fn tcp_ask(server: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_write(&mut s, msg);
    tcp_read(&mut s).expect("tcp answer")
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- the daemon

pub struct Daemon {
    pub proc: Proc,
    pub dns: SocketAddr,
    pub http: SocketAddr,
}

impl Daemon {
    /// Starts the real binary on `n`'s address; returns once it answers on UDP and HTTP.
    pub fn start(n: u8, upstreams: &[SocketAddr], extra: &[&str]) -> Daemon {
        let dns = sa(n, DNS_PORT);
        let http = sa(n, HTTP_PORT);
        let mut cmd = Command::new(BIN);
        cmd.arg("--listen").arg(dns.to_string());
        for u in upstreams {
            cmd.arg("--upstream").arg(u.to_string());
        }
        cmd.args([
            "--no-node-setup",
            "--metrics-listen",
            &http.to_string(),
            "--health-listen",
            &http.to_string(),
        ])
        .args(["--health-check-interval", "300ms"])
        .args(extra)
        .env_remove("KUBE_DNS_SVC_IP")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
        let child = cmd.spawn().expect("start node-local-dns-resolver");
        let mut d = Daemon {
            proc: Proc { child },
            dns,
            http,
        };
        d.wait_serving();
        d
    }

    pub fn wait_serving(&mut self) {
        let http = self.http;
        let dns = self.dns;
        let child = &mut self.proc.child;
        wait_until("daemon to serve", Duration::from_secs(15), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited early: {st}");
            }
            TcpStream::connect_timeout(&http, Duration::from_millis(200)).is_ok()
                && resolver::watchdog::probe(dns, Duration::from_millis(300))
        });
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.http, "/metrics");
        assert_eq!(status, 200);
        body
    }

    /// Value of one sample line `name{labels}` (labels exactly as exposed), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.rsplit_once(' ')
                .filter(|(s, _)| *s == series)
                .map(|(_, v)| v.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// Sum of all samples of a family whose label set contains every `needle`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

// ---------------------------------------------------------------- knotd upstream

pub const ZONE: &str = r#"$ORIGIN example.test.
$TTL 300
@      SOA ns hostmaster 1 3600 600 86400 60
@      NS  ns
ns     A   127.0.30.1
www    A   192.0.2.10
www    A   192.0.2.11
www    AAAA 2001:db8::10
short  1 A 192.0.2.20
alias  CNAME www
"#;

/// TXT records totalling ~2.4 kB: over 512 and over 1232 bytes.
pub fn big_txt_records() -> String {
    (0..12)
        .map(|i| format!("big TXT \"{i:02}{}\"\n", "x".repeat(190)))
        .collect()
}

pub fn knot(dir: &Path, addr: SocketAddr) -> Proc {
    let conf_path = write_knot_config(dir, addr);
    let child = Command::new("knotd")
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("start knotd");
    let mut p = Proc { child };
    wait_until("knotd to answer", Duration::from_secs(15), || {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("knotd exited: {st}");
        }
        udp_exchange(
            addr,
            &query(1, "example.test", 6, None),
            Duration::from_millis(200),
        )
        .is_some()
    });
    p
}

/// Writes the zone and a knot.conf serving it on `addr`; returns the config path.
pub fn write_knot_config(dir: &Path, addr: SocketAddr) -> std::path::PathBuf {
    let zones = dir.join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    std::fs::create_dir_all(dir.join("db")).unwrap();
    std::fs::write(
        zones.join("example.test.zone"),
        format!("{ZONE}{}", big_txt_records()),
    )
    .unwrap();
    let conf = format!(
        r#"server:
    listen: {ip}@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    rundir: "{dir}"
log:
  - target: stderr
    any: warning
database:
    storage: "{dir}/db"
template:
  - id: default
    storage: "{zones}"
    file: "%s.zone"
    semantic-checks: off
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: example.test
"#,
        ip = addr.ip(),
        port = addr.port(),
        dir = dir.display(),
        zones = zones.display()
    );
    let conf_path = dir.join("knot.conf");
    std::fs::write(&conf_path, conf).unwrap();
    conf_path
}

// ---------------------------------------------------------------- scriptable fake upstream

/// How a fake upstream reacts to one query: the datagrams it sends back, in order.
pub type Script = dyn Fn(&[u8]) -> Vec<Step> + Send + Sync;

pub enum Step {
    /// From the listening socket.
    Reply(Vec<u8>),
    /// From another socket (a spoofer's port).
    FromOtherPort(Vec<u8>),
    Sleep(Duration),
}

/// A UDP (and optional TCP) DNS server run by a script; counts the queries it receives.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    /// Question names of every UDP and TCP query received, lowercase, dotted.
    pub names: Arc<std::sync::Mutex<Vec<String>>>,
    /// Question name and source address of every UDP query received.
    pub udp_sources: Arc<std::sync::Mutex<Vec<(String, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(addr: SocketAddr, udp: Arc<Script>, tcp: Option<Arc<Script>>) -> FakeUpstream {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let udp_sources = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sock = UdpSocket::bind(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut threads = Vec::new();
        {
            let (stop, count, seen) = (stop.clone(), udp_queries.clone(), names.clone());
            let sources = udp_sources.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    seen.lock().unwrap().push(qname_of(&buf[..n]));
                    sources.lock().unwrap().push((qname_of(&buf[..n]), peer));
                    count.fetch_add(1, Ordering::SeqCst);
                    let q = buf[..n].to_vec();
                    let s = sock.try_clone().unwrap();
                    let script = udp.clone();
                    std::thread::spawn(move || {
                        for step in script(&q) {
                            match step {
                                Step::Reply(m) => drop(s.send_to(&m, peer)),
                                Step::FromOtherPort(m) => {
                                    let other =
                                        UdpSocket::bind(SocketAddr::new(peer.ip(), 0)).unwrap();
                                    let _ = other.send_to(&m, peer);
                                }
                                Step::Sleep(d) => std::thread::sleep(d),
                            }
                        }
                    });
                }
            }));
        }
        if let Some(tcp) = tcp {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            let (stop, count, seen) = (stop.clone(), tcp_queries.clone(), names.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut c, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    while let Some(q) = tcp_read(&mut c) {
                        seen.lock().unwrap().push(qname_of(&q));
                        count.fetch_add(1, Ordering::SeqCst);
                        for step in tcp(&q) {
                            if let Step::Reply(m) = step {
                                tcp_write(&mut c, &m);
                            }
                        }
                    }
                }
            }));
        }
        FakeUpstream {
            addr,
            udp_queries,
            tcp_queries,
            names,
            udp_sources,
            stop,
            threads,
        }
    }
}

impl FakeUpstream {
    /// Queries received for `name` (health checks for `.` are not counted).
    pub fn count(&self, name: &str) -> usize {
        self.names
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == name)
            .count()
    }
}

/// The question name of a message, lowercase and dotted (no trailing dot).
pub fn qname_of(m: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut i = 12;
    while let Some(&len) = m.get(i) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        let Some(l) = m.get(i + 1..i + 1 + len as usize) else {
            break;
        };
        labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
        i += 1 + len as usize;
    }
    labels.join(".")
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A reply to `q` (its ID and question) with the given rcode, A answers, and optionally an
/// SOA in the authority section (negative TTL 60).
pub fn reply_to(q: &[u8], rcode: u8, a: &[[u8; 4]], ttl: u32, soa: bool) -> Vec<u8> {
    let qend = question_end(q);
    let mut m = q[..qend].to_vec();
    m[2] = 0x81 | (q[2] & 0x01); // QR, RD copied
    m[3] = 0x80 | rcode; // RA
    m[6..12].copy_from_slice(&[0, a.len() as u8, 0, soa as u8, 0, 0]);
    for addr in a {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&[0, 4]);
        m.extend_from_slice(addr);
    }
    if soa {
        m.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 60]);
        let rdata = [
            encode_name("ns.x"),
            encode_name("h.x"),
            [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 60].to_vec(),
        ]
        .concat();
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
    }
    m
}

pub fn question_end(q: &[u8]) -> usize {
    let mut i = 12;
    while q[i] != 0 {
        i += 1 + q[i] as usize;
    }
    i + 5
}

/// (name, /proc directory) of each thread of `pid` whose name starts with `prefix`.
pub fn threads_of(pid: i32, prefix: &str) -> Vec<(String, std::path::PathBuf)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            comm.starts_with(prefix)
                .then(|| (comm.trim().to_string(), dir))
        })
        .collect()
}

/// For each thread of `pid` whose name starts with `prefix`, sorted: (CPUs it may run on,
/// times it was switched out so far, asleep or preempted), from /proc.
pub fn thread_cpus_and_switches(pid: i32, prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (_, dir) in threads_of(pid, prefix) {
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let count = |name| field(name).parse::<u64>().unwrap_or(0);
        let switches = count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:");
        out.push((field("Cpus_allowed_list:"), switches));
    }
    out.sort();
    out
}

/// A DNS client that asks from one CPU (and, optionally, one network namespace).
pub struct PinnedClient {
    /// Name of a namespace under /var/run/netns.
    pub netns: Option<String>,
    pub bind: SocketAddr,
    /// A name the daemon can answer.
    pub name: &'static str,
}

impl PinnedClient {
    /// Sends `n` queries one after the other from a thread pinned to `cpu`, each answered.
    /// They rotate over 8 source ports: were the kernel spreading by hash of the source
    /// instead of steering by CPU, about half of them would reach another thread.
    pub fn ask_in_turn(&self, cpu: usize, dns: SocketAddr, n: u16) {
        let (netns, bind, name) = (self.netns.clone(), self.bind, self.name);
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            resolver::sched::pin_this_thread(cpu).unwrap();
            let socks: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind(bind).unwrap()).collect();
            let mut buf = [0u8; 512];
            for (id, sock) in (0..n).zip(socks.iter().cycle()) {
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                sock.send_to(&query(id, name, 1, None), dns).unwrap();
                let (len, _) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(id_of(&buf[..len]), id);
            }
        })
        .join()
        .unwrap();
    }
}

/// `--threads auto`: one UDP thread (named `prefix`…) per CPU this process may use, pinned,
/// and the kernel (SO_INCOMING_CPU, Linux >= 6.2) hands each the datagrams sent from its CPU.
/// A client that waits for each answer must run between two queries, so every query
/// switches the receiving thread out once (it sleeps, or the client on its CPU preempts it):
/// the threads' context switches say which one answered.
pub fn assert_each_cpu_answered_by_its_own_thread(
    pid: i32,
    prefix: &str,
    dns: SocketAddr,
    client: &PinnedClient,
) {
    const QUERIES: u16 = 400;
    let cpus = resolver::sched::allowed_cpus().unwrap();
    let pinned: Vec<String> = thread_cpus_and_switches(pid, prefix)
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let want: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    assert_eq!(pinned, want, "one UDP thread pinned to each CPU");
    client.ask_in_turn(cpus[0], dns, 1); // a miss the first time: cached from now on
    for &cpu in &cpus {
        let before = thread_cpus_and_switches(pid, prefix);
        let started = Instant::now();
        client.ask_in_turn(cpu, dns, QUERIES);
        let after = thread_cpus_and_switches(pid, prefix);
        // Another thread only wakes for its 100 ms receive timeout and the watchdog's two
        // probes a second, however long a loaded machine took for the queries.
        let idle_allowance = 20 + (started.elapsed().as_secs_f64() * 12.0) as u64;
        for ((pin, s0), (_, s1)) in before.iter().zip(&after) {
            let switched = s1 - s0;
            if *pin == cpu.to_string() {
                assert!(
                    switched >= u64::from(QUERIES),
                    "thread on CPU {pin} switched out {switched} times for {QUERIES} queries"
                );
            } else {
                assert!(
                    switched < idle_allowance,
                    "thread on CPU {pin} switched out {switched} times for CPU {cpu}'s queries"
                );
            }
        }
    }
}
