//! Real links for the harness: network namespaces joined by veth pairs, shaped with
//! `tc … tbf`, everything made by the harness and removed when dropped.
//!
//! ```text
//!   root namespace            hub namespace                      site namespace i
//!   engine 127.0.0.1  <-relay->  10.201.i.1 [tbf] ==== veth ==== [tbf] 10.201.i.2  agent
//! ```
//!
//! The engine and the client stay on the machine's loopback; the relay ([`super::relay`])
//! bridges loopback and the hub namespace in userspace (it opens its hub-side socket from a
//! thread that entered the namespace, [`in_netns`]), adding delay, loss and outages, which
//! this kernel's `tc` cannot (`netem` is not available). No address is added outside the
//! namespaces made here.

use std::net::Ipv4Addr;
use std::process::Command;

use super::LinkError;

/// Run `args` (`ip …`, `tc …`), failing with its stderr.
fn run(args: &[&str]) -> Result<String, LinkError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| LinkError::Setup(format!("{}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(LinkError::Setup(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A rate shape for one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Bits per second.
    pub rate_bps: u64,
    /// The most a packet may wait in the link's queue (tbf `latency`): how deep the
    /// bottleneck's buffer is.
    pub queue_ms: u32,
}

impl Shape {
    /// tbf arguments: the bucket holds a few milliseconds of the rate (at least 4 KiB, as
    /// tbf needs room for an MTU-sized packet and the timer's granularity).
    fn tbf_args(&self) -> Vec<String> {
        let burst_bytes = (self.rate_bps / 8 / 250).max(4096);
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.rate_bps),
            "burst".into(),
            format!("{burst_bytes}b"),
            "latency".into(),
            format!("{}ms", self.queue_ms),
        ]
    }
}

/// Packets and bytes one interface sent and received, with what its qdisc dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Dropped by the shaper (its queue was full).
    pub qdisc_drops: u64,
}

impl Counters {
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            qdisc_drops: self.qdisc_drops.saturating_sub(earlier.qdisc_drops),
        }
    }
}

/// The hub namespace and the site links made from it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    pub hub: String,
    links: usize,
}

/// One site's link: its namespace and the two ends of its veth pair.
#[derive(Debug, Clone)]
pub struct SiteLink {
    /// The site's namespace (`ip netns exec NS …` runs its agent there).
    pub ns: String,
    pub hub_ns: String,
    /// The hub's end (its egress is the engine → site direction).
    pub hub_if: String,
    /// The site's end (its egress is the site → engine direction).
    pub site_if: String,
    pub hub_ip: Ipv4Addr,
    pub site_ip: Ipv4Addr,
}

impl Net {
    /// A fresh hub namespace named after this process (so parallel runs do not meet).
    pub fn create() -> Result<Net, LinkError> {
        if !std::path::Path::new("/proc/self/ns/net").exists() {
            return Err(LinkError::Setup("no network namespaces here".into()));
        }
        remove_stale();
        // Short (interface names have at most 15 characters), and apart for every Net of
        // this process (tests run several at once).
        static NETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let tag = format!("{:x}x{n}", std::process::id() & 0xfffff);
        let hub = format!("sc{tag}hub");
        let _ = run(&["ip", "netns", "del", &hub]);
        run(&["ip", "netns", "add", &hub])?;
        let net = Net {
            tag,
            hub: hub.clone(),
            links: 0,
        };
        run(&["ip", "-n", &hub, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// A new site namespace joined to the hub by a veth pair, unshaped.
    pub fn add_site(&mut self) -> Result<SiteLink, LinkError> {
        let i = self.links;
        if i >= 250 {
            return Err(LinkError::Setup("at most 250 site links".into()));
        }
        self.links += 1;
        let ns = format!("sc{}s{i}", self.tag);
        let (hub_if, site_if) = (format!("sc{}h{i}", self.tag), format!("sc{}v{i}", self.tag));
        let hub_ip = Ipv4Addr::new(10, 201, i as u8, 1);
        let site_ip = Ipv4Addr::new(10, 201, i as u8, 2);
        let _ = run(&["ip", "netns", "del", &ns]);
        run(&["ip", "netns", "add", &ns])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(&[
            "ip", "-n", &self.hub, "link", "add", &hub_if, "type", "veth", "peer", "name",
            &site_if, "netns", &ns,
        ])?;
        for (n, dev, ip) in [(&self.hub, &hub_if, hub_ip), (&ns, &site_if, site_ip)] {
            run(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", n, "link", "set", dev, "up"])?;
        }
        Ok(SiteLink {
            ns,
            hub_ns: self.hub.clone(),
            hub_if,
            site_if,
            hub_ip,
            site_ip,
        })
    }
}

/// Namespaces an earlier harness left behind when it was killed (their process is gone).
fn remove_stale() {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("sc") else {
            continue;
        };
        let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        let Some(tail) = rest[hex.len()..].strip_prefix('x') else {
            continue;
        };
        let tail = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        let ours = tail == "hub"
            || tail
                .strip_prefix('s')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let Ok(pid) = u32::from_str_radix(&hex, 16) else {
            continue;
        };
        if ours && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for i in 0..self.links {
            let _ = run(&["ip", "netns", "del", &format!("sc{}s{i}", self.tag)]);
        }
        let _ = run(&["ip", "netns", "del", &self.hub]);
    }
}

impl SiteLink {
    /// Shape both directions (`None`: unshaped).
    pub fn shape(&self, down: Option<Shape>, up: Option<Shape>) -> Result<(), LinkError> {
        for (ns, dev, shape) in [
            (&self.hub_ns, &self.hub_if, down),
            (&self.ns, &self.site_if, up),
        ] {
            match shape {
                Some(s) => {
                    let mut args: Vec<String> =
                        ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root"]
                            .map(String::from)
                            .to_vec();
                    args.extend(s.tbf_args());
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    run(&args)?;
                }
                None => {
                    // Back to the default qdisc; none to delete is fine.
                    let _ = run(&["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
        Ok(())
    }

    /// The hub end's counters: `tx` is what went down the link towards the site.
    pub fn hub_counters(&self) -> Result<Counters, LinkError> {
        counters(&self.hub_ns, &self.hub_if)
    }

    /// The site end's counters: `rx` is what the site received.
    pub fn site_counters(&self) -> Result<Counters, LinkError> {
        counters(&self.ns, &self.site_if)
    }
}

fn counters(ns: &str, dev: &str) -> Result<Counters, LinkError> {
    let bad = |what: &str| LinkError::Setup(format!("reading {what} of {dev} in {ns}"));
    let link: serde_json::Value = serde_json::from_str(&run(&[
        "ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev,
    ])?)
    .map_err(|_| bad("link statistics"))?;
    let st = &link[0]["stats64"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let qd: serde_json::Value = serde_json::from_str(&run(&[
        "tc", "-n", ns, "-j", "-s", "qdisc", "show", "dev", dev,
    ])?)
    .map_err(|_| bad("qdisc statistics"))?;
    let drops = qd
        .as_array()
        .map_or(0, |a| a.iter().map(|q| n(&q["drops"])).sum());
    Ok(Counters {
        tx_bytes: n(&st["tx"]["bytes"]),
        rx_bytes: n(&st["rx"]["bytes"]),
        tx_packets: n(&st["tx"]["packets"]),
        rx_packets: n(&st["rx"]["packets"]),
        qdisc_drops: drops,
    })
}

/// Run `f` on a thread inside network namespace `ns` (sockets it opens stay there).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path)?;
        // Only this thread moves, and it ends after `f`.
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}
